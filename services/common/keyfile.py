"""The API key file (CACHEMESH_API_KEYS_FILE): every tenant's keys, hashed, shared by routers.

Standard library only: ``make keys`` writes it without the virtualenv.

One key a line, as JSON: ``{"id", "tenant", "sha256", "name", "created_at", "rotated_at",
"revoked_at"}`` (times in Unix seconds, null when not). The file never holds a key, only its
SHA-256: keys are 256 random bits, so a plain hash is enough to make a stolen file useless.
The older ``tenant:sha256hex`` lines are still read (as keys with an id derived from the hash);
``#`` comments and blank lines are skipped.

Writers (the Admin API of any router, ``make keys``) change the file under an exclusive
``flock`` of ``.<name>.lock`` beside it: read, change, write a new file, fsync it, rename it
over the old one, fsync the directory. Readers never see half a file (the rename is atomic)
and need no lock. Each write gives the file an mtime later than the one it replaces, so a
reader that compares (inode, size, mtime) sees every change even when two land within one
tick of the file system's clock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from services.common.errors import shown

KEY_PREFIX = "cm_"
HEADER = (
    "# cachemesh API keys: the sha256 of each key, never the key (written by the Admin API"
    " and make keys)\n"
)
# \Z, not $: "$" also matches before a final newline ("acme\n" would be another tenant)
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
TENANT_RULE = "1 to 64 letters, digits, '.', '_' or '-' (starting with a letter or digit)"


def tenant_error(tenant: str) -> str:
    """What is wrong with ``tenant`` as a tenant's name ("" when nothing): the one rule for
    the key file, the Admin API and the caches that keep data under a tenant's name (a
    name the key file could not hold is no caller's, and a 1 MB, NUL or right-to-left one
    spoils every listing of tenants)."""
    if TENANT_PATTERN.match(tenant):
        return ""
    return f"tenant must be {TENANT_RULE}, got {shown(tenant)}"


def same_but_case(tenant: str, known: Iterable[str]) -> str | None:
    """A tenant of ``known`` whose name differs from ``tenant`` only in case (the first in
    order, of several), or None: what the Admin API names for a tenant no one knows."""
    folded = tenant.casefold()
    return min((t for t in known if t != tenant and t.casefold() == folded), default=None)


_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_FIELDS = ("id", "tenant", "sha256", "name", "created_at", "rotated_at", "revoked_at")

Signature = tuple[int, int, int]  # (inode, size, mtime_ns): changes with every write


class KeyFileError(ValueError):
    """The key file cannot be read, or a line of it is malformed (the message names it)."""


class KeyFileUnreadable(KeyFileError):
    """The file could not be read (an I/O error: it may pass), as opposed to malformed."""


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    sha256: str
    name: str = ""
    created_at: float | None = None  # None: read from a ``tenant:sha256hex`` line
    rotated_at: float | None = None
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def revoked(self, at: float) -> KeyRecord:
        return self if self.revoked_at is not None else replace(self, revoked_at=at)

    def to_json(self) -> str:
        # the fields by hand: dataclasses.asdict deep-copies each value, and was 3/4 of the
        # time a 10k-key file took to write
        return json.dumps(
            {
                "id": self.id,
                "tenant": self.tenant,
                "sha256": self.sha256,
                "name": self.name,
                "created_at": self.created_at,
                "rotated_at": self.rotated_at,
                "revoked_at": self.revoked_at,
            },
            separators=(",", ":"),
        )


@dataclass(frozen=True)
class Parsed:
    """A key file as read (or written): its records, the signature of the file they are, and
    each line's record, so that reading the file again parses only the lines that changed (a
    line's record depends on the line alone)."""

    records: tuple[KeyRecord, ...]
    signature: Signature | None
    lines: Mapping[str, KeyRecord] = field(default_factory=dict, repr=False)


def issue(tenant: str, name: str, now: float) -> tuple[KeyRecord, str]:
    """A new key for ``tenant``: its record and the key itself (which nothing stores)."""
    key = new_api_key()
    return KeyRecord(new_key_id(), tenant, hash_key(key), name, created_at=now), key


def parse(text: str, source: str) -> list[KeyRecord]:
    return parse_lines(text, source, {})[0]


def parse_lines(
    text: str, source: str, known: Mapping[str, KeyRecord]
) -> tuple[list[KeyRecord], dict[str, KeyRecord]]:
    """The records of ``text`` and each line's record; a line in ``known`` (read before) is
    not parsed again."""
    records: list[KeyRecord] = []
    lines: dict[str, KeyRecord] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        record = known.get(line)
        if record is None:
            where = f"{source}:{number}"
            record = _json_record(line, where) if line[0] == "{" else _legacy(line, where)
        records.append(record)
        lines[line] = record
    _check_unique(records, source)
    return records, lines


def _legacy(line: str, where: str) -> KeyRecord:
    tenant, sep, digest = line.partition(":")
    digest = digest.strip().lower()
    if not sep or not tenant.strip() or not _HEX64.match(digest):
        raise KeyFileError(f"{where}: expected a JSON key record or 'tenant:sha256hex'")
    return KeyRecord(id=f"file-{digest[:12]}", tenant=_tenant(tenant.strip(), where), sha256=digest)


