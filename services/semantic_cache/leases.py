"""Single flight for concurrent identical misses: a lookup lease per (tenant, scope, query).

The model call is made by the router, but identical requests of one scope all reach the same
semantic-cache shard (DESIGN.md shards it by tenant and scope), whichever router replica
sends them; so the shard is where they can meet. The first lookup that misses takes the
lease for its key and its caller makes the model call; an identical lookup arriving while
the lease is held waits, up to its own budget, for the Store that fulfils the lease (then it
is served that entry) or for the lease to end (released: a Store that did not store, or the
lease's age limit, which frees the key when the holder failed without a Store: a waiter
waits no longer than that, then leads). Of the waiters of a lease that ended without an
answer, the first to look again leads; the others wait on its lease in turn. A Store that
stores an entry for the key but does not end its lease (it names another lease, or none)
wakes the waiters all the same (``wake``): they look again, and one that still misses waits
on. A waiter whose budget runs out gets a miss and calls the model itself: a lease never
loses a request.

A lease is owned by the ``request_id`` that took it: a retry of that request (its router died
mid-call and the client sent it again; the router marks its Lookup ``retry``) takes the lease
over and leads, instead of waiting out the age limit of its own dead call; a Lookup with that
id not marked a retry (a duplicate sent to another router at once) waits like any other. The
lease taken over gets a new ``lease_id`` (its waiters wait on): the first call's late Release
or renewal names the old one, and ends or renews nothing.

A lease's id may be the caller's (a fresh random id per Lookup, which it can Release by when
the reply never reaches it), unless a live lease has that id already: ids are unique among
the live leases (a renewal finds its lease by its id), so a reused id is replaced by one
of ours. A Lookup of another request that proposed a live lease's id and does not hold it
(given another, waiting, served, ended early) knows only the id it proposed: its Release by
that id alone (its reply lost) would end the lease that has it, so such a lease is ended by
id alone no more (``end_id``): by its request's Release or Store, or at its age limit. That
holds from the Lookup's start (``proposing``: it may wait on a lease for its whole budget,
and its caller may release meanwhile) to its end, for a lease live at its start and for one
another request takes under that id before it ends.

An id is unique among the live leases only: once a lease has ended, a Lookup of another
request may take a new one under its id, and the first request's late Release or renewal (one
in flight as its Store went, one sent as its Lookup's reply was lost) then named that lease. So
each names its request too (``owner``: its ``request_id``), and acts only on a lease that
request took: a Release by id alone, a renewal, L1's own end of a Lookup whose reply did not
reach its caller (``end_id``, ``renew``), and a Store or Release by request and id (``end``).
A Release or renewal that names no request (a router older than that) is by id alone, as before.

The age limit runs from the take, and from each renewal: the holder renews its lease (by its
``lease_id``) while its model call is on, so a call longer than the age limit keeps its
waiters (and an identical request arriving late does not lead a second, paid, call), while a
holder that died renews nothing and frees the key at the age limit as before. A renewal names
its lease by its tenant, ``lease_id`` and ``request_id`` only (the last unset from a router
older than it), not by the request (a renewal is sent every third of the age limit for as long
as the call runs, and the request may be a megabyte): the live leases are also kept by id, one
id per live lease, so that index is bounded as they are.

A lease that ends without an answer because of what the answer is (a Store refused it: cut at
the request's ``max_tokens``, a refusal, a tool call its namespace does not cache, too large)
marks its key uncacheable for ``UNCACHEABLE_S`` (``mark_uncacheable``): the same request would
get an answer that is not stored either, so nobody is served by waiting for it. The waiters the
Store wakes, and the identical lookups arriving while the mark lives, neither wait nor lead:
each calls the model at once, side by side. Before, one woken waiter led the next call and the
others waited on it in turn, the k-th of n identical requests waiting k - 1 whole model calls
(up to its wait budget). A call that failed (a Release) marks nothing: the next may succeed,
so one waiter leads it and the others wait on it. The mark of an answer cut at ``max_tokens``
holds for requests allowing at most as many tokens (``max_tokens`` is not part of the key: one
allowing more may end whole, so it leads). Marks age on the leases' clock and are kept for at
most ``marks_kept`` keys, all tenants' together, the bound shared fairly (``TenantRecent``),
by a hash of the key (a question may be 16 kB).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import dataclass, field

from services.common.clock import Clock
from services.semantic_cache.recent import TenantRecent

LeaseKey = tuple[str, str, str]  # (tenant, scope, normalised query)
# How long a key stays marked uncacheable after a Store refused its answer for what it is:
# about a waiter's budget (SEMANTIC_CACHE_LEASE_WAIT_S' default); each such refusal restarts it,
# and an answer stored for the key ends it.
UNCACHEABLE_S = 30.0
# The most keys marked uncacheable, all tenants' together: ~200 B each.
MARKS_KEPT = 4096


@dataclass(frozen=True)
class _Mark:
    expires_at_ms: int
    up_to_max_tokens: int | None  # the requests it holds for (None: whatever their max_tokens)


@dataclass
class _Lease:
    expires_at_ms: int
    owner: str = ""  # the request_id that took it ("" = none)
    lease_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Leases:
    def __init__(
        self,
        clock: Clock,
        hold_s: float,
        *,
        uncacheable_s: float = UNCACHEABLE_S,
        marks_kept: int = MARKS_KEPT,
    ) -> None:
        """``clock``: what the leases (and the uncacheable marks) age on; a monotonic one in
        the service (a lease lives in this process only: a step of the wall clock must not
        keep a dead holder's lease for the step, nor end a live one mid-call), the replay's
        virtual clock offline."""
        if hold_s <= 0:
            raise ValueError(f"hold_s must be > 0, got {hold_s}")
        if uncacheable_s < 0:
            raise ValueError(f"uncacheable_s must be >= 0, got {uncacheable_s}")
        self._clock = clock
        self._hold_ms = round(hold_s * 1000)
        self._held: dict[LeaseKey, _Lease] = {}
        self._ids: dict[str, LeaseKey] = {}  # the key of each lease in ``_held``, by its id
        # the ids of live leases that a Lookup of another request proposed too
        # (``proposed_elsewhere``): a Release by such an id alone may come from either, so it
        # ends nothing (``end_id``)
        self._contested: set[str] = set()
        # the ids the Lookups in flight proposed, by tenant and id: the request_id of each
        # such Lookup (``proposing``, until ``proposal_ended``); a lease taken under one of them
        # for another request is contested at its take. As many as the Lookups in flight
        self._proposing: dict[tuple[str, str], list[str]] = {}
        self._uncacheable_ms = round(uncacheable_s * 1000)
        self._marks: TenantRecent[bytes, _Mark] = TenantRecent(marks_kept)

    def __len__(self) -> int:
        return len(self._held)

    @property
    def hold_s(self) -> float:
        """The age limit of a lease from its take or its last renewal."""
        return self._hold_ms / 1000

    def held(self, key: LeaseKey) -> asyncio.Event | None:
        """The event of a live lease on ``key`` (an expired one is ended here)."""
        lease = self._held.get(key)
        if lease is None:
            return None
        if self._clock.now_ms() >= lease.expires_at_ms:
            self.end(key)
            return None
        return lease.done

    def life_s(self, key: LeaseKey) -> float:
        """Seconds until the lease of ``key`` reaches its age limit (0: none is held)."""
        lease = self._held.get(key)
        if lease is None:
            return 0.0
        return max(0.0, (lease.expires_at_ms - self._clock.now_ms()) / 1000)

    def take(self, key: LeaseKey, owner: str = "", lease_id: str = "") -> str:
        """Takes the lease of ``key`` for the request ``owner``; returns its id (what ``end``
        may be given): ``lease_id``, the caller's, unless empty or a live lease's (``_id``).
        Leases past their age limit are ended first, oldest first: a holder that died without
        a Store (and whose key nobody asks again) holds no memory for long."""
        now = self._clock.now_ms()
        self._end_expired(now)
        self.end(key)  # an expired lease of this key: its place in the age order goes too
        lease = _Lease(now + self._hold_ms, owner, self._id(lease_id))
        self._held[key] = lease
        self._ids[lease.lease_id] = key
        self._contest_if_proposed(key, lease)
        return lease.lease_id

    def take_over(self, key: LeaseKey, owner: str, lease_id: str = "") -> str | None:
        """When ``owner`` (not empty) took ``key``'s live lease: a retry of that request leads
        again. The lease is kept (its waiters wait on) with its age limit restarted, under a
        new id (``lease_id``, the retry's, unless empty or a live lease's), returned (else
        None): the first call may still be running on a router that lost its client, and its
        Release or renewal, naming the old id, then ends or renews nothing (it would end the
        lease the retry holds: a waiter would lead a second call)."""
        lease = self._held.get(key)
        if not owner or lease is None or lease.owner != owner or self.held(key) is None:
            return None
        del self._ids[lease.lease_id]
        self._contested.discard(lease.lease_id)
        lease.lease_id = self._id(lease_id)
        self._ids[lease.lease_id] = key
        self._contest_if_proposed(key, lease)
        lease.expires_at_ms = self._clock.now_ms() + self._hold_ms
        self._held[key] = self._held.pop(key)  # the youngest now: the age order holds
        return lease.lease_id

    def _id(self, proposed: str) -> str:
        """``proposed`` (the caller's) if no live lease has it, else a new id of ours: a
        reused id must not name two leases (the first one's renewals would renew the second,
        or nothing)."""
        if proposed and proposed not in self._ids:
            return proposed
        return uuid.uuid4().hex

    def proposed_elsewhere(self, tenant: str, lease_id: str, owner: str) -> None:
        """A Lookup of ``tenant``'s request ``owner`` proposed ``lease_id`` and does not hold
        a lease by it (it waited, was served, was given an id of ours: ``_id``, or ended
        before its check). If a live lease of the tenant has that id, taken by another
        request (or by one without a request_id), that Lookup knows its id too: the lease is
        ended by id alone no more (``end_id``)."""
        key = self._ids.get(lease_id)
        if key is None or key[0] != tenant:
            return
        if owner and self._held[key].owner == owner:
            return  # its own request's lease (a duplicate of its Lookup): its own to end
        self._contested.add(lease_id)

    def proposing(self, tenant: str, lease_id: str, owner: str) -> None:
        """A Lookup of ``tenant``'s request ``owner`` proposing ``lease_id`` begins: a live
        lease with that id is contested now (``proposed_elsewhere``), and so is one taken under
        it for another request until ``proposal_ended``: the Lookup may wait on a lease up to
        its budget, and its caller, its reply lost, releases by the id it proposed. Before, the
        id was contested only at the Lookup's end: a Release during its wait ended the lease
        that had it."""
        self.proposed_elsewhere(tenant, lease_id, owner)
        self._proposing.setdefault((tenant, lease_id), []).append(owner)

    def proposal_ended(self, tenant: str, lease_id: str, owner: str) -> None:
        """The Lookup ``proposing`` began has ended (replied, refused or cancelled)."""
        owners = self._proposing.get((tenant, lease_id))
        if owners is None or owner not in owners:
            return
        owners.remove(owner)
        if not owners:
            del self._proposing[(tenant, lease_id)]

    def proposals(self) -> int:
        """The Lookups in flight that proposed an id (``proposing``, not yet ended)."""
        return sum(len(owners) for owners in self._proposing.values())

    def _contest_if_proposed(self, key: LeaseKey, lease: _Lease) -> None:
        """``lease`` was just taken (or taken over) under its id: contested if a Lookup in
        flight of another request proposed that id (the taker's own proposal aside, once)."""
        owners = self._proposing.get((key[0], lease.lease_id))
        if not owners:
            return
        others = list(owners)
        if lease.owner in others:
            others.remove(lease.owner)  # the taking Lookup's own proposal
        if any(not (other and other == lease.owner) for other in others):
            self._contested.add(lease.lease_id)

    def renew(self, tenant: str, lease_id: str, owner: str | None = None) -> bool:
        """Restarts the age limit of the live lease named ``lease_id`` if ``tenant``'s (its
        holder's model call is still on). False when that lease has ended (stored, released,
        or past its age limit: ended here), or is another tenant's: a late renewal never
        brings a lease back that waiters may have been woken from, and a lease taken since on
        the same key has an id of its own. ``owner``: the request_id of the renewing request;
        then only a lease that request took is renewed: an id is unique among the live leases
        only, so once its lease has ended another request's Lookup may take a lease under it,
        and the first request's late renewal (sent as its Store went) renewed that one. None
        (a router older than RenewRequest.request_id): by tenant and id alone, as before."""
        key = self._ids.get(lease_id)
        if key is None or key[0] != tenant:
            return False
        lease = self._held[key]
        if owner is not None and lease.owner != owner:
            return False
        if self.held(key) is None:
            return False
        lease.expires_at_ms = self._clock.now_ms() + self._hold_ms
        self._held[key] = self._held.pop(key)  # the youngest now: the age order holds
        return True

    def end_id(self, tenant: str, lease_id: str, *, owner: str | None = None) -> bool:
        """Ends ``tenant``'s live lease named ``lease_id`` (``end``): True when one ended.
        ``owner``: the request_id of the request ending it (its Release by id alone, L1's own
        reply to its Lookup abandoned, its Store or Release whose query was not derived): only
        a lease that request took ends, whether another request proposed its id or not. An id
        is unique among the live leases only: a lease taken under it after the first one ended
        (its Lookup over, so not contested) was ended by the first request's late Release.
        None (a router older than ReleaseRequest.request_id): by tenant and id alone, and not
        a lease whose id a Lookup of another request proposed too and does not hold
        (``proposed_elsewhere``): that Lookup, its reply lost, releases by the id it proposed,
        all it knows, and must not end the lease that has it (that lease's waiters would each
        lead a model call while its holder's runs); the holder's own Release by id alone is
        then not told apart, so the lease ends by its request's Release or Store, or at its
        age limit."""
        key = self._ids.get(lease_id)
        if key is None or key[0] != tenant:
            return False
        if owner is None and lease_id in self._contested:
            return False
        return self.end(key, lease_id, owner)

    def wake(self, key: LeaseKey) -> bool:
        """Wakes the waiters of ``key``'s live lease without ending it: an entry was stored for
        ``key`` by a Store that does not end this lease (the late Store of a lease that aged
        out or was taken over, or of a request that did not lead). They look again and are
        served it; one that still misses (another tier) waits on, within its budget, on the
        lease's new event. The lease, its id and owner, its age are unchanged. True when one
        was held."""
        lease = self._held.get(key)
        if lease is None or self.held(key) is None:
            return False
        woken, lease.done = lease.done, asyncio.Event()
        woken.set()
        return True

    def end_owned(self, key: LeaseKey, owner: str) -> bool:
        """Ends the lease of ``key`` (``end``) if the request ``owner`` took it, or a request
        with no ``request_id`` did (its owner unknown): a Store or Release naming no lease (a
        router older than ``lease_id`` there) is its own lease's, or from a request that did
        not lead, which must not end the lease of the one that did. True when one ended."""
        lease = self._held.get(key)
        return lease is not None and lease.owner in ("", owner) and self.end(key)

    def end(self, key: LeaseKey, lease_id: str | None = None, owner: str | None = None) -> bool:
        """Fulfilled (stored) or released: wakes every waiter. With ``lease_id``, only that
        lease is ended (not one another request has taken since); with ``owner`` too, only if
        the request ``owner`` took it (not one another request took under the same id after
        this one's ended). True when one ended."""
        lease = self._held.get(key)
        if lease is None or (lease_id is not None and lease.lease_id != lease_id):
            return False
        # "" is matched by "": a lease taken by a Lookup with no request_id is ended by any
        # other request's Store, Release or abandoned Lookup with none (``end_owned`` too, by
        # design: a Store naming no lease). No router sends an empty one: the Gateway gives a
        # request sent without one an id of its own (``GatewayServicer._accept``, a uuid4,
        # since the first router) before its Lookup; the estimator's replay names each
        # "replay-<i>", bench-router's "router-replay-<i>" (L1 bypassed there); the load
        # tester's client gives each call one, and goes through the Gateway. Only a hand-made
        # call of semantic-cache's API sends none.
        if owner is not None and lease.owner != owner:
            return False
        del self._held[key]
        del self._ids[lease.lease_id]
        self._contested.discard(lease.lease_id)
        lease.done.set()
        return True

    def mark_uncacheable(self, key: LeaseKey, up_to_max_tokens: int | None = None) -> None:
        """A Store refused ``key``'s answer for what it is: for ``UNCACHEABLE_S`` from now,
        ``uncacheable`` says so to identical requests allowing at most ``up_to_max_tokens``
        tokens (an answer cut there; None: any, a refusal or a tool call). A live mark of a
        larger cut, or of any, is kept as wide."""
        tenant, mark = key[0], _mark_key(key)
        now = self._clock.now_ms()
        old = self._marks.get(tenant, mark)
        if old is not None and now < old.expires_at_ms and up_to_max_tokens is not None:
            if old.up_to_max_tokens is None:
                up_to_max_tokens = None
            else:
                up_to_max_tokens = max(up_to_max_tokens, old.up_to_max_tokens)
        self._marks.put(tenant, mark, _Mark(now + self._uncacheable_ms, up_to_max_tokens))

    def uncacheable(self, key: LeaseKey, max_tokens: int) -> bool:
        """A live mark of ``key`` holds for a request allowing ``max_tokens`` tokens: its
        answer would not be stored either, so it neither waits for nor leads a model call."""
        if not len(self._marks):  # the common case: no hash
            return False
        tenant, mark = key[0], _mark_key(key)
        found = self._marks.get(tenant, mark)
        if found is None:
            return False
        if self._clock.now_ms() >= found.expires_at_ms:
            self._marks.remove(tenant, mark)
            return False
        return found.up_to_max_tokens is None or max_tokens <= found.up_to_max_tokens

    def clear_uncacheable(self, key: LeaseKey) -> None:
        """An answer was stored for ``key``: identical requests take turns again."""
        if len(self._marks):
            self._marks.remove(key[0], _mark_key(key))

    def marks(self) -> int:
        """The keys marked uncacheable held (some may have expired unread)."""
        return len(self._marks)

    def _end_expired(self, now_ms: int) -> None:
        """``_held`` is in the order of expiry (every lease lives ``hold_ms`` from its take,
        take-over or renewal, and a take-over or renewal moves it to the end)."""
        while self._held:
            key, lease = next(iter(self._held.items()))
            if now_ms < lease.expires_at_ms:
                return
            self.end(key)


def _mark_key(key: LeaseKey) -> bytes:
    """The scope and question's sha256: a mark never holds the question (up to 16 kB)."""
    _, scope, text = key
    return hashlib.sha256(f"{scope}\n{text}".encode("utf-8", "surrogatepass")).digest()


async def wait(event: asyncio.Event, budget_s: float) -> bool:
    """True when the lease ended within the budget."""
    if budget_s <= 0:
        return False
    try:
        await asyncio.wait_for(event.wait(), budget_s)
    except TimeoutError:
        return False
    return True
