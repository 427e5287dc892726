"""The billing outbox: the commits of answers served while prefix-cache could not take them.

An answer whose FINAL commit prefix-cache did not acknowledge (it was down, restarting, or its
Redis was) is still served, marked ``cost.estimated``; its commits — a WARM carrying the
request (no cache read claimed when the first WARM failed too: the answer was priced without
one) and the FINAL — are appended to the journal (``<ROUTER_DATA_DIR>/billing-outbox.jsonl``,
fsynced) before the answer goes out, and replayed in order every ``ROUTER_OUTBOX_RETRY_S``
until prefix-cache acknowledges them. Both commits are idempotent by their key (the request id
and the attempt), so a replay that raced an earlier one bills once. A router that dies replays
its journal when it starts again. Without a data directory the outbox is in memory only (lost
with the router; said once at start).

A commit refused for the request's own fault (INVALID_ARGUMENT, FAILED_PRECONDITION: the WARM
expired) is logged at ERROR with its key and dropped: retrying cannot succeed. Any other
refusal (prefix-cache down or overloaded, an internal token rejected during a rotation, an
internal error) keeps the entry for the next round, logged at WARNING with its status: billing
is never dropped for a fault that may pass.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import json
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.errors import Code
from services.router.dependencies import CallFailed, PrefixPort

log = logging.getLogger("cachemesh.router.outbox")

JOURNAL_NAME = "billing-outbox.jsonl"
# The request's own fault: retrying cannot succeed. Any other refusal is worth another try.
_FINAL = (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION)
# prefix-cache down or not answering: the round stops (no point sending the rest now)
_UNREACHABLE_CODES = (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.CANCELLED)


class _Sent(enum.Enum):
    """What became of an entry sent to prefix-cache."""

    SETTLED = "settled"  # every commit acknowledged, or refused for good
    KEPT = "kept"  # refused for now: sent again next round
    UNREACHABLE = "unreachable"  # prefix-cache down: the round stops


@dataclass(frozen=True)
class Entry:
    id: str
    commits: tuple[pc.CommitRequest, ...]


class Journal:
    """Append-only lines ``{"add": id, "commits": [base64...]}`` and ``{"done": id}``; a torn
    last line (a crash mid-write) is ignored; emptied once nothing is pending."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / JOURNAL_NAME

    def load(self) -> list[Entry]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        pending: dict[str, Entry] = {}
        for line in lines:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by a crash mid-append: its answer was never sent
            if "add" in item:
                commits = tuple(
                    pc.CommitRequest.FromString(base64.b64decode(raw)) for raw in item["commits"]
                )
                pending[item["add"]] = Entry(item["add"], commits)
            else:
                pending.pop(item.get("done", ""), None)
        return list(pending.values())

    def append(self, record: dict[str, object]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def clear(self) -> None:
        with self.path.open("w") as handle:
            os.fsync(handle.fileno())


class BillingOutbox:
    def __init__(
        self, prefix: PrefixPort, journal: Journal | None, deadline_s: float, retry_s: float
    ) -> None:
        self._prefix = prefix
        self._journal = journal
        self._deadline_s = deadline_s
        self._retry_s = retry_s
        self._pending: dict[str, Entry] = {}
        self._lock = asyncio.Lock()  # one flush at a time
        # The journal's writes with the pending map they describe: a flush that empties the
        # journal must see an entry whose line was just appended, or it would erase that line.
        self._journal_lock = asyncio.Lock()
        if journal is not None:
            for entry in journal.load():
                self._pending[entry.id] = entry
            if self._pending:
                log.info("billing outbox: %d answers to bill from the journal", len(self._pending))
        else:
            log.warning(
                "billing outbox in memory only (ROUTER_DATA_DIR unset): answers served while "
                "prefix-cache is down are lost from billing if the router dies before it is back"
            )

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def keep(self, commits: Sequence[pc.CommitRequest]) -> None:
        """Records the commits durably (fsync) before the answer they bill is sent."""
        entry = Entry(secrets.token_hex(8), tuple(commits))
        if self._journal is None:
            self._pending[entry.id] = entry
            return
        raw = [base64.b64encode(c.SerializeToString()).decode() for c in commits]
        async with self._journal_lock:
            await asyncio.to_thread(self._journal.append, {"add": entry.id, "commits": raw})
            self._pending[entry.id] = entry

    async def flush(self) -> int:
        """Sends what is pending, in order, until prefix-cache is unreachable; an entry it
        refuses otherwise stays for the next round and the next entries are sent (one entry
        must not hold all billing back). Returns how many entries were settled."""
        settled = 0
        async with self._lock:
            for entry in list(self._pending.values()):
                outcome = await self._send(entry)
                if outcome is _Sent.UNREACHABLE:
                    break
                if outcome is _Sent.KEPT:
                    continue
                settled += 1
                if self._journal is None:
                    self._pending.pop(entry.id, None)
                    continue
                async with self._journal_lock:
                    self._pending.pop(entry.id, None)
                    if self._pending:
                        await asyncio.to_thread(self._journal.append, {"done": entry.id})
                    else:
                        await asyncio.to_thread(self._journal.clear)
        if settled:
            log.info("billing outbox: billed %d answers, %d pending", settled, self.pending)
        return settled

    async def run(self) -> None:
        """Replays every ``retry_s`` (cancelled at shutdown, after a last ``flush``)."""
        while True:
            if self._pending:
                await self.flush()
            await asyncio.sleep(self._retry_s)

    async def _send(self, entry: Entry) -> _Sent:
        for commit in entry.commits:
            try:
                await self._prefix.commit(commit, self._deadline_s)
            except CallFailed as exc:
                if exc.code in _UNREACHABLE_CODES:
                    return _Sent.UNREACHABLE
                if exc.code not in _FINAL:
                    log.warning(
                        "billing outbox: prefix-cache did not take the %s commit %s (%s); "
                        "%d answers kept for the next try",
                        pc.CommitPhase.Name(commit.phase),
                        commit.request_id,
                        exc.code.name,
                        len(self._pending),
                    )
                    return _Sent.KEPT
                log.error(
                    "billing outbox: prefix-cache refused the %s commit %s (%s: %s); dropped",
                    pc.CommitPhase.Name(commit.phase),
                    commit.request_id,
                    exc.code.name,
                    exc.details,
                )
                return _Sent.SETTLED
        return _Sent.SETTLED
