"""Passive outlier ejection of model replicas (as Envoy's): a replica whose calls fail
``after_failures`` times in a row is left out of the choice for a cool-off that doubles on
each re-ejection (``base_s``, at most ``max_s``); when it ends one request probes it, and its
answer ending whole brings the replica back (a failure ejects it again, for twice as long).

What counts as a failure is the replica's: UNAVAILABLE, no first report within the time it
was given and predicted to need, a cut mid-answer. A request it refuses (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED) and a caller that leaves count for nothing. When every replica of a model
is ejected they are used all the same: ejection never refuses a request by itself.

One event loop owns it: no lock. Times come from the caller's clock (seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

_MAX_DOUBLINGS = 64  # the cool-off reaches any cap long before; 2.0 ** n stays finite


@dataclass(frozen=True)
class EjectionPolicy:
    after_failures: int = 3  # consecutive failures that eject a replica (0 = never)
    base_s: float = 5.0  # the first cool-off; each re-ejection doubles it ...
    max_s: float = 300.0  # ... up to this

    def __post_init__(self) -> None:
        if self.after_failures < 0:
            raise ValueError(f"after_failures must be >= 0, got {self.after_failures}")
        if self.base_s <= 0 or self.max_s < self.base_s:
            raise ValueError(
                f"need 0 < base_s <= max_s, got base_s={self.base_s}, max_s={self.max_s}"
            )


@dataclass
class _Health:
    failures: int = 0  # consecutive, since the last success
    ejections: int = 0  # consecutive ejections (0: in service)
    until: float = float("-inf")  # the cool-off's end
    probing: bool = False  # the probe after the cool-off is in flight


@dataclass(frozen=True)
class Ejection:
    """A replica just ejected: for the request's span and the metric."""

    replica: str
    failures: int
    cool_off_s: float


@dataclass
class ReplicaHealth:
    policy: EjectionPolicy = field(default_factory=EjectionPolicy)
    _replicas: dict[str, _Health] = field(default_factory=dict)

    def ejected(self, replica: str, now: float) -> bool:
        """Left out of the choice now: cooling off, or its probe is in flight."""
        health = self._replicas.get(replica)
        if health is None or health.ejections == 0:
            return False
        return now < health.until or health.probing

    def split(self, replicas: Sequence[str], now: float) -> tuple[list[str], list[str]]:
        """(the replicas in service or due a probe, the ejected ones), in order."""
        ejected = [r for r in replicas if self.ejected(r, now)]
        return [r for r in replicas if r not in ejected], ejected

    def sending(self, replica: str, now: float) -> bool:
        """A call goes to ``replica``; True when it is the probe after the cool-off."""
        health = self._replicas.get(replica)
        if health is None or health.ejections == 0 or health.probing or now < health.until:
            return False
        health.probing = True
        return True

    def succeeded(self, replica: str) -> None:
        """A call ended with its whole answer: back in service, the count and the cool-off
        reset. Not its first token: a replica that cuts every answer after it must fail."""
        self._replicas.pop(replica, None)

    def released(self, replica: str, probe: bool) -> None:
        """The call ended counting for nothing (a refused request, a caller that left): a
        probe's turn passes to the next request."""
        health = self._replicas.get(replica)
        if probe and health is not None:
            health.probing = False

    def failed(self, replica: str, now: float, probe: bool) -> Ejection | None:
        """The replica failed the call; the ejection, when this failure ejects it."""
        if self.policy.after_failures == 0:
            return None
        health = self._replicas.setdefault(replica, _Health())
        health.failures += 1
        if probe and health.ejections > 0:
            health.probing = False  # the probe failed: ejected again, for twice as long
        elif health.ejections > 0 or health.failures < self.policy.after_failures:
            return None  # ejected already (a call sent before, or with all ejected)
        health.ejections = min(health.ejections + 1, _MAX_DOUBLINGS)
        cool_off_s = min(self.policy.base_s * 2.0 ** (health.ejections - 1), self.policy.max_s)
        health.until = now + cool_off_s
        return Ejection(replica, health.failures, cool_off_s)
