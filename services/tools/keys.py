"""This install's secrets, generated once under the run dir (``.run/``, ignored by git).

``make keys`` runs this with the system's ``python3`` (``python3 -m services.tools.keys``): it
uses the standard library only, and the project's one ``.env`` reader (``cachemesh.envfile``,
from the checkout's client package when it is not installed), so it needs no virtualenv.
``make up`` runs it too.

- ``demo-keys.env``: ``export CACHEMESH_KEY_A=...`` and ``export CACHEMESH_KEY_B=...``, the two
  demo tenants' API keys in clear, and ``export CACHEMESH_ADMIN_TOKEN_FILE=...`` (where the
  admin token is): ``source .run/demo-keys.env`` puts them in a shell's environment. ``make up``
  adds where its stack listens (``CACHEMESH_TARGET``, the Gateway's host:port, which the CLI,
  the demo and ``cachemesh admin`` dial; ``CACHEMESH_HTTP_URL``, the HTTP front's base URL), so
  the keys and the admin token go to the stack that knows them, wherever it listens. Demo keys
  are minted on a fresh install only (no ``api-keys`` yet): once the key file exists, a
  missing ``demo-keys.env`` (an operator who revoked the demo keys and deleted it) stays
  missing, and the demo keys are reported unavailable, with how to issue keys instead;
- ``api-keys``: the key file the router and the HTTP front read (CACHEMESH_API_KEYS_FILE),
  only hashes (``services.common.keyfile``); the Admin API adds, revokes and rotates keys in
  it. It is created with the demo keys when missing, and never rewritten after: a key an
  operator revoked stays revoked;
- ``internal-token``: the credential between the router and the internal services
  (CACHEMESH_INTERNAL_TOKEN for ``make up``; compose mounts the file into their containers as
  a secret, CACHEMESH_INTERNAL_TOKEN_FILE);
- ``admin-token``: the Admin API's credential (CACHEMESH_ADMIN_TOKEN_FILE), for ``make up``
  and compose alike (mounted into the router's container as a secret, never put in an
  environment: ``docker inspect`` shows that). An ``admin.env`` an older version wrote for
  compose's env_file is left as it is (0600, no longer read: harmless; delete it at will);
- ``redis-password``: the password of the stack's own Redis (``make up``'s redis-server reads
  it from ``redis.conf`` in the run dir, never from its command line; the stack puts it into
  the Redis URLs of the services that use that Redis); compose mounts the file into its
  ``redis`` service (the server and its health check's redis-cli read it) and into the
  router's and prefix-cache's containers (CACHEMESH_REDIS_PASSWORD_FILE: put into their Redis
  URLs; never the HTTP front's). A run dir made before it existed gets it on the next
  ``make keys`` or ``make up``. The ``internal.env``, ``redis.env`` and ``redis-urls.env`` an
  older version wrote for compose's env_file are left as they are (0600, no longer read:
  delete them at will).

Every file is mode 0600 in a 0700 directory, but those compose mounts into the containers,
read there by their non-root user (uid 10001; compose v1 mounts a secret with the host file's
owner and mode): ``api-keys`` (0644: hashes only, the seed of the routers' key volume),
``admin-token``, ``internal-token`` and ``redis-password`` (0644: only the 0700 directory
keeps them from this host's other users). Running again keeps the existing secrets.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from services.common.keyfile import KeyFile, KeyRecord, hash_key, new_api_key, new_key_id

try:
    from cachemesh.envfile import EnvFileError, parse_env_text, read_env_file, set_values
except ModuleNotFoundError:  # make keys: the system's python3 in the checkout, no venv
    sys.path.append(str(Path(__file__).resolve().parents[2] / "clients" / "python"))
    from cachemesh.envfile import EnvFileError, parse_env_text, read_env_file, set_values

TENANTS: tuple[tuple[str, str], ...] = (
    ("tenant-a", "CACHEMESH_KEY_A"),
    ("tenant-b", "CACHEMESH_KEY_B"),
)
DEMO_KEYS_FILE = "demo-keys.env"
API_KEYS_FILE = "api-keys"
INTERNAL_TOKEN_FILE = "internal-token"
ADMIN_TOKEN_FILE = "admin-token"
REDIS_PASSWORD_FILE = "redis-password"
# where the run dir's stack listens, for its clients (written by ``stack up``, kept by keys)
TARGET_VAR = "CACHEMESH_TARGET"
HTTP_URL_VAR = "CACHEMESH_HTTP_URL"
ENDPOINT_VARS = (TARGET_VAR, HTTP_URL_VAR)


@dataclass(frozen=True)
class StackKeys:
    run_dir: Path
    api_keys: dict[str, str]  # tenant -> API key in clear; empty when the demo keys are gone
    internal_token: str
    admin_token: str
    redis_password: str  # the stack's own Redis's (``make up``; compose's redis service)
    created: bool  # True when this call generated new secrets (a Redis password alone: no)
    # CACHEMESH_TARGET / CACHEMESH_HTTP_URL -> where the run dir's stack listens (may be empty)
    endpoints: Mapping[str, str] = field(default_factory=dict)

    @property
    def api_keys_file(self) -> Path:
        return self.run_dir / API_KEYS_FILE

    @property
    def demo_keys_file(self) -> Path:
        return self.run_dir / DEMO_KEYS_FILE

    @property
    def admin_token_file(self) -> Path:
        return self.run_dir / ADMIN_TOKEN_FILE

    @property
    def has_demo_keys(self) -> bool:
        return bool(self.api_keys)

    def key_for(self, tenant: str) -> str:
        if tenant not in self.api_keys:
            raise KeyError(f"no demo key for {tenant!r}: {unavailable(self)}")
        return self.api_keys[tenant]

    def env(self) -> dict[str, str]:
        """What the services need: the key file's path and the internal and admin credentials
        (the admin token by its file, so it stays out of the processes' environment); the
        stack keeps the credentials from a process outside the mesh (``OUTSIDE_SECRETS``)."""
        return {
            "CACHEMESH_API_KEYS_FILE": str(self.api_keys_file),
            "CACHEMESH_INTERNAL_TOKEN": self.internal_token,
            "CACHEMESH_ADMIN_TOKEN_FILE": str(self.admin_token_file),
        }


def ensure_keys(run_dir: Path, endpoints: Mapping[str, str] | None = None) -> StackKeys:
    """Loads this run dir's secrets, generating whatever is missing; never replaces a key.

    ``endpoints`` (``stack up``: CACHEMESH_TARGET and CACHEMESH_HTTP_URL of the stack it
    starts) go into ``demo-keys.env``; None keeps the ones it holds (``make keys``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    created = False
    demo_file = run_dir / DEMO_KEYS_FILE
    if endpoints is None:
        held = read_env_file(demo_file) if demo_file.is_file() else {}
        endpoints = {name: held[name] for name in ENDPOINT_VARS if held.get(name)}
    api_keys = _read_demo_keys(demo_file)
    if api_keys is None:
        # a fresh install only: into a live key file, new demo keys would bring back the demo
        # tenants an operator retired (revoked their keys, deleted the clear-text file)
        fresh = KeyFile(run_dir / API_KEYS_FILE).signature() is None
        api_keys = {tenant: new_api_key() for tenant, _ in TENANTS} if fresh else {}
        created = fresh
    token, new_token = _token(run_dir / INTERNAL_TOKEN_FILE)
    admin, new_admin = _token(run_dir / ADMIN_TOKEN_FILE)
    # a new Redis password alone (an older run dir's first make up) is no news to print
    redis_password, _ = _redis_password(run_dir / REDIS_PASSWORD_FILE)
    new = created or new_token or new_admin
    keys = StackKeys(run_dir, api_keys, token, admin, redis_password, new, dict(endpoints))
    if keys.has_demo_keys:  # the user's own lines in it kept as written
        held_text = demo_file.read_text(encoding="utf-8") if demo_file.is_file() else ""
        write_secret(demo_file, _demo_env(keys, held_text))
    _ensure_key_file(keys)
    # each read by a container's user through compose's secret mount (.run stays 0700)
    write_secret(run_dir / INTERNAL_TOKEN_FILE, token + "\n", mode=0o644)
    write_secret(run_dir / ADMIN_TOKEN_FILE, admin + "\n", mode=0o644)
    write_secret(run_dir / REDIS_PASSWORD_FILE, redis_password + "\n", mode=0o644)
    return keys


def forget_endpoints(run_dir: Path) -> None:
    """After ``stack down``: ``demo-keys.env`` names no stack (its CACHEMESH_TARGET and
    CACHEMESH_HTTP_URL lines dropped, every other line kept as written), so a shell that
    sources it does not dial ports this stack no longer holds; the next ``up`` writes where it
    listens. Line by line, never parsed: a line of the user's that the env-file reader would
    refuse (a ``$``) must not stop ``down``. Nothing is created."""
    demo_file = run_dir / DEMO_KEYS_FILE
    if not demo_file.is_file():
        return
    text = demo_file.read_text(encoding="utf-8")
    kept = set_values(text, [(name, None) for name in ENDPOINT_VARS])
    if kept != text:
        write_secret(demo_file, kept)


def url_with_password(url: str, password: str) -> str:
    """``url`` (``redis://host:port/db``) giving ``password`` for the default user."""
    parts = urlsplit(url)
    address = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f":{password}@{address}"))


