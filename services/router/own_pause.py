"""Telling the router's own pause from a replica's silence.

A watchdog timer on the event loop (``SilenceWatch``'s look, ``_stalled_after``'s wait) that
fires late by more than ``LATE_SHARE`` of its limit says that the router itself did not run
meanwhile: its process was stopped (SIGSTOP, a debugger), its host swapped, a long collection
held the loop. The replica's chunks that came meanwhile are still in the socket, not yet handed
over by gRPC, so the time the router did not run is no silence of the replica's: the watch
looks again once the stream could deliver them, and never cuts on the router's own pause.
"""

from __future__ import annotations

# A timer this share of its limit late (a look's interval of ``SilenceWatch``) means the
# router did not run; less is an event loop's usual jitter, counted as silence.
LATE_SHARE = 0.1


def paused_s(due: float, now: float, limit_s: float) -> float:
    """The time the router did not run before a timer due at ``due`` (loop time) fired at
    ``now``: its lateness if more than ``LATE_SHARE`` of ``limit_s``, else 0."""
    late = now - due
    return late if late > LATE_SHARE * limit_s else 0.0
