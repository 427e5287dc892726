"""The signals that stop a service (SIGTERM, SIGINT), held back while it starts.

A service's ``__main__`` calls ``hold_stop_signals`` before its imports: until the event loop
has its handlers (``server.run_main``), a SIGTERM is kept pending instead of killing the process
(the default action: exit 143, no drain), then delivered, and the service drains and exits 0.
Only the standard library here: it runs before the service's own (slow) imports. The threads
started while they are held (gRPC's, a tokenizer's) keep them blocked, so the main thread takes
them, as it must; a child process started from such a thread would inherit the block (the
services start none)."""

from __future__ import annotations

import signal

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def hold_stop_signals() -> None:
    """Blocks the stop signals in this thread (and the threads it starts from now on): a
    signal sent meanwhile stays pending until ``release_stop_signals``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    """Unblocks them: one pending is delivered now (to the handlers installed by then)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
