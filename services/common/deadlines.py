"""What a model call's two ends agree on about its deadline.

A model replica ends an answer still running at its call's deadline itself, ``end_margin_s``
before it: the ``end.interrupted`` it sends then carries the usage the provider reported so
far, which must reach the router before the gRPC deadline ends the call (after that nothing
more is delivered, and the router could bill only its estimate). The router takes an
interrupted end within ``END_MARGIN_S`` of the call's deadline as the deadline's cut.
"""

from __future__ import annotations

END_MARGIN_S = 0.25
END_MARGIN_FRACTION = 0.05  # of a shorter deadline: 0.1 s of 2 s


def end_margin_s(deadline_s: float) -> float:
    """How long before a call's deadline (``deadline_s`` from its start) its replica ends an
    answer still running: 0.25 s, or 5% of a deadline shorter than 5 s."""
    return min(END_MARGIN_S, END_MARGIN_FRACTION * max(deadline_s, 0.0))
