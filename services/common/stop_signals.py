"""The signals that stop a service (SIGTERM, SIGINT), held back while it starts.

A service's ``__main__`` calls ``hold_stop_signals`` before its imports: until the event loop
has its handlers (``server.run_main``), a SIGTERM is kept pending instead of killing the process
(the default action: exit 143, no drain), then delivered, and the service drains and exits 0.
Only the standard library here: it runs before the service's own (slow) imports. The threads
started while they are held (gRPC's, a tokenizer's) keep them blocked, so the main thread takes
them, as it must; a child process started from such a thread would inherit the block (the
services start none).

Once the loop has its handlers (``stop_on_signals``), the first stop signal sets ``stop`` (the
drain); a second one ends the process by that signal's default action (exit 143 / 130), as
any stop signal did before they were held: a start that hangs is not left to SIGKILL. A second
signal sent while they are still held (the imports) merges with the first: POSIX keeps one
pending signal of a kind."""

from __future__ import annotations

import asyncio
import logging
import signal

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def hold_stop_signals() -> None:
    """Blocks the stop signals in this thread (and the threads it starts from now on): a
    signal sent meanwhile stays pending until ``release_stop_signals``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    """Unblocks them: one pending is delivered now (to the handlers installed by then)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """The loop's handlers of the stop signals: the first sets ``stop``; one while ``stop`` is
    set (a second signal: the service is starting, or draining) ends the process at once by
    the signal's default action, its drain and last steps skipped (what a SIGKILL skips)."""
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, _stop_or_end, signum, stop)


def _stop_or_end(signum: int, stop: asyncio.Event) -> None:
    if not stop.is_set():
        stop.set()
        return
    name = signal.Signals(signum).name
    logging.getLogger("cachemesh.server").warning(
        "%s while already stopping: exiting at once (exit %d), the drain and its last steps "
        "skipped",
        name,
        128 + signum,
    )
    signal.signal(signum, signal.SIG_DFL)  # the action before the loop's handler: the end
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    signal.raise_signal(signum)
