"""The API keys a router or HTTP front accepts: the shared key file, re-read when it changes.

Why a file and not Redis: the key file is what the router and the HTTP front already read
(CACHEMESH_API_KEYS_FILE, its ``tenant:sha256hex`` lines still work), checking a key then needs
no network call and no service that could be down (the stack's Redis is optional, keys are
not), and a shared volume is all several routers on one host (or compose) need. Each process
looks at the file's (inode, size, mtime) at most every ``poll_s`` (at most 1 s), on the path of
a key check, and when it changed re-reads it in a worker thread (``polled_file.PolledFile``):
the key check never waits for the file, the keys read last answer until the new ones are
complete. A key created, revoked or rotated by any router's Admin API is accepted or refused
everywhere within ``poll_s`` plus one re-read (two when the change lands during one; a re-read
parses only the lines that changed), and at once by that router (its changes, made in worker
threads, and its re-reads take turns: none shows an older file over a newer one; a change does
not parse the file again when this router holds it as it is). Writers take the file's lock
(``keyfile.KeyFile``), so concurrent Admin calls on several routers never lose a change.

A file that turns malformed (a bad hand edit) is logged at ERROR, naming the line, and the
keys read last stay in force until it is fixed.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.keyfile import (
    KeyFile,
    KeyFileError,
    KeyFileUnreadable,
    KeyRecord,
    Parsed,
    Signature,
    hash_key,
    issue,
    parse,
    tenant_error,
)
from services.common.polled_file import FileSource, PolledFile, Start, in_a_thread

log = logging.getLogger("cachemesh.keys")

MAX_NAME = 128
# a change's stamp is at least this after the key's latest (``KeyStore._stamp``)
STAMP_STEP_S = 1e-6


class KeyStoreError(ValueError):
    """A change the store refuses (the message says why, naming the field)."""


class UnknownKey(KeyStoreError):
    """No key has this id."""


class KeyRevoked(KeyStoreError):
    """The change needs an active key, and this one is revoked."""


class KeyChanged(KeyStoreError):
    """A conditional change (a rotation or revocation) whose key is no longer as its caller
    saw it (a rotation came first): nothing changed; the message names what did."""


@dataclass(frozen=True)
class Seen:
    """A key as a conditional rotation's or revocation's caller saw it: its ``rotated_at`` in
    nanoseconds as a reply gave it (``stamp_nanos``), None when it was never rotated."""

    rotated_at_ns: int | None


def stamp_nanos(at: float) -> int:
    """A record's stamp as the Admin API gives it (a Timestamp's nanoseconds): the one
    conversion, so that a stamp sent back compares equal to the record it came from."""
    return round(at * 1e9)


class SeedFileError(KeyFileError):
    """The seed file (the keys a missing key file is created with) is unreadable or malformed:
    its own fault, not the key file's."""


@dataclass(frozen=True)
class _Snapshot:
    parsed: Parsed
    tenant_by_hash: dict[str, str]  # active keys only


def _snapshot(parsed: Parsed) -> _Snapshot:
    return _Snapshot(parsed, {r.sha256: r.tenant for r in parsed.records if r.active})


def _reloaded(keyfile: KeyFile, last: _Snapshot) -> tuple[_Snapshot, Signature | None]:
    """The key file read again, parsing only the lines that changed since ``last``."""
    parsed = keyfile.load(last.parsed)
    return _snapshot(parsed), parsed.signature


def check_tenant(tenant: str) -> None:
    if error := tenant_error(tenant):
        raise KeyStoreError(error)


