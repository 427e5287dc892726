"""The warm-prefix store in Redis, shared by several prefix-cache replicas.

Each entry is a hash ``{tokens, ttl_ms, expires_at_ms, created_at_ms}`` under
``<prefix>:{<scope hash>}:<digest>`` (the braces keep one scope's keys in one cluster slot, so a
script may touch them all). ``expires_at_ms`` is computed from the caller's ``now_ms`` (the
injected clock), so the same tests drive this store and the in-memory one; Redis's own key
expiry (``PEXPIRE``, the entry's TTL plus ``READ_GRACE_MS``) only collects garbage and never
decides whether an entry is warm. ``created_at_ms`` (its writer's first token, from when it is
readable) is absent from an entry an older version wrote: that one is readable since always,
and an older version reading this store ignores the field.

``settle`` is one Lua script, so reading the longest live probe, refreshing it and writing the
new entries happen atomically with respect to every other replica's commits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis

from services.prefix_cache.rules import Probe, Write
from services.prefix_cache.warm import READ_GRACE_MS, Scope, WarmEntry, start_time

GC_SLACK_MS = READ_GRACE_MS  # an expired entry stays readable by a request that came earlier
WARM_PREFIX = "cachemesh:warm"  # of every entry's key (make reset-l2 deletes them)

# KEYS: the probes' keys, then the writes' keys. ARGV: now_ms, number of probes, GC slack,
# read_at_ms (probes are judged live then), started_ms (lifetimes start then, and a probe
# created after it and by now_ms is not read: ``created_after``), then per write: tokens,
# ttl_ms. Returns {} or {index of the hit among the probes, tokens, ttl_ms, expires_at_ms as
# found, created_at_ms}.
_SETTLE = """
local now = tonumber(ARGV[1])
local probes = tonumber(ARGV[2])
local slack = tonumber(ARGV[3])
local read_at = tonumber(ARGV[4])
local start = tonumber(ARGV[5])
local best, best_tokens, best_ttl, best_exp, best_created = 0, -1, 0, 0, 0
for i = 1, probes do
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ttl_ms', 'expires_at_ms', 'created_at_ms')
  local created = tonumber(v[4]) or 0
  -- created after the arrival (start) and by now: no read (warm.created_after); later than
  -- now: written by a clock ahead of this one (or before it stepped back), read
  local after = created > start and created <= now
  if v[1] and tonumber(v[3]) > read_at and not after and tonumber(v[1]) > best_tokens then
    best, best_tokens, best_ttl, best_exp = i, tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
    best_created = created
  end
end
if best > 0 then
  local refreshed = math.max(best_exp, start + best_ttl)
  redis.call('HSET', KEYS[best], 'expires_at_ms', refreshed)
  redis.call('PEXPIRE', KEYS[best], refreshed - now + slack)
end
for j = 1, #KEYS - probes do
  local key = KEYS[probes + j]
  local tokens = tonumber(ARGV[4 + 2 * j])
  local ttl = tonumber(ARGV[5 + 2 * j])
  local expires = start + ttl
  local created = now
  local old = redis.call('HMGET', key, 'ttl_ms', 'expires_at_ms', 'created_at_ms')
  if old[2] and tonumber(old[2]) > now then
    ttl = math.max(ttl, tonumber(old[1]))
    expires = math.max(expires, tonumber(old[2]))
    created = math.min(created, tonumber(old[3]) or 0)
  end
  redis.call('HSET', key, 'tokens', tokens, 'ttl_ms', ttl, 'expires_at_ms', expires,
    'created_at_ms', created)
  redis.call('PEXPIRE', key, expires - now + slack)
end
if best == 0 then return {} end
return {best, best_tokens, best_ttl, best_exp, best_created}
"""

# The longest live probe, read only: same KEYS and first ARGV as _SETTLE. Whenever created, as
# the in-memory store's (a first-readable time past now is a clock ahead of this one's).
_LONGEST = """
local now = tonumber(ARGV[1])
local best, best_tokens, best_ttl, best_exp, best_created = 0, -1, 0, 0, 0
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ttl_ms', 'expires_at_ms', 'created_at_ms')
  local created = tonumber(v[4]) or 0
  if v[1] and tonumber(v[3]) > now and tonumber(v[1]) > best_tokens then
    best, best_tokens, best_ttl, best_exp = i, tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
    best_created = created
  end
end
if best == 0 then return {} end
return {best, best_tokens, best_ttl, best_exp, best_created}
"""


class RedisWarmStore:
    def __init__(self, client: Redis, prefix: str = WARM_PREFIX) -> None:
        self._client = client
        self._prefix = prefix
        self._settle = client.register_script(_SETTLE)
        self._longest = client.register_script(_LONGEST)

    def key(self, scope: Scope, digest: str) -> str:
        scope_hash = hashlib.sha256("\x00".join(scope).encode()).hexdigest()[:32]
        return f"{self._prefix}:{{{scope_hash}}}:{digest}"

    async def ping(self) -> None:
        await self._client.ping()

    async def count(self) -> int:
        """Entries held under this store's prefix, live or not yet collected. For tests only:
        a SCAN of the whole keyspace (seconds at 300k keys); the service never calls it."""
        return len([key async for key in self._client.scan_iter(match=f"{self._prefix}:*")])

    async def longest(self, scope: Scope, probes: Sequence[Probe], now_ms: int) -> WarmEntry | None:
        if not probes:
            return None
        keys = [self.key(scope, p.digest) for p in probes]
        found = await self._longest(keys=keys, args=[now_ms])
        return _entry(found, probes)

    async def settle(
        self,
        scope: Scope,
        probes: Sequence[Probe],
        writes: Sequence[Write],
        now_ms: int,
        read_at_ms: int | None = None,
        started_ms: int | None = None,
    ) -> WarmEntry | None:
        if not probes and not writes:
            return None
        keys = [self.key(scope, p.digest) for p in probes]
        keys += [self.key(scope, w.digest) for w in writes]
        read_at = now_ms if read_at_ms is None else read_at_ms
        start = start_time(started_ms, now_ms)
        args: list[int] = [now_ms, len(probes), GC_SLACK_MS, read_at, start]
        for write in writes:
            args += [write.tokens, write.ttl_ms]
        found = await self._settle(keys=keys, args=args)
        return _entry(found, probes)


def _entry(found: Any, probes: Sequence[Probe]) -> WarmEntry | None:
    values = [int(v) for v in cast(list[Any], found)]
    if not values:
        return None
    index, tokens, ttl_ms, expires, created = values
    return WarmEntry(probes[index - 1].digest, tokens, ttl_ms, expires, created)
