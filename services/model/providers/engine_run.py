"""A self-hosted engine's run (``GenerateStart.engine_instance``), learned off the call path.

The run is asked of the engine (llama-server's ``/props``, ``openai_wire.engine_run``) by a
refresh in the background, at most once each ``REFRESH_S`` while calls come (a call's start
asks for one when due) and bounded in all by ``REFRESH_BOUND_S``; a call sends the run as
known when its chat's headers came, and never waits for it. Before, each call asked /props
beside its chat and its GenerateStart waited for the answer: a hung /props held every start
2.03 s (beyond the router's stall bound for a warm prefill predicted under 0.5 s), one
trickling a byte every 1.5 s held it 34.7 s (httpx's timeout is per read), and a /props
answering broken JSON failed every call UNAVAILABLE.

So a call may carry the run before a restart its engine made since the last refresh (until
the refresh after it, ~``REFRESH_S``): for prefix-cache it is then the current run's call,
as every call was before runs were sent (its read predicted by the view, lowered by the
engine's own report at the FINAL), and the next call carrying the new run wipes the view. A
failing refresh (a timeout, an error, an answer that is not JSON) makes the run "" (not known:
prefix-cache changes nothing) until one succeeds; an engine without /props (vLLM: 404) is
asked again only each ``ABSENT_RETRY_S``. Each change of state is logged once, not per call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("cachemesh.model")

REFRESH_S = 1.0  # the most often the run is asked while calls come
REFRESH_BOUND_S = 2.0  # a refresh's whole time, however its engine trickles the answer
ABSENT_RETRY_S = 300.0  # an engine without /props is asked again this seldom


class NoProps(Exception):
    """The engine has no /props (a 404: vLLM, SGLang): it tells no run."""


class EngineRun:
    def __init__(
        self,
        fetch: Callable[[], Awaitable[str]],
        name: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        refresh_s: float = REFRESH_S,
        bound_s: float = REFRESH_BOUND_S,
        absent_retry_s: float = ABSENT_RETRY_S,
    ) -> None:
        """``fetch``: the engine's run ("" if it names none), raising ``NoProps`` for an engine
        without /props and anything else for a failure; ``name``: the engine's, for the log
        (no credentials: the caller's)."""
        self._fetch = fetch
        self._name = name
        self._clock = clock
        self._refresh_s = refresh_s
        self._bound_s = bound_s
        self._absent_retry_s = absent_retry_s
        self.run = ""  # the run as last learned ("": not known)
        self._state = ""  # the last refresh's outcome, logged when it changes
        self._next_at: float | None = None  # when a refresh is due (None: now)
        self._task: asyncio.Task[None] | None = None

    def refresh_if_due(self) -> asyncio.Task[None] | None:
        """Starts a refresh in the background if one is due and none is running (never
        waits for it); the refresh started (None: none)."""
        if self._task is not None and not self._task.done():
            return None
        if self._next_at is not None and self._clock() < self._next_at:
            return None
        self._next_at = self._clock() + self._refresh_s
        self._task = asyncio.get_running_loop().create_task(self._refresh())
        return self._task

    async def _refresh(self) -> None:
        try:
            run = await asyncio.wait_for(self._fetch(), self._bound_s)
        except NoProps:
            self.run = ""
            self._next_at = self._clock() + self._absent_retry_s
            self._now(
                "absent",
                logging.INFO,
                f"has no /props: no run told, asked again each {self._absent_retry_s:g} s",
            )
            return
        except TimeoutError:
            self._failed(f"did not answer /props within {self._bound_s:g} s")
            return
        except Exception as exc:  # any failure (broken JSON, a refused connection): not known;
            # a cancel (the stop's close) is no Exception and goes through
            self._failed(f"failed /props ({type(exc).__name__})")
            return
        self.run = run
        if run:
            self._now(
                "known", logging.INFO, "tells its run again" if self._state else "tells its run"
            )
        else:
            self._now("unnamed", logging.INFO, "names no run in /props: none told")

    def _failed(self, what: str) -> None:
        self.run = ""
        self._now(f"failed: {what}", logging.WARNING, f"{what}: its run not told until it answers")

    def _now(self, state: str, level: int, message: str) -> None:
        if state != self._state:
            self._state = state
            log.log(level, "engine %s %s", self._name, message)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
