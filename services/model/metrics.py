"""A model replica's metrics, read off the Generate stream (the simulator's and a provider
adapter's alike), labelled by the model served (a model this replica serves, else ``other``):

- ``cachemesh_model_in_flight{model}``: Generate calls in progress;
- ``cachemesh_model_generations_total{model,outcome}``: ``ok``, ``interrupted`` (the stream
  ended with an ``interrupted`` end: the provider's stream broke, or the caller's deadline came,
  before the first token or mid-way; the part produced is billed, the answer is not whole),
  ``refused`` (a RequestError: the request's fault or the provider's refusal), ``failed``,
  ``cancelled``. An interrupted end counted ``ok`` before, so a cut answer showed nowhere but
  in the router (and a call cut before its first token, which failed DEADLINE_EXCEEDED and
  counted ``refused`` until it was made to end with a start that bills its prompt, turned
  ``ok``); the decode rate still takes a sample of one cut mid-way, as before;
- ``cachemesh_model_prompt_tokens_total{model}`` and
  ``cachemesh_model_kv_cached_tokens_total{model}``: the prompts and the part the engine's
  KV cache reused (L3: their ratio is the KV reuse), ``cachemesh_model_output_tokens_total``.
  A provider adapter's ``start`` cannot tell them (``kv_cached_unreported``: its prompt count
  is Plan's estimate, its KV reuse 0); they are counted at its ``end`` from the reported usage
  (OpenAI's or the engine's ``prompt_tokens`` and ``prompt_tokens_details.cached_tokens``,
  Anthropic's input + cache writes + ``cache_read_input_tokens`` and the reads), else, when
  nothing was reported (no usage, no end), the start's estimate with no reuse;
- ``cachemesh_model_provider_usage_distrusted_total{model,field}``: a field of a provider's
  usage report with a count no call has (negative, not a whole number, past ten times the
  row's context window and output cap: ``providers.usage_check``), which the call was billed
  without (its end's ``distrusted_usage``); ``field`` is one of the usage object's few names;
- ``cachemesh_model_time_to_first_token_seconds{model}``: from the call to the model's first
  output token of any kind, the first chunk after ``start``: text, a piece of a tool call or
  of a reasoning model's thinking (both ``progress`` chunks), not the first text the client
  sees (that is the router's ``cachemesh_router_ttft_seconds``: a model thinking 20 s before
  its text has its first token here at the end of its prefill), and
  ``cachemesh_model_decode_tokens_per_second{model}`` (output tokens, the thinking in them,
  over the time from that first chunk to the last, for answers of two tokens or more);
- ``cachemesh_model_queue_wait_seconds{model}``: how long each call admitted to the engine
  waited for its turn in the replica's tenant-fair queue (``fair_queue``: the simulator's
  prefill queue, a provider engine's ``MODEL_MAX_CONCURRENT_CALLS`` gate), and
  ``cachemesh_model_queue_waiting{tenant}``: the calls waiting there now, by tenant (bounded
  as the router's: the first ``CACHEMESH_METRICS_MAX_TENANTS`` tenants, then ``_other``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from cachemesh.v1 import model_pb2
from services.common.metrics import DEFAULT_MAX_TENANTS, OTHER, LoopMetrics, TenantLabels

OK = "ok"  # a stream that ended with a whole answer
INTERRUPTED = "interrupted"  # one whose end is interrupted: the answer was cut
TPS_BUCKETS = (1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000)


@dataclass
class Generation:
    """One Generate call as the stream shows it."""

    model: str
    began: float
    first: float | None = None  # when the first output arrived (text, block or progress)
    last: float | None = None  # when the last chunk arrived
    output_tokens: int = 0
    interrupted: bool = False  # its end says the answer was cut (``outcome``)
    # a start that could not report its prompt: its estimate, counted at the end unless the
    # end reports the provider's figures
    unreported_prompt: int | None = None


class ModelMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        models: Collection[str],
        clock: Callable[[], float],
        tenants: TenantLabels | None = None,
    ) -> None:
        self._models = frozenset(models)
        self._clock = clock
        self._tenants = tenants if tenants is not None else TenantLabels(DEFAULT_MAX_TENANTS)
        m = LoopMetrics(registry)
        self._in_flight = m.gauge(
            "cachemesh_model_in_flight", "Generate calls in progress", ("model",)
        )
        self._generations = m.counter(
            "cachemesh_model_generations",
            "Generate calls ended: ok, interrupted, refused, failed, cancelled",
            ("model", "outcome"),
        )
        self._prompt = m.counter(
            "cachemesh_model_prompt_tokens", "Prompt tokens the engine was given", ("model",)
        )
        self._kv = m.counter(
            "cachemesh_model_kv_cached_tokens",
            "Prompt tokens reused from the engine's KV cache (no prefill)",
            ("model",),
        )
        self._output = m.counter("cachemesh_model_output_tokens", "Tokens generated", ("model",))
        self._distrusted = m.counter(
            "cachemesh_model_provider_usage_distrusted",
            "Usage fields a provider reported with a count no call has, billed as not reported",
            ("model", "field"),
        )
        self._ttft = m.histogram(
            "cachemesh_model_time_to_first_token_seconds",
            "From the Generate call to its first output token (text, tool call or thinking)",
            ("model",),
        )
        self._tps = m.histogram(
            "cachemesh_model_decode_tokens_per_second",
            "Output tokens per second of decode (first to last chunk)",
            ("model",),
            TPS_BUCKETS,
        )
        self._queue_wait = m.histogram(
            "cachemesh_model_queue_wait_seconds",
            "How long a call waited for its turn at the engine in the replica's fair queue",
            ("model",),
        )
        self._queue_waiting = m.gauge(
            "cachemesh_model_queue_waiting",
            "Calls waiting for their turn at the engine in the replica's fair queue",
            ("tenant",),
        )

    def waiting(self, tenant: str, change: int) -> None:
        """A tenant's calls waiting in the replica's queue changed (``QueueWatcher``)."""
        self._queue_waiting(self._tenants(tenant)).inc(change)

    def queue_wait(self, model: str, seconds: float) -> None:
        """A call admitted to the engine after waiting ``seconds`` for its turn."""
        self._queue_wait(model if model in self._models else OTHER).observe(seconds)

    def begin(self, model: str) -> Generation:
        label = model if model in self._models else OTHER  # a model not in the table
        self._in_flight(label).inc()
        return Generation(label, self._clock())

    def chunk(self, call: Generation, chunk: model_pb2.GenerateChunk) -> None:
        part = chunk.WhichOneof("part")
        now = self._clock()
        call.last = now
        if part == "start":
            if chunk.start.kv_cached_unreported:
                call.unreported_prompt = chunk.start.prompt_tokens
            else:
                self._prompt(call.model).inc(chunk.start.prompt_tokens)
                self._kv(call.model).inc(chunk.start.kv_cached_tokens)
        elif part == "end":
            call.output_tokens = chunk.end.output_tokens
            call.interrupted = chunk.end.interrupted
            self._output(call.model).inc(chunk.end.output_tokens)
            for name in chunk.end.distrusted_usage:
                self._distrusted(call.model, name).inc()
            if call.unreported_prompt is not None:
                reported = _reported_prompt(chunk.end)
                if reported is not None:
                    call.unreported_prompt = None
                    self._prompt(call.model).inc(reported[0])
                    self._kv(call.model).inc(reported[1])
        elif call.first is None:
            call.first = now
            self._ttft(call.model).observe(now - call.began)

    @staticmethod
    def streamed(call: Generation) -> str:
        """The outcome of a stream that ran to its end: ``ok``, or ``interrupted`` when its
        end says the answer was cut."""
        return INTERRUPTED if call.interrupted else OK

    def end(self, call: Generation, outcome: str) -> None:
        self._in_flight(call.model).dec()
        if call.unreported_prompt is not None:  # nothing reported: the estimate, no reuse
            self._prompt(call.model).inc(call.unreported_prompt)
            self._kv(call.model).inc(0)  # the series exists, as for a start that reports
            call.unreported_prompt = None
        self._generations(call.model, outcome).inc()
        first, last = call.first, call.last
        if outcome not in (OK, INTERRUPTED) or first is None or last is None or last <= first:
            return
        if call.output_tokens >= 2:
            self._tps(call.model).observe((call.output_tokens - 1) / (last - first))


def _reported_prompt(end: model_pb2.GenerateEnd) -> tuple[int, int] | None:
    """The prompt tokens and the KV-reused part of them the provider reported, if it did."""
    usage = end.provider_usage
    kind = usage.WhichOneof("report") if end.HasField("provider_usage") else None
    if kind == "openai":  # prompt_tokens include the cached ones
        return usage.openai.prompt_tokens, usage.openai.prompt_tokens_details.cached_tokens
    if kind == "anthropic":
        a = usage.anthropic
        read = a.cache_read_input_tokens
        return a.input_tokens + a.cache_creation_input_tokens + read, read
    return None
