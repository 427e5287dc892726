"""What a model call's two ends agree on about its deadline.

A model replica ends an answer still running at its call's deadline itself, ``end_margin_s``
before it (and a call whose provider reported its prompt's usage, no token yet: a start, then
the end): the ``end.interrupted`` it sends then carries the usage the provider reported so
far, which must reach the router before the gRPC deadline ends the call (after that nothing
more is delivered, and the router could bill only its estimate). The router takes an
interrupted end within ``END_MARGIN_S`` of the call's deadline as the deadline's cut.
"""

from __future__ import annotations

END_MARGIN_S = 0.25
END_MARGIN_FRACTION = 0.05  # of a shorter deadline: 0.1 s of 2 s
# At least this, or half a deadline shorter than twice it: the replica's last chunks (a start
# and the end, for a call cut before its first token) and its status must reach the router
# within the margin. 5% of a 45 ms call (a client's 50 ms, less the router's reply margin)
# is 2.25 ms, less than that took on a loaded 2-core machine: the router got the start and
# then the gRPC deadline, and billed Plan's estimate in 6 calls of 20 (0 of 5,000 cache-write
# tokens the provider reported).
END_MARGIN_FLOOR_S = 0.05


def end_margin_s(deadline_s: float) -> float:
    """How long before a call's deadline (``deadline_s`` from its start) its replica ends an
    answer still running: 0.25 s, or 5% of a deadline shorter than 5 s, but at least 0.05 s
    (half of a deadline shorter than 0.1 s)."""
    deadline_s = max(deadline_s, 0.0)
    floor = min(END_MARGIN_FLOOR_S, deadline_s / 2)
    return min(END_MARGIN_S, max(END_MARGIN_FRACTION * deadline_s, floor))