def describe(keys: StackKeys) -> str:
    """The keys for people: what they are and where they live (the admin token by its file)."""
    if not keys.has_demo_keys:
        return f"demo API keys: {unavailable(keys)}"
    state = "generated" if keys.created else "existing"
    lines = [f"demo API keys ({state}, in {keys.demo_keys_file}):"]
    lines += [f"  {var}={keys.api_keys[tenant]}   # {tenant}" for tenant, var in TENANTS]
    lines.append(f"  admin token: in {keys.admin_token_file} (CACHEMESH_ADMIN_TOKEN_FILE)")
    lines.append(f"  use: source {keys.demo_keys_file}")
    return "\n".join(lines)


def announce(keys: StackKeys) -> str:
    """What ``up`` says of the keys: where they are, never their values (its output is kept in
    terminals' scrollback and CI logs: the first ``make up`` printed both demo API keys);
    ``describe`` (``make keys``) prints them on request."""
    if not keys.has_demo_keys:
        return f"demo API keys: {unavailable(keys)}"
    state = "generated" if keys.created else "existing"
    return "\n".join(
        [
            f"demo API keys ({state}): in {keys.demo_keys_file} (not shown here: "
            f"`make keys RUN_DIR={keys.demo_keys_file.parent}` prints them)",
            f"  admin token: in {keys.admin_token_file} (CACHEMESH_ADMIN_TOKEN_FILE)",
            f"  use: source {keys.demo_keys_file}",
        ]
    )


