"""Snapshots of the semantic cache on disk: one file, versioned, checksummed, pickle-free.

Layout of ``<data dir>/semantic-cache.snapshot``: one line of JSON (the header: format and
version, embedder version, dimension, count, created_at_ms, the byte lengths of the two
payload parts and the sha256 of the payload), then the payload: the vectors as a NumPy
``.npy`` of float32 rows (loaded with ``allow_pickle=False``) followed by one JSON line per
entry, least recently used first. Since format 3 each entry carries its ``expires_at_ms``
(fixed at store); formats 1 and 2 are still read, their entries without it (the cache then
migrates them: created_at + the namespace's TTL when they are restored). A snapshot is
written to a temporary file in the same directory, fsynced and renamed over the old one (then
the directory is fsynced), so a crash leaves either the old snapshot or the new one. Reading
never falls back: a file that is present but unreadable, truncated or altered raises
``SnapshotError`` naming it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.semantic_cache.records import Answer, CacheContents, Entry
from services.semantic_cache.wal import fsync_directory

FORMAT = "cachemesh-semantic-cache-snapshot"
# 2: wal_seq and header_sha256 (the header is checksummed too); 3: entries' expires_at_ms
FORMAT_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
_EXPIRY_VERSION = 3  # from this version on, every entry must carry its expires_at_ms
SNAPSHOT_NAME = "semantic-cache.snapshot"
_TMP_PREFIX = f".{SNAPSHOT_NAME}."
_TMP_SUFFIX = ".tmp"
_MAX_HEADER_BYTES = 64 * 1024


class SnapshotError(RuntimeError):
    """A snapshot file is present but cannot be used; the message names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"semantic-cache snapshot {path}: {reason}")
        self.path = path


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

    def prepare(self) -> None:
        """Creates the directory, proves it writable and removes temp files of a crashed save."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=self.directory, prefix=".probe.", suffix=_TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
        for stale in self.directory.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)

    def load(self) -> Snapshot | None:
        """The snapshot, or None when there is none yet."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotError(self.path, f"cannot be read ({exc})") from exc
        return decode(data, self.path)

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
    payload: list[bytes | memoryview] = [
        npy_header.getvalue(),
        rows.reshape(-1).view(np.uint8).data,
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
        "entries_bytes": len(entries),
        "sha256": digest.hexdigest(),
    }
    header["header_sha256"] = _header_digest(header)
    line = json.dumps(header, separators=(",", ":")).encode() + b"\n"
    return [line, *payload]


def decode(data: bytes, path: Path) -> Snapshot:
    end = data.find(b"\n", 0, _MAX_HEADER_BYTES)
    if end < 0:
        raise SnapshotError(path, "no header line (not a snapshot, or truncated)")
    try:
        header = _header(json.loads(data[:end]))
        payload = data[end + 1 :]
        expected = header["vectors_bytes"] + header["entries_bytes"]
        if len(payload) != expected:
            raise ValueError(
                f"truncated or padded: {len(payload)} payload bytes, expected {expected}"
            )
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise ValueError("sha256 mismatch: the file was altered or damaged")
        count, dim = header["count"], header["dim"]
        vectors = np.load(io.BytesIO(payload[: header["vectors_bytes"]]), allow_pickle=False)
        if vectors.dtype != np.dtype("<f4") or vectors.shape != (count, dim):
            raise ValueError(
                f"vectors are {vectors.dtype} {vectors.shape}, not float32 ({count}, {dim})"
            )
        lines = payload[header["vectors_bytes"] :].decode().splitlines()
        if len(lines) != count:
            raise ValueError(f"{len(lines)} entries, the header says {count}")
        with_expiry = header["version"] >= _EXPIRY_VERSION
        entries = tuple(
            entry_from_json(json.loads(line), require_expiry=with_expiry) for line in lines
        )
        contents = CacheContents(
            header["embedder_version"], dim, entries, vectors.astype(np.float32, copy=False)
        )
    except (ValueError, KeyError, TypeError, EOFError, OSError, binascii.Error) as exc:
        raise SnapshotError(path, f"unreadable: {exc}") from exc
    return Snapshot(header["created_at_ms"], contents, header.get("wal_seq", 0))


def _header(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    if raw.get("version") not in _READABLE_VERSIONS:
        raise ValueError(
            f"format version {raw.get('version')!r}, this build reads {_READABLE_VERSIONS}"
        )
    if raw["version"] >= 2 and raw.get("header_sha256") != _header_digest(raw):
        raise ValueError("header sha256 mismatch: the header was altered or damaged")
    for name in ("dim", "count", "created_at_ms", "vectors_bytes", "entries_bytes"):
        if _int(raw, name) < 0:
            raise ValueError(f"header field {name} is negative")
    if "wal_seq" in raw and _int(raw, "wal_seq") < 0:  # absent in snapshots before the log
        raise ValueError("header field wal_seq is negative")
    _str(raw, "embedder_version")
    _str(raw, "sha256")
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
        "payload": base64.b64encode(answer.payload).decode("ascii"),
        "stop_reason": answer.stop_reason,
        "output_tokens": answer.output_tokens,
        "has_tool_use": answer.has_tool_use,
    }


def entry_from_json(raw: Any, *, require_expiry: bool = False) -> Entry:
    """An entry; without ``require_expiry`` one lacking ``expires_at_ms`` (written before
    entries carried it) comes back with None, for the cache to migrate."""
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
