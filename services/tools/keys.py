"""This install's secrets, generated once under the run dir (``.run/``, ignored by git).

- ``demo-keys.env``: ``CACHEMESH_KEY_A=...`` and ``CACHEMESH_KEY_B=...``, the two demo tenants'
  API keys in clear (for ``make demo`` and people);
- ``api-keys``: ``tenant:sha256hex`` lines, what the router reads (CACHEMESH_API_KEYS_FILE);
- ``internal-token``: the credential between the router and the internal services
  (CACHEMESH_INTERNAL_TOKEN), and ``internal.env`` holding it for docker compose's env_file.

Every file is mode 0600 in a 0700 directory. Running again keeps the existing secrets.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cachemesh.envfile import parse_env_text
from services.common.auth import hash_key, new_api_key

TENANTS: tuple[tuple[str, str], ...] = (
    ("tenant-a", "CACHEMESH_KEY_A"),
    ("tenant-b", "CACHEMESH_KEY_B"),
)
DEMO_KEYS_FILE = "demo-keys.env"
API_KEYS_FILE = "api-keys"
INTERNAL_TOKEN_FILE = "internal-token"
INTERNAL_ENV_FILE = "internal.env"


@dataclass(frozen=True)
class StackKeys:
    run_dir: Path
    api_keys: dict[str, str]  # tenant -> API key in clear
    internal_token: str
    created: bool  # True when this call generated new secrets

    @property
    def api_keys_file(self) -> Path:
        return self.run_dir / API_KEYS_FILE

    @property
    def demo_keys_file(self) -> Path:
        return self.run_dir / DEMO_KEYS_FILE

    def key_for(self, tenant: str) -> str:
        return self.api_keys[tenant]

    def env(self) -> dict[str, str]:
        """What the services need: the key file's path and the internal credential."""
        return {
            "CACHEMESH_API_KEYS_FILE": str(self.api_keys_file),
            "CACHEMESH_INTERNAL_TOKEN": self.internal_token,
        }


def ensure_keys(run_dir: Path) -> StackKeys:
    """Loads this run dir's secrets, generating whatever is missing; never replaces a key."""
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    created = False
    api_keys = _read_demo_keys(run_dir / DEMO_KEYS_FILE)
    if api_keys is None:
        api_keys = {tenant: new_api_key() for tenant, _ in TENANTS}
        created = True
    token_path = run_dir / INTERNAL_TOKEN_FILE
    token = token_path.read_text().strip() if token_path.is_file() else ""
    if len(token) < 16:
        token = secrets.token_urlsafe(32)
        created = True
    demo = "".join(f"{var}={api_keys[tenant]}\n" for tenant, var in TENANTS)
    hashed = "".join(f"{tenant}:{hash_key(api_keys[tenant])}\n" for tenant, _ in TENANTS)
    _write_secret(run_dir / DEMO_KEYS_FILE, demo)
    _write_secret(run_dir / API_KEYS_FILE, hashed)
    _write_secret(token_path, token + "\n")
    _write_secret(run_dir / INTERNAL_ENV_FILE, f"CACHEMESH_INTERNAL_TOKEN={token}\n")
    return StackKeys(run_dir=run_dir, api_keys=api_keys, internal_token=token, created=created)


def describe(keys: StackKeys) -> str:
    """The keys for people: what they are and where they live."""
    state = "generated" if keys.created else "existing"
    lines = [f"demo API keys ({state}, in {keys.demo_keys_file}):"]
    lines += [f"  {var}={keys.api_keys[tenant]}   # {tenant}" for tenant, var in TENANTS]
    lines.append(f"  use: set -a; source {keys.demo_keys_file}; set +a")
    return "\n".join(lines)


def _read_demo_keys(path: Path) -> dict[str, str] | None:
    if not path.is_file():
        return None
    values = parse_env_text(path.read_text(), str(path))
    keys = {tenant: values.get(var, "") for tenant, var in TENANTS}
    return keys if all(keys.values()) else None


def _write_secret(path: Path, content: str) -> None:
    """Writes ``content`` with mode 0600 from the start, replacing the file atomically."""
    if path.is_file() and path.read_text() == content:
        os.chmod(path, 0o600)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
