"""Whether a server's drain ran out of its grace period (``CACHEMESH_GRACE_S``).

gRPC then cancels the calls still running: their callers get UNAVAILABLE ("Cancelling all
calls"), while each handler sees a cancel, as when its own caller leaves. A call cut so is
the server's failure, a caller's cancel is not: the one ``GraceEnd`` of a server, set by its
drain just before gRPC cancels the calls (``server.run_service``), tells them apart (the
SERVER spans of ``rpc_tracing``, the router's access line and metrics).
"""

from __future__ import annotations

# what a call cut at the grace's end is recorded with (its caller got gRPC's own words)
GRACE_ENDED = "the server stopped: its grace period (CACHEMESH_GRACE_S) ended before the call"


class GraceEnd:
    """Set once, when the drain's grace period ends and gRPC cancels the calls left."""

    def __init__(self) -> None:
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    def end(self) -> None:
        self._ended = True