def unavailable(keys: StackKeys) -> str:
    """Why there are no demo keys, and how to get keys instead."""
    return (
        f"unavailable ({keys.demo_keys_file} is gone and {keys.api_keys_file} exists: demo keys "
        "are minted on a fresh install only, so revoked ones stay revoked). Issue keys with the "
        f"Admin API: CACHEMESH_ADMIN_TOKEN_FILE={keys.admin_token_file} .venv/bin/cachemesh "
        "admin keys create tenant-a (prints the key once); make demo reads CACHEMESH_KEY_A "
        "and CACHEMESH_KEY_B from the environment"
    )


# the variables ``demo-keys.env`` holds for the stack; every other line in it is the user's
_DEMO_VARS = (*(var for _, var in TENANTS), "CACHEMESH_ADMIN_TOKEN_FILE", *ENDPOINT_VARS)


def _demo_env(keys: StackKeys, held: str = "") -> str:
    """``held`` (the file's text) with the stack's ``export NAME=value`` lines set by the
    project's one writer (``cachemesh.envfile.set_values``), each value quoted for a shell
    where it needs it (a path with a space): a line of one of the stack's variables replaced
    where it stands (a later one setting it again dropped, as an endpoint this stack does not
    name), a missing one added at the end, every other line (the user's comments and
    variables) kept as written; refused unless the project's reader reads back exactly what a
    shell's ``source`` does."""
    values = {var: keys.api_keys[tenant] for tenant, var in TENANTS}
    values["CACHEMESH_ADMIN_TOKEN_FILE"] = str(keys.admin_token_file)
    values.update({name: keys.endpoints[name] for name in ENDPOINT_VARS if name in keys.endpoints})
    try:
        text = set_values(
            held, [(name, values.get(name)) for name in _DEMO_VARS], export=True, append=True
        )
    except EnvFileError as exc:  # names the variable, never its value
        raise EnvFileError(f"{keys.demo_keys_file}: {exc}") from None
    read = parse_env_text(text, str(keys.demo_keys_file))
    if {name: read.get(name) for name in _DEMO_VARS if name in read} != values:
        raise EnvFileError(
            f"{keys.demo_keys_file}: the stack's lines would not read back as written"
        )
    return text