def _tenant(tenant: str, where: str) -> str:
    """A tenant the Admin API can name (purge, stats, policy) and Redis keys can hold."""
    if error := tenant_error(tenant):
        raise KeyFileError(f"{where}: {error}")
    return tenant


def _json_record(line: str, where: str) -> KeyRecord:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise KeyFileError(f"{where}: not JSON ({exc.msg})") from None
    except ValueError as exc:  # a number of over 4,300 digits (int_max_str_digits)
        raise KeyFileError(f"{where}: not a key record ({exc})") from None
    if not isinstance(value, dict) or set(value) - set(_FIELDS):
        raise KeyFileError(f"{where}: a key record has exactly the fields {', '.join(_FIELDS)}")
    texts = {name: value.get(name, "") for name in ("id", "tenant", "sha256", "name")}
    if not all(isinstance(v, str) for v in texts.values()):
        raise KeyFileError(f"{where}: id, tenant, sha256 and name must be strings")
    if not texts["id"] or not texts["tenant"] or not _HEX64.match(texts["sha256"]):
        raise KeyFileError(f"{where}: a key record needs an id, a tenant and a sha256 (hex)")
    times: dict[str, float | None] = {}
    for name in ("created_at", "rotated_at", "revoked_at"):
        at = value.get(name)
        if at is not None and (isinstance(at, bool) or not isinstance(at, int | float)):
            raise KeyFileError(f"{where}: {name} must be Unix seconds or null")
        times[name] = None if at is None else float(at)
    return KeyRecord(
        texts["id"],
        _tenant(texts["tenant"], where),
        texts["sha256"],
        texts["name"],
        times["created_at"],
        times["rotated_at"],
        times["revoked_at"],
    )


def _check_unique(records: Sequence[KeyRecord], source: str) -> None:
    ids = [r.id for r in records]
    hashes = [r.sha256 for r in records]
    if len(set(ids)) != len(ids):
        raise KeyFileError(f"{source}: a key id appears twice")
    if len(set(hashes)) != len(hashes):
        raise KeyFileError(f"{source}: the same key (sha256) appears twice")


class LockedFile:
    """A file shared by several processes (module doc): its signature, an exclusive ``flock``
    of ``.<name>.lock`` beside it for a change, and an atomic, durable write. The key file,
    and the routers' per-tenant limits file beside it (``services.router.tenant_limits``)."""

    def __init__(self, path: Path, mode: int = 0o600) -> None:
        """``mode``: of a file this creates (a replaced file keeps its own)."""
        self.path = path
        self._mode = mode
        self._lock_path = path.with_name(f".{path.name}.lock")

    def signature(self) -> Signature | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, content: str) -> None:
        old = self.signature()
        mode = os.stat(self.path).st_mode & 0o777 if old is not None else self._mode
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(content)
                handle.flush()
                os.fchmod(handle.fileno(), mode)
                os.fsync(handle.fileno())
            if old is not None:  # later than the file it replaces, however coarse the clock
                stamp = max(time.time_ns(), old[2] + 1_000)
                os.utime(tmp, ns=(stamp, stamp))
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class KeyFile(LockedFile):
    """The key file at ``path``: read it, see that it changed, change it safely."""

    def read(self) -> tuple[list[KeyRecord], Signature]:
        """The records and the signature of the file they were read from."""
        parsed = self.load()
        assert parsed.signature is not None
        return list(parsed.records), parsed.signature

    def load(self, last: Parsed | None = None) -> Parsed:
        """The file as it is now; the lines ``last`` holds are not parsed again."""
        try:
            with open(self.path, "rb") as handle:
                st = os.fstat(handle.fileno())
                text = handle.read().decode("utf-8")
        except FileNotFoundError:
            raise KeyFileError(f"API key file {self.path} does not exist") from None
        except OSError as exc:
            raise KeyFileUnreadable(f"cannot read the API key file {self.path}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise KeyFileError(f"the API key file {self.path} is not UTF-8: {exc}") from None
        records, lines = parse_lines(text, str(self.path), {} if last is None else last.lines)
        return Parsed(tuple(records), (st.st_ino, st.st_size, st.st_mtime_ns), lines)

    def update(
        self,
        change: Callable[[list[KeyRecord]], list[KeyRecord]],
        *,
        create: bool = False,
        last: Parsed | None = None,
    ) -> Parsed:
        """Applies ``change`` to the records under the lock and writes the result; a missing
        file is an error unless ``create`` (then ``change`` gets no records). ``last``: the
        file as this process read it last, not read again while the file is still that one
        (its signature: a 10k-key file took 151 ms to parse at each change). Returns the
        records written and the file's signature taken under the same lock: one taken after
        it could be another process's next change, whose records this one never read."""
        with self._locked():
            if create and not self.path.exists():
                read = Parsed((), None)
            elif last is not None and last.signature == self.signature():
                read = last
            else:
                read = self.load(last)
            changed = change(list(read.records))
            _check_unique(changed, str(self.path))
            # a record the change left as it was keeps its JSON line (rendering every record
            # again was most of the rest of a change's time); a legacy line is rewritten
            line_of = {id(r): line for line, r in read.lines.items() if line[0] == "{"}
            lines = [line_of.get(id(record)) or record.to_json() for record in changed]
            self._write(HEADER + "".join(line + "\n" for line in lines))
            return Parsed(tuple(changed), self.signature(), dict(zip(lines, changed, strict=True)))