class KeyStore:
    def __init__(
        self,
        keyfile: KeyFile,
        monotonic: Callable[[], float],
        wall: Callable[[], float],
        poll_s: float,
        start: Start | None = None,
    ) -> None:
        """``monotonic`` paces the checks for changes, ``wall`` stamps the records; ``start``
        runs a re-read off the event loop (default: in a thread of its own)."""
        self._file = keyfile
        self._wall = wall
        parsed = keyfile.load()  # start-up: a bad file stops the process
        # One change or re-read of the file at a time, each showing the file as it was then:
        # two Admin changes run in worker threads, and one that showed its (older) file after
        # the other had shown its own put a revoked key back in force until the next poll.
        self._keys: PolledFile[_Snapshot] = PolledFile(
            FileSource(keyfile, lambda last: _reloaded(keyfile, last)),
            (_snapshot(parsed), parsed.signature),
            monotonic=monotonic,
            poll_s=poll_s,
            start=start or in_a_thread("cachemesh-keys-reload"),
            log=log,
            what="API key file",
            contents="keys",
            unreadable=KeyFileUnreadable,
            malformed=KeyFileError,
            loaded=lambda keys: f"API keys reloaded: {len(keys.tenant_by_hash)} active",
        )

    @classmethod
    def open(
        cls,
        path: Path,
        monotonic: Callable[[], float],
        wall: Callable[[], float],
        poll_s: float,
        seed: Path | None = None,
        start: Start | None = None,
    ) -> KeyStore:
        """The store of ``path``; when it does not exist and ``seed`` is given, it is created
        with the seed file's keys (compose: a volume seeded from the mounted secret)."""
        keyfile = KeyFile(path)
        if seed is not None and keyfile.signature() is None:
            try:
                seeded = parse(_read(seed), str(seed))
            except KeyFileError as exc:
                raise SeedFileError(str(exc)) from None
            keyfile.update(lambda records: records or seeded, create=True)
        store = cls(keyfile, monotonic, wall, poll_s, start)
        if not store._keys.held().parsed.records:
            raise KeyFileError(f"API key file {path} holds no keys")
        return store

    # --- the Gateway's question -------------------------------------------------------------
    def tenant_for(self, key: str) -> str | None:
        """The tenant of an active key, or None (unknown, revoked, replaced by a rotation)."""
        return self._keys.current().tenant_by_hash.get(hash_key(key))

    async def checked_tenant_for(self, key: str) -> str | None:
        """``tenant_for`` after the re-read of a change this check sees, or of one being read
        (waited for on the event loop, at most ``polled_file.FRESH_WAIT_S``): a process with no
        request since another one's change answered its next check by the keys read before,
        a key created there refused (UNAUTHENTICATED 5 s after its creation) and a revoked
        one served."""
        return (await self._keys.fresh()).tenant_by_hash.get(hash_key(key))

    # --- the Admin API's --------------------------------------------------------------------
    def records(self) -> tuple[KeyRecord, ...]:
        return self._keys.current().parsed.records

    def create(self, tenant: str, name: str) -> tuple[KeyRecord, str]:
        """A new key of ``tenant``: its record and the key itself (shown once, stored nowhere)."""
        check_tenant(tenant)
        _check_name(name)
        record, key = issue(tenant, name, self._wall())
        self._update(lambda records: [*records, record])
        return record, key

    def revoke(self, key_id: str, seen: Seen | None = None) -> KeyRecord:
        """The key ``key_id`` is refused from now on, stamped after its latest stamp (``_stamp``:
        a router whose clock is behind the one that rotated it does not date the revocation
        before the rotation); revoked already: as it was.

        With ``seen`` (the optimistic form, as ``rotate``'s) only if the key is still as its
        caller saw it, checked under the file's lock: else ``KeyChanged`` naming the rotation
        made since, nothing changed (an operator revoking the key they looked at does not
        revoke the new secret another operator's rotation just gave out, maybe in use). A key
        revoked already is as it was whatever ``seen`` says: no secret of it is in force, so
        there is none the check could keep."""

        def revoked(record: KeyRecord) -> KeyRecord:
            if record.active and seen is not None:
                _check_seen(record, seen, "revoke it still, revoke again")
            return record.revoked(self._stamp(record))

        return self._change(key_id, revoked)

    def rotate(self, key_id: str, seen: Seen | None = None) -> tuple[KeyRecord, str]:
        """The key ``key_id`` gets a new secret; the old one is refused from now on.

        With ``seen`` (the optimistic form) only if the key is still as its caller saw it,
        checked under the file's lock: else ``KeyChanged`` naming the rotation made since,
        nothing changed (of two conditional rotations at once, one succeeds, the other's
        caller learns its rotation was not made instead of holding a key already dead).

        Two rotations of one key (two Admin calls at once, on one router or several) both
        succeed, one after the other under the file's lock: the last one written wins, and
        the other's new key is refused from then on, as after any later rotation. Each is
        stamped under that lock (a stamp taken before it, as it was, gave the losing key the
        later ``rotated_at`` in 7 of 20 races) and after the record's latest stamp
        (``_stamp``: routers' clocks differ, and one 2 s behind the other, rotating second,
        stamped the key in force 2 s before the dead one), so the key in force has the latest
        ``rotated_at``: a caller whose ``rotated_at`` is not ListKeys' holds a dead key."""
        issued: list[str] = []

        def rotated(record: KeyRecord) -> KeyRecord:
            if not record.active:
                raise KeyRevoked(f"key {key_id} is revoked: create a new key instead")
            if seen is not None:
                _check_seen(record, seen, "replace it still, rotate again")
            now = self._stamp(record)  # under the file's lock: stamps in the order written
            fresh, key = issue(record.tenant, record.name, now)
            issued.append(key)
            return KeyRecord(
                record.id,
                record.tenant,
                fresh.sha256,
                record.name,
                record.created_at,
                rotated_at=now,
            )

        record = self._change(key_id, rotated)
        return record, issued[-1]

    # --- inside -----------------------------------------------------------------------------
    def _stamp(self, record: KeyRecord) -> float:
        """The time of a change of ``record`` (under the file's lock): this router's clock, but
        after the record's latest stamp, which another router's clock, maybe ahead, wrote, so
        that stamps follow the order the changes were written in."""
        latest = max(record.created_at or 0.0, record.rotated_at or 0.0)
        return max(self._wall(), latest + STAMP_STEP_S)

    def _change(self, key_id: str, change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord:
        changed: list[KeyRecord] = []

        def apply(records: list[KeyRecord]) -> list[KeyRecord]:
            for i, record in enumerate(records):
                if record.id == key_id:
                    records[i] = change(record)
                    changed.append(records[i])
                    return records
            raise UnknownKey(f"no API key has the id {key_id[:80]!r} (see ListKeys)")

        self._update(apply)
        return changed[-1]

    def _update(self, change: Callable[[list[KeyRecord]], list[KeyRecord]]) -> None:
        def written(last: _Snapshot) -> tuple[_Snapshot, Signature | None]:
            parsed = self._file.update(change, last=last.parsed)
            return _snapshot(parsed), parsed.signature

        self._keys.write(written)


def _check_seen(record: KeyRecord, seen: Seen, still: str) -> None:
    """A conditional change's check (``rotate``'s and ``revoke``'s), under the file's lock:
    ``KeyChanged`` unless ``record`` is as ``seen``; ``still`` says how to make the change
    anyway ("<do> it still, <verb> again")."""
    now_ns = None if record.rotated_at is None else stamp_nanos(record.rotated_at)
    if now_ns == seen.rotated_at_ns:
        return
    if seen.rotated_at_ns is None:
        expected = "never rotated (if_never_rotated)"
    else:
        expected = f"rotated at {_utc(seen.rotated_at_ns)} (if_rotated_at)"
    # never rotated: the stamp sent is one this key never had (another key's, or a typo)
    found = "has never been rotated" if now_ns is None else f"was last rotated at {_utc(now_ns)}"
    raise KeyChanged(
        f"key {record.id} {found}, not {expected} as this request expected; nothing "
        f"changed: the key in force is the one of that rotation (see ListKeys); to {still} "
        "with its rotated_at"
    )


def _utc(ns: int) -> str:
    """A stamp as RFC 3339 UTC exactly as ``cachemesh admin --json`` prints a reply's (a
    Timestamp's JSON form: 0, 3, 6 or 9 fraction digits), so a person finds it there."""
    stamp = Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp.ToJsonString()


# Unicode's control (Cc) and format (Cf) characters, surrogates and line / paragraph
# separators: a bidi override (U+202E) reorders a listing of keys, a zero-width space makes two
# names that look the same. The zero-width (non-)joiners stay: emoji and several scripts use them.
_NOT_IN_A_NAME = {"Cc", "Cf", "Cs", "Zl", "Zp"}
_JOINERS = {"\u200c", "\u200d"}


def _check_name(name: str) -> None:
    if len(name) > MAX_NAME or any(
        unicodedata.category(ch) in _NOT_IN_A_NAME and ch not in _JOINERS for ch in name
    ):
        raise KeyStoreError(
            f"name must be one line of at most {MAX_NAME} characters, without control characters "
            "(Unicode Cc or Cf: no bidi overrides or invisible characters)"
        )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"cannot read the API key seed file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise KeyFileError(
            f"the API key seed file {path} is not UTF-8 (byte {exc.start}): save it as UTF-8"
        ) from None
