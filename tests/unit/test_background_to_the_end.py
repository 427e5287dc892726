"""``to_the_end``: a change begun runs to its end though its caller is cancelled."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.common.background import to_the_end


class Said(Exception):
    """An error its raiser has said already."""


async def _change(gate: asyncio.Event, done: list[str], error: Exception | None) -> str:
    await gate.wait()
    done.append("applied")
    if error is not None:
        raise error
    return "applied"


async def test_the_outcome_reaches_a_caller_that_stays() -> None:
    gate, done = asyncio.Event(), list[str]()
    gate.set()
    assert await to_the_end(_change(gate, done, None)) == "applied"
    with pytest.raises(Said):
        await to_the_end(_change(gate, done, Said()), said=(Said,))


@pytest.mark.parametrize("error", [None, Said("said"), RuntimeError("a fault of ours")])
async def test_a_cancelled_caller_leaves_the_change_running_and_its_error_read(
    caplog: pytest.LogCaptureFixture, error: Exception | None
) -> None:
    """The change ends after its caller's cancel; an error of a type said already is read
    quietly (no "exception was never retrieved"), any other logged."""
    gate, done = asyncio.Event(), list[str]()
    caller = asyncio.ensure_future(to_the_end(_change(gate, done, error), said=(Said,)))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert done == []
    with caplog.at_level(logging.ERROR, logger="cachemesh.server"):
        gate.set()
        for _ in range(5):  # the change's turn, then its done callback's
            await asyncio.sleep(0)
    assert done == ["applied"]
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    if isinstance(error, RuntimeError):
        (line,) = logged
        assert "whose caller had gone, failed" in line.getMessage()
        assert line.exc_info is not None and line.exc_info[1] is error
    else:
        assert logged == []
