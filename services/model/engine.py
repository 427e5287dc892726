"""The simulated engine: validation, prefill against the KV cache, paced decode.

Nothing here knows about gRPC servicers. ``prepare`` validates a request and computes
everything that is a pure function of it (tokens, block hashes, the answer) without touching
state, so it can run in a worker thread. ``run`` then owns the replica's time: it waits for the
replica's prefill queue (one prefill at a time, as the router's replica model assumes; the
turn is tenant-fair, ``fair_queue``: deficit round robin by the uncached prompt tokens each
prefill asks, first come first served within a tenant, so one tenant's flood does not starve
the others), sleeps the prefill of the tokens the KV cache does not hold when its turn comes,
records the prompt's blocks, and yields the answer in deltas of a few tokens, sleeping the
decode time of each (decodes run alongside each other and the prefill, each at the model's
full rate). Every sleep goes through the injected ``sleep`` and is scaled by ``time_scale``
(0 = no waiting, and no queue). A model with a ``Drafting`` decodes speculatively
(``speculative.py``): a delta a step, each step's time that of k draft tokens and one target
pass; the answer's tokens are the same either way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1.prompt_pb2 import PromptFacts
from services.common import tool_choice
from services.common.errors import Code, RequestError, shown
from services.common.models import ModelSpec
from services.common.prompt import canonical_blocks, prompt_digest, prompt_token_ids
from services.common.tokens import Tokenizer, Tokenizers
from services.model.fair_queue import FairQueue, QueueWatcher
from services.model.kv_cache import BLOCK_SIZE, KvBlockCache, block_hashes
from services.model.speculative import Drafting, plan_steps, step_seconds
from services.model.text import Answer, compose_answer, compose_tool_call, seed_of

Sleep = Callable[[float], Awaitable[None]]
# how long a call waited for its turn, by model: a histogram (``ModelMetrics``)
QueueWaits = Callable[[str, float], None]
DEFAULT_DELTA_TOKENS = 4


@dataclass(frozen=True)
class Started:
    replica: str
    prompt_tokens: int
    kv_cached_tokens: int
    queue_wait_s: float = 0.0  # waited in the replica's prefill queue for its turn
    engine_instance: str = ""  # the engine's run (``SimEngine``'s ``instance``)


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Call:
    """A forced tool choice's answer: one whole tool_use block."""

    call: pb.ToolUse


@dataclass(frozen=True)
class Finished:
    output_tokens: int
    stop_reason: str
    draft_accepted_tokens: int = 0  # speculative decoding: draft tokens the model kept


Event = Started | Delta | Call | Finished


@dataclass(frozen=True)
class Prepared:
    """A validated request and everything derived from it; holds no engine state."""

    tenant: str
    spec: ModelSpec
    prompt_tokens: int
    block_hashes: tuple[bytes, ...]
    answer: Answer
    seed: bytes


def prefill_seconds(spec: ModelSpec, uncached_tokens: int, time_scale: float) -> float:
    return uncached_tokens / spec.prefill_rate * time_scale


def decode_seconds(spec: ModelSpec, output_tokens: int, time_scale: float) -> float:
    return output_tokens / spec.decode_rate * time_scale


