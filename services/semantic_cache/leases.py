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
mid-call and the client sent it again) takes the lease over and leads, instead of waiting out
the age limit of its own dead call. The lease taken over gets a new ``lease_id`` (its waiters
wait on): the first call's late Release or renewal names the old one, and ends or renews
nothing.

A lease's id may be the caller's (a fresh random id per Lookup, which it can Release by when
the reply never reaches it), unless a live lease has that id already: ids are unique among
the live leases (a renewal finds its lease by its id alone), so a reused id is replaced by one
of ours and renews or ends nothing of the lease that has it.

The age limit runs from the take, and from each renewal: the holder renews its lease (by its
``lease_id``) while its model call is on, so a call longer than the age limit keeps its
waiters (and an identical request arriving late does not lead a second, paid, call), while a
holder that died renews nothing and frees the key at the age limit as before. A renewal names
its lease by its tenant and ``lease_id`` only, not by the request (a renewal is sent every
third of the age limit for as long as the call runs, and the request may be a megabyte): the
live leases are also kept by id, one id per live lease, so that index is bounded as they are.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from services.common.clock import Clock

LeaseKey = tuple[str, str, str]  # (tenant, scope, normalised query)


@dataclass
class _Lease:
    expires_at_ms: int
    owner: str = ""  # the request_id that took it ("" = none)
    lease_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Leases:
    def __init__(self, clock: Clock, hold_s: float) -> None:
        """``clock``: what the leases age on; a monotonic one in the service (a lease lives in
        this process only: a step of the wall clock must not keep a dead holder's lease for
        the step, nor end a live one mid-call), the replay's virtual clock offline."""
        if hold_s <= 0:
            raise ValueError(f"hold_s must be > 0, got {hold_s}")
        self._clock = clock
        self._hold_ms = round(hold_s * 1000)
        self._held: dict[LeaseKey, _Lease] = {}
        self._ids: dict[str, LeaseKey] = {}  # the key of each lease in ``_held``, by its id

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
        lease.lease_id = self._id(lease_id)
        self._ids[lease.lease_id] = key
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

    def renew(self, tenant: str, lease_id: str) -> bool:
        """Restarts the age limit of the live lease named ``lease_id`` if ``tenant``'s (its
        holder's model call is still on). False when that lease has ended (stored, released,
        or past its age limit: ended here), or is another tenant's: a late renewal never
        brings a lease back that waiters may have been woken from, and a lease taken since on
        the same key has an id of its own."""
        key = self._ids.get(lease_id)
        if key is None or key[0] != tenant:
            return False
        lease = self._held[key]
        if self.held(key) is None:
            return False
        lease.expires_at_ms = self._clock.now_ms() + self._hold_ms
        self._held[key] = self._held.pop(key)  # the youngest now: the age order holds
        return True

    def end_id(self, tenant: str, lease_id: str) -> bool:
        """Ends ``tenant``'s live lease named ``lease_id`` (``end``): True when one ended."""
        key = self._ids.get(lease_id)
        return key is not None and key[0] == tenant and self.end(key, lease_id)

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

    def end(self, key: LeaseKey, lease_id: str | None = None) -> bool:
        """Fulfilled (stored) or released: wakes every waiter. With ``lease_id``, only that
        lease is ended (not one another request has taken since). True when one ended."""
        lease = self._held.get(key)
        if lease is None or (lease_id is not None and lease.lease_id != lease_id):
            return False
        del self._held[key]
        del self._ids[lease.lease_id]
        lease.done.set()
        return True

    def _end_expired(self, now_ms: int) -> None:
        """``_held`` is in the order of expiry (every lease lives ``hold_ms`` from its take,
        take-over or renewal, and a take-over or renewal moves it to the end)."""
        while self._held:
            key, lease = next(iter(self._held.items()))
            if now_ms < lease.expires_at_ms:
                return
            self.end(key)


async def wait(event: asyncio.Event, budget_s: float) -> bool:
    """True when the lease ended within the budget."""
    if budget_s <= 0:
        return False
    try:
        await asyncio.wait_for(event.wait(), budget_s)
    except TimeoutError:
        return False
    return True
