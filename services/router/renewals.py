"""When to renew a lease another process holds for this one (L1's lookup lease, the answer
ledger's claim) while the call it covers runs.

Every third of the lease (``RENEW_SHARE``); after a renewal that failed, again after
``RETRY_SHARE`` of it, the wait doubling after each failure up to the normal third (a store that
is overloaded rather than down is not sent renewals 6.7x as often as normally), and the last try
no later than ``RETRY_SHARE`` before the lease lapses, counted from the start of the last try
that renewed it (a try after the lapse could only be refused): of 30 s, tries at 10, 11.5, 14.5,
20.5 and 28.5 s. Then the lease is given up. A renewal that succeeds restarts the schedule.
"""

from __future__ import annotations

from collections.abc import Callable

RENEW_SHARE = 1 / 3
RETRY_SHARE = 0.05


class Renewals:
    """One lease's schedule: ``wait_s`` before the next try, told of each try's outcome."""

    def __init__(self, lease_s: float, clock: Callable[[], float]) -> None:
        """``lease_s``: the lease's life without a renewal, just taken; ``clock``: seconds."""
        self.lease_s = lease_s
        self._clock = clock
        self._renewed = clock()  # when the last try that renewed it started
        self._retry_s = 0.0  # the wait after the last failure (0: the last try renewed)
        self.failures = 0  # tries that failed, of this lease
        self.wait_s = lease_s * RENEW_SHARE

    @property
    def least_s(self) -> float:
        """The first wait after a failure, and the margin kept before the lapse."""
        return self.lease_s * RETRY_SHARE

    @property
    def normal_s(self) -> float:
        return self.lease_s * RENEW_SHARE

    def since_renewed_s(self) -> float:
        return self._clock() - self._renewed

    def renewed(self, tried_at: float, lease_s: float | None = None) -> None:
        """The try that started at ``tried_at`` renewed the lease (for ``lease_s`` if given)."""
        if lease_s is not None:
            self.lease_s = lease_s
        self._renewed, self._retry_s = tried_at, 0.0
        self.wait_s = self.normal_s

    def failed(self) -> bool:
        """A try failed: True to try again after ``wait_s``, False to give the lease up (its
        last try is due no later than now)."""
        self.failures += 1
        self._retry_s = min(self.normal_s, max(self.least_s, self._retry_s * 2))
        now = self._clock()
        last_try = self._renewed + self.lease_s - self.least_s
        if last_try <= now:
            return False
        self.wait_s = min(self._retry_s, last_try - now)
        return True