class SimEngine:
    """One simulated replica serving ``models`` with one shared KV block cache."""

    def __init__(
        self,
        *,
        models: Mapping[str, ModelSpec],
        replica_id: str,
        tokenizer: Tokenizers | Tokenizer,
        kv_cache: KvBlockCache,
        time_scale: float,
        sleep: Sleep = asyncio.sleep,
        delta_tokens: int = DEFAULT_DELTA_TOKENS,
        drafting: Mapping[str, Drafting] | None = None,
        clock: Callable[[], float] = time.monotonic,
        watcher: QueueWatcher | None = None,
        waits: QueueWaits | None = None,
        instance: str = "",
    ) -> None:
        """``tokenizer``: each row's (one ``Tokenizer``: the only vocabulary, its rows'
        all); ``drafting``: the models (by id) that decode speculatively, and how;
        ``watcher`` and ``waits``: the prefill queue's calls waiting by tenant, and each
        call's wait by model (the replica's metrics); ``instance``: this run of the engine,
        drawn at the process's start (its KV cache lives in memory and dies with it), sent on
        each start (``GenerateStart.engine_instance``; empty: not told)."""
        if not models:
            raise ValueError("a replica must serve at least one model")
        if time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {time_scale}")
        if delta_tokens <= 0:
            raise ValueError(f"delta_tokens must be > 0, got {delta_tokens}")
        self._models = dict(models)
        self.replica_id = replica_id
        self._tokenizers = Tokenizers.covering(tokenizer, self._models.values())
        self._kv = kv_cache
        self._time_scale = time_scale
        self._sleep = sleep
        self._delta_tokens = delta_tokens
        self._drafting = dict(drafting or {})
        # the replica's prefill queue: one prefill at a time, tenant-fair
        self._prefill_queue = FairQueue(1, clock, watcher=watcher)
        self._waits = waits
        self._instance = instance

    @property
    def serves(self) -> tuple[str, ...]:
        return tuple(self._models)

    def prepare(
        self,
        tenant: str,
        model: str,
        request: pb.CompleteRequest,
        facts: PromptFacts | None = None,
    ) -> Prepared:
        """Validates and derives; raises ``RequestError`` and changes nothing.

        ``facts``: the prompt's token count, KV blocks and digest as prefix-cache's Plan
        computed them (the same canonical form, tokenizer and hashes as here), so the prompt
        is not tokenized again; without them the engine computes them from ``request``.
        """
        if not tenant:
            raise RequestError(Code.INVALID_ARGUMENT, "tenant is required", "no tenant")
        spec = self._models.get(model)
        if spec is None:
            served = ", ".join(self._models)
            raise RequestError(
                Code.INVALID_ARGUMENT,
                f"model {shown(model)} is not served by replica {self.replica_id}; it serves: "
                f"{served}",
                "the model is not served by the replica it was sent to",
            )
        if not 0 < request.max_tokens <= spec.max_output_tokens:
            raise RequestError(
                Code.INVALID_ARGUMENT,
                f"max_tokens must be between 1 and {spec.max_output_tokens} for {model}, "
                f"got {request.max_tokens}",
                f"max_tokens out of the range of {spec.id}",
            )
        choice = tool_choice.problem(request)  # the router's rule: a caller other than it
        if choice is not None:
            raise RequestError(Code.INVALID_ARGUMENT, choice, "a tool_choice it cannot answer")
        tokenizer = self._tokenizers.for_spec(spec)
        if facts is not None:
            prompt_tokens, hashes, digest = _from_facts(facts)
        else:
            blocks = canonical_blocks(request, tokenizer)
            token_ids = prompt_token_ids(blocks)
            prompt_tokens = len(token_ids)
            hashes = tuple(block_hashes(tenant, model, token_ids))
            digest = prompt_digest(blocks)
        if not prompt_tokens:
            raise RequestError(
                Code.INVALID_ARGUMENT,
                "request.messages is empty: the prompt has no tokens to answer",
                "the prompt has no tokens",
            )
        if prompt_tokens > spec.context_window_tokens:
            raise RequestError(
                Code.RESOURCE_EXHAUSTED,
                f"the prompt has {prompt_tokens} tokens, over {model}'s context window of "
                f"{spec.context_window_tokens}; shorten the messages, system or tools",
                f"the prompt is over {spec.id}'s context window",
            )
        temperature = request.temperature if request.HasField("temperature") else 1.0
        seed = seed_of(model, digest, temperature)
        return Prepared(
            tenant=tenant,
            spec=spec,
            prompt_tokens=prompt_tokens,
            block_hashes=hashes,
            answer=compose_tool_call(request, seed, request.max_tokens, tokenizer)
            or compose_answer(model, seed, request.max_tokens, tokenizer),
            seed=seed,
        )

    async def run(self, prepared: Prepared) -> AsyncGenerator[Event, None]:
        """Prefill in its turn, then the answer in deltas; a cancelled caller stops it at any
        sleep (in the queue too: it leaves it)."""
        spec = prepared.spec
        tokenizer = self._tokenizers.for_spec(spec)
        waited = 0.0
        if self._time_scale == 0:
            cached = await self._prefill(prepared)  # no time passes: nothing to queue for
        else:
            # its cost: the tokens to prefill as the cache holds them now (a prompt queued
            # behind one with the same prefix may find more of it cached when its turn comes)
            uncached = prepared.prompt_tokens - self._cached(prepared)
            async with self._prefill_queue.slot(prepared.tenant, uncached) as admission:
                waited = admission.waited_s
                if self._waits is not None:
                    self._waits(spec.id, waited)
                cached = await self._prefill(prepared)
        yield Started(self.replica_id, prepared.prompt_tokens, cached, waited, self._instance)
        ids = prepared.answer.token_ids
        if prepared.answer.call is not None or not prepared.answer.text:
            # a forced tool call (or one cut before it was whole): decoded at the model's rate,
            # sent as one block once whole, as the providers' adapters send one
            await self._sleep(decode_seconds(spec, len(ids), self._time_scale))
            if prepared.answer.call is not None:
                yield Call(prepared.answer.call)
            yield Finished(prepared.answer.tokens, prepared.answer.stop_reason)
            return
        drafting = self._drafting.get(spec.id)
        steps = plan_steps(prepared.seed, len(ids), drafting) if drafting is not None else None
        if self._time_scale == 0:
            # no decode time: every token is ready at once, so they go out as one delta (a
            # delta per few tokens would only add stream messages that carry no time)
            if ids:
                yield Delta(tokenizer.decode(list(ids)))
        elif drafting is not None and steps is not None:
            pause, start = step_seconds(spec, drafting, self._time_scale), 0
            for step in steps:
                await self._sleep(pause)
                yield Delta(tokenizer.decode(list(ids[start : start + step.tokens])))
                start += step.tokens
        else:
            for start in range(0, len(ids), self._delta_tokens):
                group = ids[start : start + self._delta_tokens]
                await self._sleep(decode_seconds(spec, len(group), self._time_scale))
                yield Delta(tokenizer.decode(list(group)))
        accepted = sum(step.accepted for step in steps) if steps is not None else 0
        yield Finished(prepared.answer.tokens, prepared.answer.stop_reason, accepted)

    def _cached(self, prepared: Prepared) -> int:
        return self._kv.cached_tokens(prepared.block_hashes, prepared.prompt_tokens)

    async def _prefill(self, prepared: Prepared) -> int:
        """The prompt's prefill, from the KV cache as it is when it begins (a request queued
        behind one with the same prefix reuses it); the tokens read from the cache."""
        cached = self._cached(prepared)
        uncached = prepared.prompt_tokens - cached
        await self._sleep(prefill_seconds(prepared.spec, uncached, self._time_scale))
        self._kv.insert(prepared.block_hashes)
        return cached


_HASH_BYTES = 32


def _from_facts(facts: PromptFacts) -> tuple[int, tuple[bytes, ...], str]:
    raw = facts.kv_block_hashes
    blocks = facts.prompt_tokens // BLOCK_SIZE if facts.prompt_tokens > 0 else 0
    if facts.prompt_tokens < 0 or len(raw) != blocks * _HASH_BYTES or not facts.digest:
        raise RequestError(
            Code.INVALID_ARGUMENT,
            f"prompt facts are inconsistent: {facts.prompt_tokens} tokens need {blocks} block "
            f"hashes of {_HASH_BYTES} bytes and a digest, got {len(raw)} bytes; send them as "
            "prefix-cache's Plan returned them, or leave them out",
            "prompt facts are inconsistent",
        )
    hashes = tuple([raw[i : i + _HASH_BYTES] for i in range(0, len(raw), _HASH_BYTES)])
    return facts.prompt_tokens, hashes, facts.digest
