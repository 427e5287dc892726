"""services.common.polled_file: a re-read that hangs (a FIFO in the file's place, a stuck NFS
mount) is waited for by ``fresh`` only until its start plus the wait, never again after: it made
every request wait the whole ``FRESH_WAIT_S`` for as long as it hung (48-60 ms ->
1,051-1,070 ms a request on a real stack)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from services.common import polled_file
from services.common.keyfile import Signature
from services.common.polled_file import PolledFile


class Ticks:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Hung:
    """A file whose signature changes once and whose load never returns until released."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self.sig = 1
        self.release = threading.Event()
        self.loading = threading.Event()

    @property
    def path(self) -> Path:
        return self._path

    def signature(self) -> Signature:
        return (self.sig, 0, 0)

    def load(self, last: str) -> tuple[str, Signature]:
        self.loading.set()
        self.release.wait(30)
        return "new", self.signature()


def _threads() -> tuple[list[threading.Thread], Callable[[Callable[[], None]], None]]:
    started: list[threading.Thread] = []

    def start(job: Callable[[], None]) -> None:
        thread = threading.Thread(target=job, daemon=True)
        started.append(thread)
        thread.start()

    return started, start


def _without_waiting(call: Coroutine[Any, Any, str]) -> str:
    """What ``call`` returns, when it returns without suspending once (no wait at all)."""
    try:
        call.send(None)
    except StopIteration as returned:
        value: str = returned.value
        return value
    call.close()
    raise AssertionError("waited again for a hung re-read")


async def test_a_hung_reread_is_waited_for_once_then_never_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(polled_file, "FRESH_WAIT_S", 0.2)
    source = _Hung(tmp_path / "limits")
    ticks = Ticks()
    started, start = _threads()
    log = logging.getLogger("test.polled_file")
    file: PolledFile[str] = PolledFile(
        source,
        ("old", (0, 0, 0)),
        monotonic=ticks,
        poll_s=0.25,
        start=start,
        log=log,
        what="limits file",
        contents="limits",
        unreadable=OSError,
        malformed=ValueError,
    )
    ticks.now += 1  # past poll_s: this call sees the change and starts the re-read
    with caplog.at_level(logging.WARNING, logger="test.polled_file"):
        # whether a call waits is told by whether it suspends, not by real time
        waiting = asyncio.ensure_future(file.fresh())
        await asyncio.sleep(0)  # its first step ran: it waits for the re-read it started
        assert not waiting.done(), "the re-read it started was not waited for"
        assert await asyncio.wait_for(waiting, 5) == "old"  # its 0.2 s: the re-read hangs
        assert source.loading.wait(5)
        told = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(told) == 1 and "limits" in told[0]  # by the wait that ran out
        ticks.now += 1  # later requests: the re-read started 1 s ago, past the wait
        for _ in range(3):
            assert _without_waiting(file.fresh()) == "old"
            ticks.now += 1
    stuck = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(stuck) == 1  # one WARNING a hung re-read
    source.release.set()
    for thread in started:
        thread.join(5)
    assert await file.fresh() == "new"
    assert len(started) == 1


async def test_the_warning_names_the_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(polled_file, "FRESH_WAIT_S", 0.05)
    source = _Hung(tmp_path / "tenant-limits")
    ticks = Ticks()
    started, start = _threads()
    file: PolledFile[str] = PolledFile(
        source,
        ("old", (0, 0, 0)),
        monotonic=ticks,
        poll_s=0.25,
        start=start,
        log=logging.getLogger("test.polled_file"),
        what="limits file",
        contents="limits",
        unreadable=OSError,
        malformed=ValueError,
    )
    ticks.now += 1
    with caplog.at_level(logging.WARNING, logger="test.polled_file"):
        for _ in range(4):
            assert await file.fresh() == "old"
            ticks.now += 1
    stuck = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(stuck) == 1, stuck
    assert str(tmp_path / "tenant-limits") in stuck[0] and "re-read" in stuck[0]
    source.release.set()
    for thread in started:
        thread.join(5)
