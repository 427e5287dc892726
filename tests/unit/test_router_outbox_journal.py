"""The billing outbox's journal on its own: loaded whole whatever size each read returns, and
held by one router at a time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common.env import ConfigError
from services.router.outbox_journal import JOURNAL_NAME, Journal


def _commit(key: str) -> list[pc.CommitRequest]:
    return [pc.CommitRequest(tenant="t", request_id=key, phase=pc.COMMIT_PHASE_FINAL)]


def test_short_reads_lose_no_acknowledged_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read returns fewer bytes than asked (Linux: at most 2 GiB a read; here 37 bytes, which
    end mid-line): the journal is read to its end, every entry is loaded and readable, and only
    the torn line after the file's last newline is cut."""
    journal = Journal(tmp_path)
    journal.load()
    keys = [f"r{i}#1" for i in range(40)]
    for i, key in enumerate(keys):
        journal.add(f"e{i}", _commit(key))
    journal.done("e3")
    journal.sync()
    journal.close()
    path = tmp_path / JOURNAL_NAME
    whole = path.stat().st_size
    with path.open("a") as handle:
        handle.write('{"add": "x", "commits": ["AAA')  # a crash came mid-append
    real_pread = os.pread

    def short_pread(fd: int, length: int, offset: int) -> bytes:
        return real_pread(fd, min(length, 37), offset)

    monkeypatch.setattr(os, "pread", short_pread)
    again = Journal(tmp_path)
    pending = again.load()
    assert pending == [f"e{i}" for i in range(40) if i != 3]
    assert [again.read(entry)[0].request_id for entry in pending] == keys[:3] + keys[4:]
    assert path.stat().st_size == whole  # the torn line cut, nothing before it
    again.close()


def test_a_second_journal_on_the_directory_is_refused_until_the_first_is_closed(
    tmp_path: Path,
) -> None:
    """Two routers on one ROUTER_DATA_DIR would each append at their own idea of the file's
    end, overwriting each other's acknowledged entries: the second is refused at start-up,
    naming the variable; once the first is closed (its process ended) the directory is free."""
    first = Journal(tmp_path)
    first.load()
    first.add("a", _commit("a#1"))
    first.sync()
    with pytest.raises(ConfigError, match="ROUTER_DATA_DIR: another router is using"):
        Journal(tmp_path)
    first.add("b", _commit("b#1"))  # the first goes on, its entries whole
    first.sync()
    first.close()
    again = Journal(tmp_path)
    assert [again.read(entry)[0].request_id for entry in again.load()] == ["a#1", "b#1"]
    again.close()
