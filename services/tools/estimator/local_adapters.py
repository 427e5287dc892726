"""The router's dependencies answered in this process by the services' own APIs (no sockets).

Each adapter calls the service's transport-free API directly and turns its ``RequestError``
into the ``CallFailed`` a gRPC call would raise; deadlines are the caller's, whole (nothing in
process spends wall-clock time on the wire). In a replay (``timeline.CURRENT`` set) time is
the virtual clock's: a model answer's start is held until the request's first token and the
rest until its logged end, and a lookup that finds an identical request's lease held waits
for it on the virtual clock, never in real time; the leader renews that lease on the virtual
clock too (``replay_sleep``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Mapping
from typing import TypeVar

from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.errors import RequestError
from services.common.models import ModelSpec, ModelTable
from services.model.api import ModelApi
from services.model.engine import DEFAULT_DELTA_TOKENS
from services.prefix_cache.api import PrefixCacheApi
from services.router.dependencies import CallFailed
from services.semantic_cache.api import SemanticCacheApi, lease_wait_budget_s
from services.tools.estimator.timeline import CURRENT, Timeline

T = TypeVar("T")


async def _local(call: Awaitable[T]) -> T:
    try:
        return await call
    except RequestError as exc:
        raise CallFailed(exc.code, exc.message, mark=exc.mark) from exc


class LocalSemantic:
    def __init__(self, api: SemanticCacheApi, lease_wait_s: float = 0.0) -> None:
        self._api = api
        self._lease_wait_s = lease_wait_s  # SEMANTIC_CACHE_LEASE_WAIT_S

    async def lookup(self, request: sc.LookupRequest, deadline_s: float) -> sc.LookupResponse:
        timeline = CURRENT.get()
        if timeline is None:
            return await _local(self._api.lookup(request, deadline_s))
        # The lease wait the service would make in real time, made on the virtual clock: each
        # look never waits, and looks again at each event of the replay until the lease has
        # ended or the budget has passed. Its computing takes no virtual time, so no deadline
        # bounds it (the embedding ``auto`` wants is always made, as live on an idle machine).
        time = timeline.time
        give_up = time.now_ms() + round(lease_wait_budget_s(self._lease_wait_s, deadline_s) * 1000)
        while True:
            response = await _local(self._api.lookup(request, None, wait=False))
            if not response.pending or time.now_ms() >= give_up:
                return response
            await time.changed(give_up)

    async def store(self, request: sc.StoreRequest, deadline_s: float) -> sc.StoreResponse:
        return await _local(self._api.store(request))

    async def release(self, request: sc.ReleaseRequest, deadline_s: float) -> sc.ReleaseResponse:
        return await _local(self._api.release(request))

    async def renew(self, request: sc.RenewRequest, deadline_s: float) -> sc.RenewResponse:
        return await _local(self._api.renew(request))


async def replay_sleep(seconds: float) -> None:
    """The pipeline's wait between a lease's renewals: on the virtual clock in a replay (the
    leases age on it: a replayed call longer than SEMANTIC_CACHE_LEASE_S keeps its lease, as
    live), parked meanwhile; in real time outside one."""
    timeline = CURRENT.get()
    if timeline is None:
        await asyncio.sleep(seconds)
        return
    time = timeline.time
    await time.until(time.now_ms() + max(1, round(seconds * 1000)))


class LocalPrefix:
    def __init__(self, api: PrefixCacheApi) -> None:
        self._api = api

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        return await _local(self._api.plan(request))

    async def commit(self, request: pc.CommitRequest, deadline_s: float) -> pc.CommitResponse:
        return await _local(self._api.commit(request))


class LocalModelStream:
    def __init__(
        self,
        chunks: AsyncGenerator[model_pb2.GenerateChunk, None],
        paced: tuple[Timeline, ModelSpec, float] | None = None,
    ) -> None:
        """``paced``: the replayed request's logged times, the model answering it and the
        replica's ``SIM_TIME_SCALE`` (what its decode took on the logged stack)."""
        self._chunks = chunks
        self._paced = paced
        self._held: deque[model_pb2.GenerateChunk] | None = None
        self._first_ms = 0  # when the start is handed over (known once the answer is held)
        self._closing: set[asyncio.Task[None]] = set()

    async def read(self) -> model_pb2.GenerateChunk | None:
        if self._paced is not None:
            return await self._paced_read(*self._paced)
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return None
        except RequestError as exc:
            raise CallFailed.of_replica(exc) from exc

    async def _paced_read(
        self, timeline: Timeline, spec: ModelSpec, time_scale: float
    ) -> model_pb2.GenerateChunk | None:
        """The simulator answers at once offline: its whole answer is taken on the first read,
        then its start is handed over when the replica reported its prefill (the logged first
        token less its first delta's decode, or the logged end less the answer's decode time)
        and the rest at the logged end."""
        if self._held is None:
            self._held = deque()
            try:
                async for chunk in self._chunks:
                    self._held.append(chunk)
            except RequestError as exc:
                raise CallFailed.of_replica(exc) from exc
            output = _output_tokens(self._held)
            self._first_ms = timeline.first_token_ms(
                _decode_ms(output, spec, time_scale),
                _decode_ms(min(output, DEFAULT_DELTA_TOKENS), spec, time_scale),
            )
        if not self._held:
            return None
        chunk = self._held.popleft()
        at = self._first_ms if chunk.WhichOneof("part") == "start" else timeline.end_ms
        await timeline.time.until(at)
        return chunk

    def cancel(self) -> None:
        task = asyncio.ensure_future(self._chunks.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


class LocalModels:
    def __init__(
        self, apis: Mapping[str, ModelApi], table: ModelTable, time_scales: Mapping[str, float]
    ) -> None:
        """``time_scales``: each replica's ``SIM_TIME_SCALE`` (its engine here runs at 0)."""
        self._apis = dict(apis)  # replica address -> its engine's API
        self._table = table
        self._time_scales = dict(time_scales)

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> LocalModelStream:
        chunks = self._apis[replica].generate(request)
        timeline, spec = CURRENT.get(), self._table.get(request.model)
        if timeline is None or spec is None:
            return LocalModelStream(chunks)
        return LocalModelStream(chunks, (timeline, spec, self._time_scales.get(replica, 1.0)))


def _output_tokens(chunks: deque[model_pb2.GenerateChunk]) -> int:
    return sum(c.end.output_tokens for c in chunks if c.WhichOneof("part") == "end")


def _decode_ms(tokens: int, spec: ModelSpec, time_scale: float) -> int:
    """The decode time of ``tokens`` as the simulator spends it (at the model's decode speed,
    scaled), in ms: the whole answer's, or its first delta's (``DEFAULT_DELTA_TOKENS``, the
    first content a streamed client sees, decoded after the replica reported its prefill)."""
    return round(tokens / spec.decode_rate * time_scale * 1000)
