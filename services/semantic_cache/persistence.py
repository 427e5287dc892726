"""Snapshots of the semantic cache on disk: one file, versioned, checksummed, pickle-free.

Layout of ``<data dir>/semantic-cache.snapshot``: one line of JSON (the header: format and
version, embedder version, dimension, count, created_at_ms, the byte lengths of the payload's
three parts and the sha256 of the payload), then the payload: the vectors as a NumPy ``.npy``
of float32 rows (loaded with ``allow_pickle=False``), one JSON line of the recent purges (each
tenant purged within the purge guard's window and when, so a restart keeps refusing the
Stores that predate the purge) and one JSON line per entry, least recently used first. Since
format 3 each entry carries its ``expires_at_ms`` (fixed at store); formats 1 and 2 are still
read, their entries without it (the cache then migrates them: created_at + the namespace's TTL
when they are restored). Before format 4 the recent purges were the header's
``purged_at_ms`` (absent before they were kept): a few thousand purges then made a header line
too long to read back, so they moved to the payload, which has no such bound; those snapshots
are still read, headers of up to ``_MAX_HEADER_BYTES`` included. A snapshot is
written to a temporary file in the same directory, fsynced and renamed over the old one (then
the directory is fsynced), so a crash leaves either the old snapshot or the new one. Reading
never falls back: a file that is present but unreadable, truncated or altered raises
``SnapshotError`` naming it. Reading streams (``SnapshotStore.open``): the payload's sha256
and the entry lines are read a chunk and a line at a time, and the vectors are left in the
file for the restore to read a slice of rows at a time, so a restore holds them only once.

One process at a time: ``prepare`` takes an exclusive ``flock`` of ``<data dir>/.lock`` (and
writes its pid and host name there) before it touches anything, held until ``close``; one that
finds it held raises ``DirectoryInUse`` (two processes on one directory delete each other's
log segments and interleave their sequence numbers).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import io
import json
import os
import socket
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.common.files import fsync_directory
from services.common.private_files import open_private, private_directory
from services.semantic_cache.answers import payload_has_unparsed_tool_call
from services.semantic_cache.records import (
    BEFORE_FORMAT_4_SCOPE,
    UNSTAMPED_SCOPE,
    Answer,
    CacheContents,
    Entry,
)

FORMAT = "cachemesh-semantic-cache-snapshot"
# 2: wal_seq and header_sha256 (the header is checksummed too); 3: entries' expires_at_ms;
# 4: the recent purges in the payload (purges_bytes), no longer in the header
FORMAT_VERSION = 4
_READABLE_VERSIONS = (1, 2, 3, 4)
_EXPIRY_VERSION = 3  # from this version on, every entry must carry its expires_at_ms
_PURGES_VERSION = 4  # from this version on, the recent purges are a part of the payload
SNAPSHOT_NAME = "semantic-cache.snapshot"
WAL_NAME = "wal"  # the write-ahead log's segments' directory, beside the snapshot
_TMP_PREFIX = f".{SNAPSHOT_NAME}."
_TMP_SUFFIX = ".tmp"
# A header is a few hundred bytes since format 4; one of format 3 carries the recent purges
# (up to ~85 bytes a tenant): this reads those of up to ~190k tenants, written before format 4.
_MAX_HEADER_BYTES = 16 << 20
_READ_CHUNK = 8 << 20  # bytes read at once to check the sha256
LOCK_NAME = ".lock"


class SnapshotError(RuntimeError):
    """A snapshot file is present but cannot be used; the message names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"semantic-cache snapshot {path}: {reason}")
        self.path = path


class DirectoryInUse(RuntimeError):
    """Another process holds the data directory's lock; ``holder`` is what it wrote there
    (``pid N on HOST``), or "" when it cannot be read yet."""

    def __init__(self, directory: Path, holder: str) -> None:
        super().__init__(f"{directory}: {LOCK_NAME} is held by {holder or 'another process'}")
        self.directory = directory
        self.holder = holder


@dataclass(frozen=True)
class Snapshot:
    created_at_ms: int
    contents: CacheContents
    wal_seq: int = 0  # the last write-ahead-log record it contains (0 = none)


