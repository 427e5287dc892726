"""The ``auto`` request's tier: the question's embedding, the learned score, the tiers' costs.

The embedding is the semantic cache's own: a Lookup made with ``want_embedding`` returns the
vector it computed (and, with L1 bypassed, the semantic cache embeds without looking up), so
the question is embedded once. When the semantic cache cannot be reached the router embeds it
itself (``ROUTER_LOCAL_EMBEDDER``, the same MiniLM model, loaded on first need) or, with that
off, scores on the shape features alone; ``Routing.embedding_source`` says which.

The tiers are the model table's ``auto`` tiers, ordered by price (``bands.py``). A request that
may share a prefix with earlier ones (a system prompt, tools or earlier turns) is planned on
every tier, so the decision weighs what each would cost given the prefix cache's state; the
chosen tier's Plan is then reused by the dispatch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.clock import SecondsClock, Throttle, suppressed
from services.common.models import ModelTable, Tier
from services.common.prompt import last_user_text
from services.router.calls import Calls, PrefixWindow
from services.router.dependencies import Dependencies
from services.router.routing.bands import Band, bands, decide_bands
from services.router.routing.decision import Decision, TierCost, tier_cost
from services.router.routing.model import RouterModel, Vector
from services.semantic_cache.embedder import Embedder

log = logging.getLogger("cachemesh.router")

FROM_LOOKUP = "semantic_cache.lookup"
FROM_EMBED = "semantic_cache.embed"  # L1 bypassed: embedded without a lookup
LOCAL = "router.local"
NONE = "none"
LOWEST_SCORE = -1.0  # the score is P(large right) - P(small right)
# The output the cost comparison assumes (tokens): the answer's length is not known before.
EXPECTED_OUTPUT_TOKENS = 128

# A semantic cache embedding with another embedder than the router's was fitted on (a rolling
# upgrade) is said at most once this often, not once an ``auto`` request.
MISMATCH_LOG_EVERY_MS = 60_000

# A last user turn longer than this is scored in a worker thread, off the event loop that
# serves every tenant's calls (its shape features are Python loops over its characters).
_SCORE_INLINE_CHARS = 32 * 1024


def question_before_prefill(request: pb.CompleteRequest) -> str | None:
    """The text of the user message a last assistant message (a prefill) follows, or None. A
    prefill's request is scored on it: scored on no text (0.1509, over the calibrated 0.1228)
    every ``auto`` prefill went to the large tier, "What is 2+2?" + "Answer:" at 150,000-165,000
    nanos where the question alone went small at 45,000-50,000."""
    messages = request.messages
    if len(messages) < 2 or messages[-1].role != pb.ROLE_ASSISTANT:
        return None
    if messages[-2].role != pb.ROLE_USER:
        return None
    texts = [b.text for b in messages[-2].content if b.WhichOneof("kind") == "text"]
    return "\n".join(texts) if texts else None


class LocalEmbedder:
    """The router's own MiniLM, loaded (in a thread) the first time it is needed; its files
    are checked at start-up (``app.serve``). A load that fails all the same (onnxruntime
    refusing the file, memory) is logged once and not tried again until a restart: the
    question is scored on its shape alone (``embed`` returns None). Before, the load's error
    reached every ``auto`` request while the semantic cache was down (INTERNAL, HTTP 500),
    each one hashing the model file again under the lock."""

    def __init__(self, load: Callable[[], Embedder]) -> None:
        self._load = load
        self._embedder: Embedder | None = None
        self._failed = False
        self._lock = asyncio.Lock()

    async def embed(self, text: str) -> Vector | None:
        async with self._lock:
            if self._embedder is None and not self._failed:
                try:
                    self._embedder = await asyncio.to_thread(self._load)
                except Exception:  # whatever stops the load: no request fails for it
                    self._failed = True
                    log.exception(
                        "the router's own embedder (ROUTER_LOCAL_EMBEDDER) did not load: while "
                        "the semantic cache cannot embed, `auto` is scored on the question's "
                        "shape alone (embedding_source none) until the router restarts"
                    )
        embedder = self._embedder
        if embedder is None:
            return None
        rows: Vector = await asyncio.to_thread(embedder.embed, [text])
        row: Vector = rows[0]
        return row


@dataclass(frozen=True)
class Routed:
    decision: Decision
    plans: dict[str, pc.PlanResponse | None] = field(default_factory=dict)  # model id -> Plan


def shares_prefix(request: pb.CompleteRequest) -> bool:
    """A prefix the prefix cache may hold: a system prompt, tools or earlier turns."""
    return bool(request.tools or request.system or len(request.messages) > 1)


class TierRouter:
    def __init__(
        self,
        model: RouterModel,
        default_threshold: float,
        table: ModelTable,
        calls: Calls,
        dependencies: Dependencies,
        local: LocalEmbedder | None,
        cost_aware: bool = False,
        tier_thresholds: Mapping[Tier, float] | None = None,
        amortize_turns: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``tier_thresholds``: the configured thresholds of tiers between small and large
        (the others are derived from the largest's). ``clock`` (seconds): its throttled
        log lines'."""
        self._model = model
        self._threshold = default_threshold
        self._table = table
        self._tiers = [table.for_tier(tier) for tier in table.tiers]
        self._names: list[Tier] = [spec.tier for spec in self._tiers]
        self._ids = [spec.id for spec in self._tiers]
        self._calls = calls
        self._deps = dependencies
        self._local = local
        self._cost_aware = cost_aware
        self._tier_thresholds = dict(tier_thresholds or {})
        self._amortize = amortize_turns
        self._mismatch_log = Throttle(SecondsClock(clock), MISMATCH_LOG_EVERY_MS)

    async def route(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        lookup: sc.LookupResponse | None,
        window: PrefixWindow | None = None,
    ) -> Routed:
        """The tier; cost-aware, with each tier's Plan (``window``: the request's prefix-cache
        calls, None: each bounded by ``ROUTER_PREFIX_TIMEOUT_S`` alone)."""
        text = last_user_text(request)
        if text is None:  # a prefill: scored on the question it answers, which L1 did not embed
            text, lookup = question_before_prefill(request) or "", None
        vector, source = await self._embedding(text, lookup)
        if len(text) > _SCORE_INLINE_CHARS:  # its shape features: ~0.25 s for 1 MB of text
            score = await asyncio.to_thread(self._model.score, text, vector)
        else:
            score = self._model.score(text, vector)
        cuts, requested = self._cuts(request)
        if not (self._cost_aware and shares_prefix(request)):
            return Routed(decide_bands(score, self._names, cuts, source, requested=requested))
        ids = self._ids
        found = await asyncio.gather(*(self._plan(tenant, model, request, window) for model in ids))
        plans = dict(zip(ids, found, strict=True))
        output = min(request.max_tokens, EXPECTED_OUTPUT_TOKENS)
        costs = [self._cost(model, plans[model], output) for model in ids]
        decision = decide_bands(score, self._names, cuts, source, costs, requested=requested)
        return Routed(decision, plans)

    def lowest_tier(self, request: pb.CompleteRequest) -> Tier:
        """The cheapest tier the request's thresholds can send it to: the lowest score's
        (-1), costs cold. The smallest tier unless a threshold is at -1 (``routing.threshold``
        -1: every score reaches the large tier)."""
        cuts, requested = self._cuts(request)
        return decide_bands(LOWEST_SCORE, self._names, cuts, NONE, requested=requested).tier

    def _cuts(self, request: pb.CompleteRequest) -> tuple[list[Band], bool]:
        """The tiers' band edges for the request's threshold (its own when it set one), and
        whether it set one."""
        requested = request.routing.HasField("threshold")
        threshold = request.routing.threshold if requested else self._threshold
        return bands(self._tiers, threshold, self._tier_thresholds, requested=requested), requested

    async def _plan(
        self,
        tenant: str,
        model: str,
        request: pb.CompleteRequest,
        window: PrefixWindow | None,
    ) -> pc.PlanResponse | None:
        replicas = self._deps.replicas(model)
        if not replicas:
            return None
        return await self._calls.plan(tenant, model, request, replicas, window)

    def _cost(self, model: str, plan: pc.PlanResponse | None, output: int) -> TierCost | None:
        spec = self._table.get(model)
        if plan is None or spec is None:
            return None
        usage = plan.usage
        return tier_cost(
            spec,
            usage.input_tokens,
            usage.cache_creation_input_tokens,
            usage.cache_read_input_tokens,
            output,
            self._amortize,
        )

    async def _embedding(
        self, text: str, lookup: sc.LookupResponse | None
    ) -> tuple[Vector | None, str]:
        if not text:
            return None, NONE
        if lookup is not None and lookup.embedding:
            if lookup.embedder_version != self._model.embedder:
                if due := self._mismatch_log.due():  # one line a minute, not one a request
                    log.warning(
                        "the semantic cache embeds with %s, the router was fitted on %s%s",
                        lookup.embedder_version,
                        self._model.embedder,
                        suppressed(due, MISMATCH_LOG_EVERY_MS),
                    )
            else:
                source = (
                    FROM_EMBED if lookup.skip_reason.startswith("semantic mode") else (FROM_LOOKUP)
                )
                return np.frombuffer(lookup.embedding, dtype="<f4").astype(np.float32), source
        if self._local is not None and (vector := await self._local.embed(text)) is not None:
            return vector, LOCAL
        return None, NONE
