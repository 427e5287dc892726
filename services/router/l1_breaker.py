"""semantic-cache's Lookups left alone after timeouts in a row: for every tenant when L1 hangs,
for one tenant when only that tenant's Lookups time out.

L1's embedder batches fairly per tenant, so a tenant keeping hundreds of requests in flight
times its own Lookups out behind its own backlog while the others' are answered in
milliseconds. One breaker for all of them let that tenant's timeouts leave L1 alone for every
tenant (their cached repeats paid the model, their answers not stored). So a first Lookup that
timed out counts toward leaving L1 alone for everyone (``breaker.semantic_breaker``: its
WARNING line, ``cachemesh_router_breaker_opens_total{dependency="semantic-cache"}``) only when
no other tenant's Lookup was answered while it waited: L1 answered nobody else, as in a hang
(SIGSTOP: nothing answers, three timeouts of any tenants leave it alone, as before), or the
tenant is the only one L1 served meanwhile. Every timeout also counts toward leaving L1 alone
for its tenant alone, by the same rule (``BREAKER_AFTER`` in a row, ``ROUTER_SEMANTIC_BREAKER_S``,
then one of its requests tries it): its requests stop paying a timeout each, and stop adding to
their own backlog. That tenant's WARNING line names it; ``tenant_left_alone`` counts it
(``cachemesh_router_l1_tenant_breaker_opens_total``, without the tenant: tenant names are
unbounded) once a run, not at each trial that times out meanwhile; the skips are
``cachemesh_router_degraded_total``'s, as every skip is.

Only the tenants whose Lookups are timing out have a breaker of their own, at most
``TENANT_BREAKERS`` (the least recently failed forgotten first: it tries L1 again), so a flood
of tenant names cannot grow the router. An answer from L1 after the hang ends every tenant's
breaker (those timeouts were the hang's). Not thread-safe: the event loop's.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable

from services.router.breaker import Breaker, Dependency, semantic_breaker

log = logging.getLogger("cachemesh.router")

# the tenants with a breaker of their own at most (those with Lookups timing out in a row)
TENANT_BREAKERS = 1024


def _nothing(_: Dependency) -> None:
    pass


class SemanticBreakers:
    def __init__(
        self,
        open_s: float,
        clock: Callable[[], float],
        hung: Callable[[Dependency], None] = _nothing,
        tenant_left_alone: Callable[[], None] = lambda: None,
    ) -> None:
        """``open_s``: ROUTER_SEMANTIC_BREAKER_S (0: never left alone); ``clock``: seconds
        (monotonic); ``hung``: told as a hang of L1 starts (its breaker for every tenant);
        ``tenant_left_alone``: told as L1 is first left alone for one tenant (not at a failed
        trial after, nor while L1 is left alone for everyone)."""
        self._open_s = open_s
        self._tenant_left_alone = tenant_left_alone
        self._clock = clock
        self._all = semantic_breaker(open_s, clock, hung)
        self._tenants: OrderedDict[str, Breaker] = OrderedDict()
        # the latest answers of the last two tenants L1 answered: (tenant, when), newest first
        self._answers: list[tuple[str, float]] = []

    def open(self, tenant: str) -> bool:
        """No Lookup of ``tenant`` now (its caller skips L1). After the wait, one caller tries
        L1 for every tenant (or for its tenant), told False."""
        if self._all.open():
            return True
        if self._all.tripped:
            return False  # this call is L1's trial for every tenant
        own = self._tenants.get(tenant)
        return own is not None and own.open()

    def tripped(self, tenant: str) -> bool:
        """L1 left alone for ``tenant`` (for everyone, or for it) and no Lookup of it answered
        since; asking claims no trial."""
        own = self._tenants.get(tenant)
        return self._all.tripped or (own is not None and own.tripped)

    def failed(self, tenant: str, sent: float) -> None:
        """``tenant``'s first Lookup, sent at ``sent`` (on ``clock``), timed out."""
        if self._last_other_answer(tenant) <= sent:
            self._all.failed()  # L1 answered no other tenant while it waited
        own = self._tenants.get(tenant)
        if own is None:
            own = self._tenants[tenant] = self._tenant_breaker(tenant)
            if len(self._tenants) > TENANT_BREAKERS:
                self._tenants.popitem(last=False)
        else:
            self._tenants.move_to_end(tenant)
        own.failed()

    def answered(self, tenant: str) -> None:
        """A Lookup of ``tenant`` was answered: its run of timeouts ends, and every tenant's
        run toward leaving L1 alone for all."""
        now = self._clock()
        if self._answers and self._answers[0][0] == tenant:
            self._answers[0] = (tenant, now)
        else:
            self._answers = [(tenant, now), *self._answers[:1]]
        if self._all.tripped:
            self._tenants.clear()  # the hang's timeouts: every tenant uses L1 again
        self._all.answered()
        own = self._tenants.pop(tenant, None)
        if own is not None:
            own.answered()

    def tenants_tracked(self) -> int:
        return len(self._tenants)

    def _last_other_answer(self, tenant: str) -> float:
        for answered, at in self._answers:
            if answered != tenant:
                return at
        return -math.inf

    def _tenant_breaker(self, tenant: str) -> Breaker:
        open_s = self._open_s

        def opened(timeouts: int, again: bool) -> None:
            if self._all.tripped:
                return  # L1 left alone for everyone: the hang's lines say so
            if again:
                log.debug(
                    "semantic-cache: a Lookup of tenant %s tried after %g s timed out; left "
                    "alone for it",
                    tenant,
                    open_s,
                )
                return
            self._tenant_left_alone()
            log.warning(
                "semantic-cache: %d Lookups of tenant %s in a row timed out while other "
                "tenants' were answered (its own backlog in L1); no Lookup of tenant %s sent "
                "for %g s at a time (ROUTER_SEMANTIC_BREAKER_S) until one answers: its "
                "requests are answered by the model, their answers not stored; other tenants "
                "use L1 as usual",
                timeouts,
                tenant,
                tenant,
                open_s,
            )

        def closed(timeouts: int) -> None:
            log.info(
                "semantic-cache answers tenant %s again after %d of its Lookups in a row timed "
                "out; its Lookups and Stores sent as usual",
                tenant,
                timeouts,
            )

        return Breaker(open_s, self._clock, opened, closed)