class SnapshotStore:
    """The snapshot file of one data directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / SNAPSHOT_NAME
        self._lock_fd: int | None = None

    def prepare(self) -> None:
        """Creates the directory, takes its lock (``DirectoryInUse`` if another process holds
        it: nothing is touched then), proves it writable and removes temp files of a crashed
        save. The lock is held until ``close``; a prepare that fails after taking it (a full
        disk, no permission) lets go of it, so a retry is not refused by this process."""
        private_directory(self.directory)
        took = self._lock_fd is None
        if took:
            self._lock_fd = _lock(self.directory / LOCK_NAME)
        try:
            fd, probe = tempfile.mkstemp(dir=self.directory, prefix=".probe.", suffix=_TMP_SUFFIX)
            os.close(fd)
            os.unlink(probe)
            for stale in self.directory.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
                stale.unlink(missing_ok=True)
        except BaseException:
            if took:
                self.close()
            raise

    def close(self) -> None:
        """Releases the directory's lock (the process is done with it)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> Snapshot | None:
        """The snapshot with its vectors in memory, or None when there is none yet."""
        opened = self.open()
        if opened is None:
            return None
        with opened:
            contents = CacheContents(
                opened.embedder_version,
                opened.dim,
                opened.entries,
                opened.rows(0, opened.count),
                opened.purged_at_ms,
            )
            return Snapshot(opened.created_at_ms, contents, opened.wal_seq)

    def open(self) -> SnapshotFile | None:
        """The snapshot checked (header, sha256, vector layout) and its entries parsed, its
        vectors left in the file to be read when asked; None when there is none yet."""
        try:
            file = self.path.open("rb")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(self.path, f"cannot be read ({exc})") from exc
        try:
            return SnapshotFile(file, self.path)
        except BaseException:
            file.close()
            raise

    def save(self, contents: CacheContents, created_at_ms: int, wal_seq: int = 0) -> int:
        """Replaces the snapshot atomically; returns its size in bytes."""
        parts = encode(contents, created_at_ms, wal_seq)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    out.write(part)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_directory(self.directory)
        return sum(len(part) if isinstance(part, bytes) else part.nbytes for part in parts)