def _ensure_key_file(keys: StackKeys) -> None:
    """The key file with the demo keys when it is missing (a fresh install, or a lost key file
    rebuilt from ``demo-keys.env``); an existing one is never rewritten."""
    keyfile = KeyFile(keys.api_keys_file, mode=0o644)
    if keyfile.signature() is not None:
        os.chmod(keyfile.path, 0o644)  # an older install wrote it 0600
        return
    now = time.time()

    def with_demo_keys(records: list[KeyRecord]) -> list[KeyRecord]:
        known = {r.sha256 for r in records}
        for tenant, _ in TENANTS:
            digest = hash_key(keys.key_for(tenant))
            if digest not in known:
                records.append(KeyRecord(new_key_id(), tenant, digest, "demo", created_at=now))
        return records

    keyfile.update(with_demo_keys, create=True)


def _token(path: Path) -> tuple[str, bool]:
    """The token kept in ``path``, or a new one (True)."""
    token = path.read_text().strip() if path.is_file() else ""
    if len(token) >= 16:
        return token, False
    return secrets.token_urlsafe(32), True


def _redis_password(path: Path) -> tuple[str, bool]:
    """The Redis password kept in ``path``, or a new one (True). It goes verbatim into URLs,
    ``redis.conf`` and env files: one an operator wrote with other characters is refused."""
    password, new = _token(path)
    if not new and not re.fullmatch(r"[A-Za-z0-9_-]+", password):
        raise EnvFileError(
            f"{path}: the stack's Redis password may hold only A-Z, a-z, 0-9, _ and - (it goes "
            "into URLs and config files as it is): write 16 or more of those there, or delete the "
            "file for make keys to generate one (then make down; make up)"
        )
    return password, new


def _read_demo_keys(path: Path) -> dict[str, str] | None:
    """The demo keys of ``demo-keys.env`` (``export K=V`` lines, or the older ``K=V``), read
    by the project's one reader: a line it would read otherwise than a shell (a comment after
    a key) is an EnvFileError naming the line, never a key the shell does not send."""
    if not path.is_file():
        return None
    values = read_env_file(path)
    keys = {tenant: values.get(var, "") for tenant, var in TENANTS}
    return keys if all(keys.values()) else None


def write_secret(path: Path, content: str, mode: int = 0o600) -> None:
    """Writes ``content`` with ``mode`` (0600 unless a container's user must read it) from the
    start, replacing the file atomically and durably, as the key store's writer does
    (``keyfile.KeyFile``): the data fsynced before the rename (a crash never leaves an empty
    secret under the name), the directory after it."""
    if path.is_file() and path.read_text() == content:
        os.chmod(path, mode)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(  # stdlib only (no cachemesh._argv.Parser): see above
        prog="python3 -m services.tools.keys", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("--run-dir", type=Path, default=Path(".run"), help="default: .run")
    args = parser.parse_args(argv)
    try:
        print(describe(ensure_keys(args.run_dir.resolve())))
    except EnvFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