def _lock(path: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive ``flock``, with this process's pid
    and host written in it; ``DirectoryInUse`` naming the holder if another one holds it."""
    fd = open_private(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            written = os.pread(fd, 256, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        raise DirectoryInUse(path.parent, written.splitlines()[0] if written else "") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def encode(
    contents: CacheContents, created_at_ms: int, wal_seq: int = 0
) -> list[bytes | memoryview]:
    """The file as parts (header line, then the payload), without copying the vectors."""
    rows = np.ascontiguousarray(contents.vectors, dtype="<f4")
    npy_header = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy_header, np.lib.format.header_data_from_array_1_0(rows))
    entries = "".join(
        json.dumps(entry_json(e), separators=(",", ":")) + "\n" for e in contents.entries
    ).encode()
    purges = json.dumps(dict(contents.purged_at_ms), separators=(",", ":")).encode() + b"\n"
    payload: list[bytes | memoryview] = [
        npy_header.getvalue(),
        rows.reshape(-1).view(np.uint8).data,
        purges,
        entries,
    ]
    digest = hashlib.sha256()
    for part in payload:
        digest.update(part)
    vectors_bytes = len(payload[0]) + rows.nbytes
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "embedder_version": contents.embedder_version,
        "dim": contents.dim,
        "count": len(contents.entries),
        "created_at_ms": created_at_ms,
        "wal_seq": wal_seq,
        "vectors_bytes": vectors_bytes,
        "purges_bytes": len(purges),
        "entries_bytes": len(entries),
        "sha256": digest.hexdigest(),
    }
    header["header_sha256"] = _header_digest(header)
    line = json.dumps(header, separators=(",", ":")).encode() + b"\n"
    return [line, *payload]


class SnapshotFile:
    """An open snapshot file, checked and its entries parsed; the vectors stay in the file.

    Opening reads the file twice, a chunk at a time: the whole payload for its sha256, then
    the recent purges and the entry lines one by one. ``rows`` reads vectors when asked, into
    a new array, so a restore streams them into the index without holding the file's copy.
    """

    def __init__(self, file: io.BufferedReader, path: Path) -> None:
        self._file, self._path = file, path
        try:
            line = file.readline(_MAX_HEADER_BYTES)
            if len(line) == _MAX_HEADER_BYTES and not line.endswith(b"\n"):
                raise SnapshotError(
                    path,
                    f"no header line in its first {_MAX_HEADER_BYTES:,} bytes (not a snapshot)",
                )
            if not line.endswith(b"\n"):
                raise SnapshotError(path, "no header line (not a snapshot, or truncated)")
            header = _header(json.loads(line))
            start = len(line)
            payload = os.fstat(file.fileno()).st_size - start
            with_purges = header["version"] >= _PURGES_VERSION
            purges_bytes = header["purges_bytes"] if with_purges else 0
            expected = header["vectors_bytes"] + purges_bytes + header["entries_bytes"]
            if payload != expected:
                raise ValueError(
                    f"truncated or padded: {payload} payload bytes, expected {expected}"
                )
            if _sha256(file, start, payload) != header["sha256"]:
                raise ValueError("sha256 mismatch: the file was altered or damaged")
            self.count, self.dim = header["count"], header["dim"]
            self._rows_at = _vectors_offset(file, start, self.count, self.dim)
            if self._rows_at + 4 * self.count * self.dim != start + header["vectors_bytes"]:
                raise ValueError("the vectors do not fill their part of the payload")
            file.seek(start + header["vectors_bytes"])
            purged = header.get("purged_at_ms", {})  # before format 4; absent before kept
            if with_purges:
                purged = json.loads(file.read(purges_bytes))
            self.purged_at_ms = _purged(purged)
            with_expiry = header["version"] >= _EXPIRY_VERSION
            # no entry carried its scope version before format 4's builds had gone: those
            # of an older format are all v1's (not v3's, as one unstamped in the log may be),
            # and so are the log's after it (``unstamped``: that build's, or stamped)
            self.unstamped = UNSTAMPED_SCOPE if with_purges else BEFORE_FORMAT_4_SCOPE
            self.entries = tuple(
                entry_from_json(
                    json.loads(line.decode()),
                    require_expiry=with_expiry,
                    unstamped=self.unstamped,
                )
                for line in file
            )
            if len(self.entries) != self.count:
                raise ValueError(f"{len(self.entries)} entries, the header says {self.count}")
        except (ValueError, KeyError, TypeError, EOFError, OSError, binascii.Error) as exc:
            raise SnapshotError(path, f"unreadable: {exc}") from exc
        self.created_at_ms: int = header["created_at_ms"]
        self.wal_seq: int = header.get("wal_seq", 0)
        self.embedder_version: str = header["embedder_version"]

    def rows(self, start: int, stop: int) -> npt.NDArray[np.float32]:
        """The vectors of entries[start:stop] (a new array)."""
        stop = max(start, min(stop, self.count))
        out = np.empty((stop - start, self.dim), dtype="<f4")
        view = out.reshape(-1).view(np.uint8).data
        offset, done = self._rows_at + 4 * self.dim * start, 0
        try:
            while done < len(view):
                got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
                if got == 0:
                    raise SnapshotError(self._path, "truncated while reading its vectors")
                done += got
        except OSError as exc:
            raise SnapshotError(self._path, f"cannot be read ({exc})") from exc
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SnapshotFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sha256(file: io.BufferedReader, start: int, size: int) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(_READ_CHUNK))
    file.seek(start)
    while size > 0:
        got = file.readinto(buffer[: min(size, _READ_CHUNK)])
        if not got:
            raise EOFError("the file ended before its payload did")
        digest.update(buffer[:got])
        size -= got
    return digest.hexdigest()


def _vectors_offset(file: io.BufferedReader, start: int, count: int, dim: int) -> int:
    """Where the float32 rows begin, after checking the ``.npy`` header at ``start``."""
    file.seek(start)
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
    else:
        raise ValueError(f".npy format {version} is not read")
    if dtype != np.dtype("<f4") or shape != (count, dim) or fortran:
        raise ValueError(f"vectors are {dtype} {shape}, not float32 ({count}, {dim})")
    return file.tell()


def _header(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    version = raw.get("version")
    # The header's own digest first: it covers every field but itself, so a newer build's
    # header verifies too, and a version changed by damage (4 -> 5, or 4 -> 1, which has no
    # digest) is said as damage, not as a newer build's, nor read under that version's layout.
    # Format 1 alone has none; a header that carries one is checked whatever its version says.
    if (version != 1 or "header_sha256" in raw) and raw.get("header_sha256") != _header_digest(raw):
        raise ValueError(
            f"header sha256 mismatch: the header was altered or damaged (it says format "
            f"version {version!r}; this build reads {_READABLE_VERSIONS[0]} to {FORMAT_VERSION})"
        )
    if type(version) is int and version > FORMAT_VERSION:  # a rollback's: its header verifies
        raise ValueError(
            f"format version {version} is a newer build's (this one reads "
            f"{_READABLE_VERSIONS[0]} to {FORMAT_VERSION}): start that build again, or, to run "
            f"this one, move this snapshot and the {WAL_NAME}/ directory beside it aside "
            "together, and L1 starts empty (misses until answered again, nothing served wrong)"
        )
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"format version {raw.get('version')!r}, this build reads {_READABLE_VERSIONS}"
        )
    names = ["dim", "count", "created_at_ms", "vectors_bytes", "entries_bytes"]
    if raw["version"] >= _PURGES_VERSION:
        names.append("purges_bytes")
    for name in names:
        if _int(raw, name) < 0:
            raise ValueError(f"header field {name} is negative")
    if "wal_seq" in raw and _int(raw, "wal_seq") < 0:  # absent in snapshots before the log
        raise ValueError("header field wal_seq is negative")
    _str(raw, "embedder_version")
    _str(raw, "sha256")
    return raw


def _purged(raw: Any) -> dict[str, int]:
    """The recent purges: a map of tenants to the time of each one's last purge."""
    if not isinstance(raw, dict) or not all(
        isinstance(t, str) and isinstance(at, int) and not isinstance(at, bool) and at >= 0
        for t, at in raw.items()
    ):
        raise ValueError("the recent purges are not a map of tenants to times")
    return raw


def _header_digest(header: dict[str, Any]) -> str:
    fields = {k: v for k, v in header.items() if k != "header_sha256"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def entry_json(entry: Entry) -> dict[str, Any]:
    if entry.expires_at_ms is None:
        raise ValueError(f"entry {entry.entry_id}: persisted before its expiry was fixed")
    answer = entry.answer
    return {
        "entry_id": entry.entry_id,
        "tenant": entry.tenant,
        "scope": entry.scope,
        "namespace": entry.namespace,
        "query": entry.query,
        "created_at_ms": entry.created_at_ms,
        "expires_at_ms": entry.expires_at_ms,
        "embedder_version": entry.embedder_version,
        "scope_version": entry.scope_version,
        "payload": base64.b64encode(answer.payload).decode("ascii"),
        "stop_reason": answer.stop_reason,
        "output_tokens": answer.output_tokens,
        "has_tool_use": answer.has_tool_use,
    }


def entry_from_json(
    raw: Any, *, require_expiry: bool = False, unstamped: str = UNSTAMPED_SCOPE
) -> Entry:
    """An entry; without ``require_expiry`` one lacking ``expires_at_ms`` (written before
    entries carried it) comes back with None, for the cache to migrate; one lacking its
    ``scope_version`` (written before entries carried it) with ``unstamped``."""
    if not isinstance(raw, dict):
        raise ValueError("an entry line is not a JSON object")
    has_tool_use = raw.get("has_tool_use")
    if not isinstance(has_tool_use, bool):
        raise ValueError("entry field has_tool_use is not a boolean")
    answer = Answer(
        payload=base64.b64decode(_str(raw, "payload"), validate=True),
        stop_reason=_str(raw, "stop_reason"),
        output_tokens=_int(raw, "output_tokens"),
        has_tool_use=has_tool_use,
    )
    if has_tool_use:  # stored before the Store read its calls' arguments, it may hold one
        answer = replace(answer, unparsed_tool_call=payload_has_unparsed_tool_call(answer.payload))
    return Entry(
        entry_id=_str(raw, "entry_id"),
        tenant=_str(raw, "tenant"),
        scope=_str(raw, "scope"),
        namespace=_str(raw, "namespace"),
        query=_str(raw, "query"),
        answer=answer,
        created_at_ms=_int(raw, "created_at_ms"),
        embedder_version=_str(raw, "embedder_version"),
        expires_at_ms=_expiry(raw, require_expiry),
        # one written before entries carried it: ``unstamped``
        scope_version=_str(raw, "scope_version") if "scope_version" in raw else unstamped,
    )


def _expiry(raw: dict[str, Any], required: bool) -> int | None:
    if "expires_at_ms" not in raw and not required:
        return None
    expires = _int(raw, "expires_at_ms")
    if expires < _int(raw, "created_at_ms"):  # equal: a TTL of 0 (expired at once)
        raise ValueError("entry field expires_at_ms is before created_at_ms")
    return expires


def _str(raw: dict[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str):
        raise ValueError(f"field {name} is not a string")
    return value


def _int(raw: dict[str, Any], name: str) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"field {name} is not an integer")
    return value
