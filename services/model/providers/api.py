"""``Model.Generate`` for a provider replica: the adapter's stream, with retries before the
first token, the deadline, the credentials' health, and what an interrupted answer bills.

- The deadline is the call's own (the router passes the request's: the client's deadline,
  or ``ROUTER_MODEL_TIMEOUT_S`` when that is sooner or the client set none).
- Before the first token, a 429 / 529 / overloaded / 5xx / lost connection is retried up to
  ``max_retries`` times, waiting what ``retry-after`` asks (or the error's message: OpenAI's
  "Please try again in 2s"; else exponential backoff with jitter) when that wait ends before
  the deadline; otherwise the call fails UNAVAILABLE at
  once, naming the wait that did not fit, so the router hands the request to the next
  replica or tier while there is time left. A try that failed after the provider reported
  its prompt (an ``overloaded_error`` event after Anthropic's message_start, before any
  content) is retried as one that failed before it, its report dropped, not billed:
  Anthropic's documentation does not say that such a try is billed (its errors page says
  only that an error can come in a stream after the 200, outside the usual error handling).
- A request the SDK cannot encode (a value JSON does not have: NaN, Infinity, a lone surrogate)
  is INVALID_ARGUMENT, never sent, and no failure of the replica's.
- A prompt over the model's context window (OpenAI's ``context_length_exceeded``,
  llama-server's ``exceed_context_size_error``, Anthropic's "prompt is too long", vLLM's
  "This model's maximum context length is ...") or a request over the provider's size limit
  (a 413, ``request_too_large``) is RESOURCE_EXHAUSTED, as the simulator's: a size limit, the
  request's, not retried. So is a request that alone is over the account's per-minute token
  limit (OpenAI's 429 "Request too large for ... on tokens per min (TPM): Limit 30000,
  Requested 45000"): unlike a rate limit reached, no wait makes it pass, on any replica.
  Anthropic's 429 "This request would exceed the rate limit for your organization (...) of
  30,000 input tokens per minute" does not say whether the request alone is over it: its limit
  (``anthropic-ratelimit-input-tokens-limit``, else the message's figure) is compared with the
  request's own input (``_own_input``: Plan's count of the prompt, else the row's tokenizer's,
  less the prompt up to its last cache breakpoint, which may be a cache read Anthropic does not
  count); over it by more than ``failures.ESTIMATE_MARGIN``, the request is refused so, else
  retried as a rate limit.
- Another 400-class refusal is INVALID_ARGUMENT with the provider's message (credentials scrubbed);
  so is a 403 or 404 that concerns the model (OpenAI's ``model_not_found``: the key may not use
  it, or it does not exist; Anthropic's 404 "model: ..."), which the router hands to the client
  rather than to every replica. Any other 403 (OpenAI's ``request_forbidden``: this account's
  key may not be used from where the replica runs) or 404 (a base URL without its ``/v1``:
  vLLM's ``{"detail": "Not Found"}``, quoted) is the replica's: UNAVAILABLE at once, so the
  router hands the request to the next replica and counts it towards this one's ejection.
- A 401, or an error typed as our credentials' (``failures._AUTH_TYPES``), means our key: the
  replica reports NOT_SERVING on its health, says so in one log line, refuses calls
  (UNAVAILABLE, so the router uses another replica) and lets one call through again after
  ``auth_recheck_s``.
- An account that cannot pay (Anthropic's 400 "Your credit balance is too low", its
  ``billing_error``, OpenAI's 429 ``insufficient_quota``, never retried) is the replica's
  too, not the request's: the same, NOT_SERVING, refused calls (UNAVAILABLE, the router's
  next replica or tier serves), one call through again after ``auth_recheck_s`` (credit
  bought meanwhile: it serves again).
- After the first token nothing is retried: a stream that breaks (an error event, a cut
  connection, the deadline) ends with ``end.interrupted`` carrying what was produced, so the
  router bills it and never stores it. An answer still running at the deadline ends so a
  margin before it (0.25 s, or 5% of a shorter deadline: ``services.common.deadlines``), so
  that this end, with the usage the provider reported so far, reaches the router before the
  call's gRPC deadline ends the call. So does a call the provider reported its prompt's usage
  for (Anthropic's message_start, after which it bills the prompt and its cache writes) with no
  token yet: a ``start`` (the reported prompt, flagged ``cut_before_first_token``: no first
  token, so the router counts the call for the replica's health as a deadline before any
  start, and takes no prefill-rate sample from it), then that end; before, it failed
  DEADLINE_EXCEEDED without one and the router billed nothing. OpenAI reports nothing before
  its first token (its usage chunk comes last): there is nothing to bill it by. A failure
  after the final event (OpenAI's finish_reason and usage chunk, Anthropic's message_delta,
  came; only ``[DONE]`` / ``message_stop`` did not: the connection lost, an error event or
  chunk in its place) is no break: the adapter ends the answer as the provider reported it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
import traceback
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Protocol

from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.clock import SecondsClock, Throttles, suppressed
from services.common.deadlines import end_margin_s
from services.common.errors import Code, RequestError, shown
from services.common.models import ModelSpec
from services.common.prompt import cacheable_tokens, prompt_tokens
from services.common.tokens import Tokenizer, Tokenizers
from services.model.fair_queue import QUEUE_WAIT_ATTRIBUTE, FairQueue, QueueWatcher
from services.model.providers.cache_key import for_provider
from services.model.providers.config import ProviderSettings, provider_name
from services.model.providers.failures import (
    UNSENDABLE,
    Failure,
    Kind,
    Over,
    alone_over,
    broke_off,
    classify,
    for_the_operator,
    identifiers,
    over,
    provider_said,
    request_id_fields,
    request_id_shown,
    whole_seconds,
)
from services.model.providers.output_cut import OutputCut, exact_tokenizer
from services.model.providers.progress import Progress, reported_prompt_tokens
from services.model.providers.redact import Redactor
from services.model.providers.usage_check import most_tokens

log = logging.getLogger("cachemesh.model")
Sleep = Callable[[float], Awaitable[None]]
HealthSetter = Callable[[bool], Awaitable[None]]
QueueWaits = Callable[[str, float], None]  # a call's wait for the gate, by model (metrics)
_BYTES_A_TOKEN = 4  # a request without Plan's prompt count: its size, for the gate's cost
_DEADLINE_MARGIN_S = 0.05  # a retry must be able to start this long before the deadline
_NO_DEADLINE_S = 300.0  # a call that came without a deadline
_OUT = (Kind.AUTH, Kind.ACCOUNT)  # the replica's key or account: NOT_SERVING until rechecked
# the provider's outage (calls failed after their retries, or unexpectedly) logged at most one
# line this often for each kind, status and model (the first at once): else a line a request
_OUTAGE = (Kind.RETRY, Kind.FATAL)
FAILED_LOG_EVERY_MS = 10_000
# the span attribute naming the provider's id of the call (its log field: REQUEST_ID_FIELD)
REQUEST_ID_ATTRIBUTE = "cachemesh.provider.request_id"


class Adapter(Protocol):
    backend: str

    def stream(
        self,
        spec: ModelSpec,
        request: pb.CompleteRequest,
        progress: Progress,
        timeout_s: float,
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]: ...

    async def close(self) -> None: ...


class ProviderApi:
    def __init__(
        self,
        *,
        adapter: Adapter,
        models: Mapping[str, ModelSpec],
        replica_id: str,
        settings: ProviderSettings,
        tokenizer: Tokenizers | Tokenizer,
        set_health: HealthSetter,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        max_concurrent_calls: int = 0,
        watcher: QueueWatcher | None = None,
        waits: QueueWaits | None = None,
    ) -> None:
        """``max_concurrent_calls``: the calls let through to the engine at once, the rest
        waiting in a tenant-fair queue (``fair_queue``; 0: no gate); ``watcher`` and
        ``waits``: that queue's calls waiting by tenant, and each call's wait by model."""
        if max_concurrent_calls < 0:
            raise ValueError(f"max_concurrent_calls must be >= 0, got {max_concurrent_calls}")
        self._gate = (
            FairQueue(max_concurrent_calls, clock, watcher=watcher)
            if max_concurrent_calls
            else None
        )
        self._gate_size = max_concurrent_calls
        self._waits = waits
        self._adapter = adapter
        self._models = dict(models)  # under their upstream names (ModelSettings)
        self._replica = replica_id
        self._s = settings
        # each row's tokenizer (one Tokenizer: the only vocabulary), for the output it counts
        self._tokenizers = Tokenizers.covering(tokenizer, self._models.values())
        self._set_health = set_health
        self._clock = clock
        self._sleep = sleep
        self._failed_log = Throttles(SecondsClock(clock), FAILED_LOG_EVERY_MS)
        self._redactor = Redactor(settings.secrets())
        self._out_at: float | None = None  # when our key or account was last refused
        self._out_kind = Kind.AUTH  # which of the two
        self._rechecking = False  # a call is trying the refused key or account again

    @property
    def redactor(self) -> Redactor:
        return self._redactor

    async def close(self) -> None:
        await self._adapter.close()

    async def generate(
        self, request: model_pb2.GenerateRequest, time_remaining_s: float | None = None
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        spec = self._spec(request)
        span = trace.get_current_span()
        span.set_attribute("gen_ai.operation.name", "chat")
        span.set_attribute("gen_ai.provider.name", self._adapter.backend)
        span.set_attribute("gen_ai.request.model", spec.upstream)
        span.set_attribute("cachemesh.replica", self._replica)
        recheck = self._refuse_while_out(spec)
        gate, held = self._gate, False
        try:
            if gate is not None:
                time_remaining_s = await self._admitted(gate, request, spec, span, time_remaining_s)
                held = True
            async with contextlib.aclosing(
                self._generate(request, spec, span, time_remaining_s)
            ) as chunks:
                async for chunk in chunks:
                    if recheck:  # the provider answers: it took the key (or account)
                        await self._healthy(spec)
                        recheck = self._rechecking = False
                    if held and gate is not None and chunk.WhichOneof("part") == "end":
                        held = False  # the engine is done with it, however slowly it is read
                        gate.release()
                    yield chunk
        finally:
            if held and gate is not None:
                gate.release()  # failed, refused or left: the next call's turn
            if recheck:  # refused again, failed otherwise, or left: the next recheck may go
                self._rechecking = False

    async def _admitted(
        self,
        gate: FairQueue,
        request: model_pb2.GenerateRequest,
        spec: ModelSpec,
        span: trace.Span,
        time_remaining_s: float | None,
    ) -> float | None:
        """Waits for the call's turn at the engine (``MODEL_MAX_CONCURRENT_CALLS``), within
        its deadline; the time it then has left. Its cost: Plan's prompt tokens (the engine's
        KV reuse is known only at its end), else the request's size at 4 bytes a token."""
        if request.HasField("prompt"):
            cost = request.prompt.prompt_tokens
        else:
            cost = request.request.ByteSize() // _BYTES_A_TOKEN
        ahead = gate.running + gate.waiting
        try:
            async with asyncio.timeout(time_remaining_s):
                admission = await gate.acquire(request.tenant, cost)
        except TimeoutError:
            raise RequestError(
                Code.DEADLINE_EXCEEDED,
                f"replica {self._replica}: the request's deadline ({time_remaining_s:.1f}s) "
                f"passed while it waited for one of the engine's {self._gate_size} places "
                f"(MODEL_MAX_CONCURRENT_CALLS), {ahead} calls ahead of it",
                f"no place at the engine within the request's deadline ({time_remaining_s:.1f} s)",
            ) from None
        span.set_attribute(QUEUE_WAIT_ATTRIBUTE, round(admission.waited_s * 1000, 3))
        if self._waits is not None:
            self._waits(spec.id, admission.waited_s)
        if time_remaining_s is None:
            return None
        return max(time_remaining_s - admission.waited_s, 0.001)

    async def _generate(
        self,
        request: model_pb2.GenerateRequest,
        spec: ModelSpec,
        span: trace.Span,
        time_remaining_s: float | None,
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        budget = time_remaining_s if time_remaining_s is not None else _NO_DEADLINE_S
        deadline = self._clock() + budget
        # an answer under way ends sooner, so that its interrupted end (the provider's usage so
        # far, the bill) reaches the caller before the call's gRPC deadline ends the call
        ends_by = deadline - (end_margin_s(budget) if time_remaining_s is not None else 0.0)
        span.set_attribute("cachemesh.deadline_ms", round(budget * 1000))
        tries = 0
        own_input: int | None = None  # counted at the first rate limit that names its tokens
        upstream = for_provider(request)  # its prompt_cache_key the tenant's own
        while True:
            tries += 1
            progress = Progress(
                self._replica,
                self._adapter.backend,
                request.prompt.prompt_tokens if request.HasField("prompt") else 0,
                count=self._tokenizers.for_spec(spec).count_once,
                tenant_fair_queue=self._gate is not None,
                shown_request_id=self._request_id,
            )
            cut = OutputCut(
                request.request.max_tokens,
                spec.max_output_tokens,
                self._tokenizers.for_spec(spec).count_once,
                exact=exact_tokenizer(spec),
            )
            cut_short = False
            failed_id = ""  # the id a provider's error names (else its stream's)
            try:
                remaining = deadline - self._clock()
                stream = self._adapter.stream(spec, upstream, progress, max(0.001, remaining))
                async with contextlib.aclosing(stream):
                    # The deadline bounds each wait for the adapter, never a yield: a timeout
                    # around a yield fires in the consumer's task (e.g. while it writes to a
                    # slow client), as a CancelledError the adapter never sees.
                    while True:
                        # once the provider reported the prompt (Anthropic's message_start),
                        # which it bills, the call ends in time to send that usage too
                        reported = progress.started or progress.usage is not None
                        until = ends_by if reported else deadline
                        if (chunk := await _next(stream, until - self._clock())) is None:
                            break
                        if not progress.started and chunk.WhichOneof("part") == "progress":
                            continue  # that report (``Progress.reported``): the wait is shorter
                        yield self._annotated(span, chunk, progress, spec)
                        if chunk.WhichOneof("part") != "end" and cut.passed(progress):
                            # an upstream writing on past max_tokens (or thinking past the
                            # row's max_output_tokens): closing its stream (leaving this
                            # block) closes the connection, and it stops
                            cut_short = True
                            break
                if cut_short:
                    yield self._cut(progress, spec, cut, span)
                else:
                    log.debug(
                        "%s answered %s",
                        self._who(spec),
                        spec.id,
                        extra=request_id_fields(progress.request_id),
                    )
                # (not back in service for this: a call that began before the key or account
                # was refused proves nothing of it now; only a recheck does, ``generate``)
                return
            except TimeoutError:
                if progress.usage is not None and not progress.started:
                    # no token yet, but a prompt the provider bills: a start so that the
                    # router bills the call, then the usage in the interrupted end; flagged,
                    # so that the router judges the replica as for no start by the deadline
                    start = progress.start(reported_prompt_tokens(progress.usage))
                    start.start.cut_before_first_token = True
                    yield self._annotated(span, start, progress, spec)
                if progress.started:
                    yield self._interrupted(
                        progress, spec, f"no answer within the deadline ({budget:.1f}s)"
                    )
                    return
                raise RequestError(
                    Code.DEADLINE_EXCEEDED,
                    f"{self._who(spec)} did not answer within the deadline "
                    f"({budget:.1f}s, {tries} tries)",
                    f"no answer within the request's deadline ({budget:.1f} s)",
                ) from None
            except Exception as exc:  # an SDK error: classify; CancelledError passes
                failure = self._redacted(classify(exc))
                message = failure.message
                # the provider's id of this try: its error's, else its stream's
                request_id = failed_id = failure.request_id or progress.request_id
                # its message, which may quote the request, at DEBUG only: the lines above
                # DEBUG and the spans name its identifiers (``identifiers``)
                provider_said(self._who(spec), spec.id, failure)
                if progress.started:
                    log.warning(
                        "%s stream of %s broke mid-answer (%s)",
                        self._who(spec),
                        spec.id,
                        identifiers(failure),
                        extra=request_id_fields(request_id),
                    )
                    yield self._interrupted(progress, spec, broke_off(failure))
                    return
                if failure.kind == Kind.RETRY and failure.token_limit is not None:
                    if own_input is None:  # the request alone over it? no wait would pass
                        own_input = await asyncio.to_thread(self._own_input, request, spec)
                    failure = alone_over(failure, own_input)
                # a provider's answer (its status, or its error event's) is no surprise: the
                # refusal's line says it (its identifiers: a traceback would quote its message,
                # which may quote the request)
                if (
                    failure.kind == Kind.FATAL
                    and not failure.status
                    and not failure.from_provider
                    and not isinstance(exc, RequestError)
                ):
                    self._log_unexpected(spec, failure)
                wait, why = self._retry_wait(failure, tries, deadline)
                if wait is None:
                    refusal = await self._refusal(failure, message, why, spec, tries)
                    if failure.kind not in _OUT:  # those have their own log line
                        # the refusal in the log's words: the provider's identifiers where
                        # the caller reads its message (a 400's, quoting the caller's prompt)
                        logged = self._refused(
                            failure, identifiers(failure), why, spec, tries, logged=True
                        )
                        self._log_refusal(spec.id, failure, logged.message, request_id)
                    raise refusal from None
                span.set_attribute("cachemesh.provider.retries", tries)
                span.add_event(
                    "cachemesh.provider.retry",
                    {
                        "http.status": failure.status,
                        "error.type": failure.error_type,
                        "wait_s": wait,
                        **({REQUEST_ID_ATTRIBUTE: request_id} if request_id else {}),
                    },
                )
                log.info(
                    "%s answered %s %s; retry %d in %.2fs",
                    self._who(spec),
                    failure.status,
                    failure.error_type,
                    tries,
                    wait,
                    extra=request_id_fields(request_id),
                )
                await self._sleep(wait)
            finally:
                # however the try ended: answered, cut, timed out, failed, or left by the
                # caller (closed or cancelled: a client gone, the router's stall hand-over);
                # a retried try's id is set first, the answering try's last
                if request_id := failed_id or progress.request_id:
                    span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)

    def _own_input(self, request: model_pb2.GenerateRequest, spec: ModelSpec) -> int:
        """The request's input a provider surely counts towards its input token limit: Plan's
        count of the prompt (else the row's tokenizer's: cl100k_base for an Anthropic row, an
        estimate of Claude's count), less the prompt up to its last cache breakpoint (which may
        be read from the cache: Anthropic does not count a read). Blocking: in a thread."""
        tokenizer = self._tokenizers.for_spec(spec)
        whole = request.prompt.prompt_tokens if request.HasField("prompt") else 0
        if whole <= 0:
            whole = prompt_tokens(request.request, tokenizer)
        return max(0, whole - cacheable_tokens(request.request, tokenizer))

    def _spec(self, request: model_pb2.GenerateRequest) -> ModelSpec:
        if not request.tenant:
            raise RequestError(Code.INVALID_ARGUMENT, "tenant is required", "no tenant")
        spec = self._models.get(request.model)
        if spec is None:
            served = ", ".join(self._models)
            raise RequestError(
                Code.INVALID_ARGUMENT,
                f"model {shown(request.model)} is not served by replica {self._replica}; "
                f"it serves: {served}",
                "the model is not served by the replica it was sent to",
            )
        if not 0 < request.request.max_tokens <= spec.max_output_tokens:
            raise RequestError(
                Code.INVALID_ARGUMENT,
                f"max_tokens must be between 1 and {spec.max_output_tokens} for {spec.id}, "
                f"got {request.request.max_tokens}",
                f"max_tokens out of the range of {spec.id}",
            )
        if not request.request.messages:
            raise RequestError(Code.INVALID_ARGUMENT, "request.messages is empty", "no messages")
        return spec

    def _annotated(
        self,
        span: trace.Span,
        chunk: model_pb2.GenerateChunk,
        progress: Progress,
        spec: ModelSpec,
    ) -> model_pb2.GenerateChunk:
        if chunk.WhichOneof("part") == "end":
            end = chunk.end
            self._distrusted(span, end, progress, spec)
            if not end.HasField("provider_usage"):
                # the engine reported no usage (no stream_options support): count what it
                # wrote, text, tool calls and thinking
                end.output_tokens = self._produced_tokens(progress, spec)
            span.set_attribute("gen_ai.usage.output_tokens", end.output_tokens)
            span.set_attribute("gen_ai.response.finish_reasons", [end.stop_reason])
            span.set_attribute("cachemesh.provider_reported", end.HasField("provider_usage"))
            if end.reasoning_tokens:
                span.set_attribute("gen_ai.usage.reasoning_tokens", end.reasoning_tokens)
        elif chunk.WhichOneof("part") == "start":
            span.set_attribute("gen_ai.usage.input_tokens", chunk.start.prompt_tokens)
        return chunk

    def _produced_tokens(self, progress: Progress, spec: ModelSpec) -> int:
        """The count of what the model wrote (``Progress.output_tokens``: its text, its tool
        calls and its thinking with ``spec``'s tokenizer, or its non-empty pieces when they are
        more; a tool call's arguments and a reasoning model's thinking are output tokens the
        provider bills, finished or cut), held to the row's reach
        (``usage_check.most_tokens``) as a provider's report is: no call of the row writes
        more."""
        return min(progress.output_tokens(), most_tokens(spec))

    def _interrupted(
        self, progress: Progress, spec: ModelSpec, error: str
    ) -> model_pb2.GenerateChunk:
        """What was produced before the break: its count (text, tool calls and thinking,
        with the row's tokenizer), and the provider's usage so far (Anthropic reports the prompt's
        split at message_start) with that output count in it."""
        end = model_pb2.GenerateEnd(stop_reason="interrupted", interrupted=True, error=error)
        self._so_far(progress, spec, end, trace.get_current_span())
        return model_pb2.GenerateChunk(end=end)

    def _cut(
        self, progress: Progress, spec: ModelSpec, cut: OutputCut, span: trace.Span
    ) -> model_pb2.GenerateChunk:
        """The end of an answer cut for writing past its max_tokens, or for its output,
        thinking included, past the row's max_output_tokens (``OutputCut``): ended as cut by
        length (``max_tokens``: the caller is told it may be cut, L1 never stores it), billed
        as an interrupted answer is (the provider's usage so far, else our count of all the
        model wrote, its thinking too). One line (once a ``FAILED_LOG_EVERY_MS`` for each
        model at most): which limit the upstream ignored."""
        end = model_pb2.GenerateEnd(stop_reason="max_tokens")
        self._so_far(progress, spec, end, span)
        span.set_attribute("cachemesh.output_cut", True)
        span.set_attribute("gen_ai.usage.output_tokens", end.output_tokens)
        span.set_attribute("gen_ai.response.finish_reasons", [end.stop_reason])
        if due := self._failed_log.due(spec.id, "output cut"):
            gauge = cut.fired or cut.visible
            if gauge is cut.whole:
                what = (
                    f"the model's max_output_tokens ({spec.max_output_tokens}) in all its "
                    "output, thinking included"
                )
                why = "the upstream wrote more than the model can"
            else:
                what = "the request's max_tokens in its text and tool calls"
                why = "the upstream ignores max_tokens"
            log.warning(
                "%s: %s wrote past %s (at least %d tokens by our count or its pieces, the cut "
                "is at %d): its stream was closed and the answer ended as cut by length, "
                "billed %d output tokens; %s%s",
                spec.id,
                self._who(spec),
                what,
                gauge.tokens,
                gauge.limit,
                end.output_tokens,
                why,
                suppressed(due, FAILED_LOG_EVERY_MS),
                extra=request_id_fields(progress.request_id),
            )
        return model_pb2.GenerateChunk(end=end)

    def _so_far(
        self, progress: Progress, spec: ModelSpec, end: model_pb2.GenerateEnd, span: trace.Span
    ) -> None:
        """``end``'s bill of an answer that ended before its provider's end: the count of
        what was produced (text, tool calls and thinking, with the row's tokenizer), and the
        provider's usage so far (Anthropic reports the prompt's split at message_start) with
        that output count in it."""
        produced = self._produced_tokens(progress, spec)
        end.output_tokens = produced
        # a sure lower bound of the visible output: the router's deadline cut says an answer
        # had written all of its max_tokens only by it
        end.visible_pieces = progress.visible_pieces
        if progress.usage is not None:
            end.provider_usage.CopyFrom(progress.usage)
            kind = end.provider_usage.WhichOneof("report")
            if kind == "anthropic":
                end.provider_usage.anthropic.output_tokens = produced
            elif kind == "openai":  # a usage chunk came before the finish_reason, then the break
                report = end.provider_usage.openai
                if not report.completion_tokens and produced:  # left null: counted here
                    report.completion_tokens = produced
                    report.total_tokens = report.prompt_tokens + produced
                end.output_tokens = report.completion_tokens
        self._distrusted(span, end, progress, spec)

    def _distrusted(
        self, span: trace.Span, end: model_pb2.GenerateEnd, progress: Progress, spec: ModelSpec
    ) -> None:
        """The usage fields the provider reported with a count no call has (``usage_check``),
        on the end (the replica's metrics count them) and the span, and in a line (once a
        ``FAILED_LOG_EVERY_MS`` for each model at most): each field and why, never its value."""
        if not progress.distrusted:
            return
        fields = sorted(progress.distrusted)
        end.distrusted_usage[:] = fields
        span.set_attribute("cachemesh.usage_distrusted", fields)
        if due := self._failed_log.due(spec.id, "distrusted usage"):
            log.warning(
                "%s: %s reported usage no call has, billed as not reported (Plan's prompt "
                "count, the replica's output count): %s%s",
                spec.id,
                self._who(spec),
                "; ".join(f"{name} {progress.distrusted[name]}" for name in fields),
                suppressed(due, FAILED_LOG_EVERY_MS),
            )

    def _request_id(self, value: object) -> str:
        """A provider's id of a call as it may be shown (``request_id_shown``: a short
        identifier), and never a credential (one the redactor would change is not shown: a
        proxy's header echoing the key); "" otherwise."""
        shown = request_id_shown(value)
        return shown if shown and self._redactor.clean(shown) == shown else ""

    def _redacted(self, failure: Failure) -> Failure:
        """``failure`` as it may leave the adapter: its type and message, the provider's text,
        without a credential (the message cut to an error message's length too). Only
        ``classify``, before this, reads the type as the provider sent it."""
        return dataclasses.replace(
            failure,
            error_type=self._redactor.clean(failure.error_type),
            message=self._redactor.message(failure.message),
            request_id=self._request_id(failure.request_id),
            code=self._redactor.clean(failure.code),
            param=self._redactor.clean(failure.param),
        )

    def _retry_wait(
        self, failure: Failure, tries: int, deadline: float
    ) -> tuple[float | None, str]:
        """The wait before the next try, or None and why there is none."""
        if failure.kind != Kind.RETRY:
            return None, ""
        if tries > self._s.max_retries:
            if tries == 1:  # PROVIDER_MAX_RETRIES 0: the callers retry, as they did before
                return None, "after 1 try (this replica's retries are off)"
            return None, f"after {tries} tries"
        if failure.retry_after_s is not None:
            wait = failure.retry_after_s
            what = f"its retry-after ({wait:.1f} s)"
        else:
            wait = self._backoff_s(tries)
            wait *= 0.5 + random.random() / 2  # jitter: concurrent retries spread out
            what = f"a retry's backoff ({wait:.2f} s)"
        left = deadline - self._clock()
        if wait >= left - _DEADLINE_MARGIN_S:  # the wait would outlast the deadline: hand over
            return None, f"{what} outlasts the request's deadline ({max(left, 0.0):.1f} s left)"
        return wait, ""

    def _backoff_s(self, tries: int) -> float:
        """The backoff after ``tries`` failed tries, before its jitter: ``backoff_s`` doubling
        each try, at most ``backoff_max_s``."""
        return float(min(self._s.backoff_max_s, self._s.backoff_s * 2 ** (tries - 1)))

    def _spent_wait(self, failure: Failure, tries: int) -> int | None:
        """The wait a caller is told (``retry-after``) once this replica spent its retries on
        ``failure`` (``max_retries`` of a 529 / 503 / 429 ...): the provider's own retry-after,
        else the backoff the next try would have waited; None while retries were left (the
        call handed over for a wait outlasting the deadline says only the provider's), and
        None when the replica made no retry (``max_retries`` 0, the operator's choice: its one
        try is no retry, so its callers retry as they did before, the provider's own
        retry-after, if any, their wait)."""
        if failure.kind != Kind.RETRY or tries <= self._s.max_retries or tries < 2:
            return None
        if failure.retry_after_s is not None:
            return whole_seconds(failure.retry_after_s)
        return max(1, math.ceil(self._backoff_s(tries)))  # (the try after ``tries``)

    def _log_unexpected(self, spec: ModelSpec, failure: Failure) -> None:
        """A call that failed unexpectedly (called while its exception is handled): its
        traceback, once a ``FAILED_LOG_EVERY_MS`` for each error type at most."""
        if due := self._failed_log.due(spec.id, f"unexpected {failure.error_type}"):
            log.error(
                "%s call of %s failed unexpectedly%s: %s",
                self._who(spec),
                spec.id,
                suppressed(due, FAILED_LOG_EVERY_MS),
                self._redactor.clean(traceback.format_exc()),
            )

    def _log_refusal(self, model: str, failure: Failure, refused: str, request_id: str) -> None:
        """A call refused (``refused``: the refusal in the log's words, the provider's
        identifiers, never its message): the request's own fault each time; the provider's
        outage (``_OUTAGE``) once a ``FAILED_LOG_EVERY_MS`` for each status and error type at
        most, saying how many were not logged (each one is on its call's span, with the
        provider's id of the call, and in the replica's metrics); a line names the provider's
        id of its call."""
        if failure.kind not in _OUTAGE:
            log.warning("%s: %s", model, refused, extra=request_id_fields(request_id))
            return
        kind = f"{failure.kind.value} {failure.status} {failure.error_type}"
        if due := self._failed_log.due(model, kind):
            log.warning(
                "%s: %s%s",
                model,
                refused,
                suppressed(due, FAILED_LOG_EVERY_MS),
                extra=request_id_fields(request_id),
            )

    def _who(self, spec: ModelSpec) -> str:
        """The row's provider as its errors and lines name it (``provider_name``)."""
        return provider_name(spec, self._adapter.backend)

    async def _refusal(
        self, failure: Failure, message: str, why: str, spec: ModelSpec, tries: int
    ) -> RequestError:
        """The refusal the caller is told (``_refused``), our key or account taken out first
        when the provider refused them."""
        if failure.kind in _OUT:
            await self._taken_out(failure, spec)
        return self._refused(failure, message, why, spec, tries)

    def _refused(
        self,
        failure: Failure,
        message: str,
        why: str,
        spec: ModelSpec,
        tries: int,
        *,
        logged: bool = False,
    ) -> RequestError:
        """The refusal of ``failure``; ``message``: the provider's as the caller's error
        quotes it (a 400's, a prompt over the window: the request's own fault, the caller's
        own text), or its identifiers for a line. No other refusal quotes the provider's
        message (it may quote the request: the router's span, the replica's line hold them);
        its identifiers only (``identifiers``). The request's own faults carry those as their
        ``reason``: what the router's span of the call says. ``logged``: ``message`` is the
        identifiers, which begin with the status (said once, not before them again)."""
        model = spec.id
        backend = self._who(spec)
        said = f"{backend} refused the request ({identifiers(failure)})"
        if failure.error_type == UNSENDABLE:  # never sent: the SDK could not encode it
            return RequestError(
                Code.INVALID_ARGUMENT,
                f"the request could not be sent to {backend}, whose body must be standard "
                f"JSON ({message})",
                f"the request could not be sent to {backend}: not standard JSON",
            )
        if failure.kind == Kind.CLIENT:
            status = "" if logged else f" ({failure.status})"
            return RequestError(
                Code.INVALID_ARGUMENT, f"{backend} refused the request{status}: {message}", said
            )
        if failure.kind == Kind.TOO_LARGE:  # the simulator's status for it, a size limit
            status = f"{failure.status} {failure.error_type}" if failure.status else ""
            if logged:  # (the identifiers, ``message``, begin with it)
                status = ""
            limit = over(failure)
            if limit is Over.CONTEXT_WINDOW:  # (the HTTP front's 400, not its 413)
                what = f"the prompt is over {model}'s context window"
                fix = "shorten the messages, system or tools, or lower max_tokens"
            elif limit is Over.TOKEN_RATE:  # no wait makes it pass (the HTTP front's 413)
                what = f"the request alone is over the {backend} account's per-minute token limit"
                if failure.token_limit is not None and failure.request_tokens is not None:
                    what += (  # our estimate against the provider's limit (Anthropic's)
                        f" of {failure.token_limit:,} input tokens: its prompt is about "
                        f"{failure.request_tokens:,} tokens outside its cache breakpoints"
                    )
                fix = "shorten the messages, system or tools, or lower max_tokens (it counts too)"
            else:
                what, fix = "the request is over its size limit", "shorten the request"
            return RequestError(
                Code.RESOURCE_EXHAUSTED,
                f"{backend} refused the request{f' ({status})' if status else ''}: {what} "
                f"({message}); {fix}",
                said,
            )
        if failure.kind == Kind.AUTH:
            return RequestError(
                Code.UNAVAILABLE,
                f"replica {self._replica}: {backend} refused this replica's credentials "
                f"({failure.status}); another replica may serve",
                f"{backend} refused a replica's credentials ({failure.status})",
            )
        if failure.kind == Kind.ACCOUNT:
            return RequestError(
                Code.UNAVAILABLE,
                f"replica {self._replica}: {backend} refused this replica's account "
                f"({identifiers(failure)}); another replica may serve",
                f"{backend} refused a replica's account, out of credit or quota ({failure.status})",
            )
        status = f"{failure.status} {failure.error_type}" if failure.status else failure.error_type
        after = f"; {why}" if why else ""
        check = ""  # for the operator (the replica's line), not the client (the reason)
        if failure.kind == Kind.FATAL and failure.status in (403, 404):
            if failure.about_model:  # not served there, or not to this key
                check = (
                    f"; does this replica serve {model}'s upstream model with this key? "
                    "(MODEL_UPSTREAM_IDS, the engine's loaded model, the model's retirement)"
                )
            elif failure.status == 404:  # a path it does not serve
                adapter = self._adapter.backend  # its settings' names: OPENAI_BASE_URL ...
                base = "ends in /v1" if adapter == "openai" else "has no /v1: the SDK adds it"
                check = f"; is {adapter.upper()}_BASE_URL ({self._s.shown_url}) right? (it {base})"
        # its retries spent: the callers above (the router, the client's SDK) are told to wait
        # and not to retry at once, each retry of theirs being as many provider calls again
        spent = self._spent_wait(failure, tries)
        backoff_wait = spent is not None and failure.retry_after_s is None
        return RequestError(
            Code.UNAVAILABLE,
            f"{backend} could not serve ({identifiers(failure)}){after}{check}",
            f"{backend} {status}{after}",
            retry_after_s=spent
            if spent is not None
            else whole_seconds(failure.retry_after_s)
            if failure.kind == Kind.RETRY
            else None,
            retried=spent is not None,
            backoff_wait=backoff_wait,
        )

    def _refuse_while_out(self, spec: ModelSpec) -> bool:
        """Refuses a call while the provider refuses this replica's key or account, but one
        each ``auth_recheck_s``, which tries them again: True for that one. The calls arriving
        while it waits for the provider's answer are refused too (before, every one of them
        went to the provider with the refused key)."""
        failed = self._out_at
        if failed is None:
            return False
        if not self._rechecking and self._clock() - failed >= self._s.auth_recheck_s:
            self._rechecking = True  # time to try the key (the account) again: this call does
            return True
        backend = self._who(spec)
        if self._out_kind == Kind.ACCOUNT:
            raise RequestError(
                Code.UNAVAILABLE,
                f"replica {self._replica}: {backend} refused this replica's account (no "
                "credit or quota); it is NOT_SERVING until some is added",
                f"{backend} refused a replica's account, out of credit or quota",
            )
        raise RequestError(
            Code.UNAVAILABLE,
            f"replica {self._replica}: {backend} refused this replica's "
            "credentials; it is NOT_SERVING until they are fixed",
        )

    async def _taken_out(self, failure: Failure, spec: ModelSpec) -> None:
        """Our key (``AUTH``) or our account (``ACCOUNT``) was refused: NOT_SERVING, one line
        (the provider's identifiers; its message is at DEBUG, ``provider_said``)."""
        first = self._out_at is None
        self._out_at = self._clock()
        self._out_kind = failure.kind
        if not first:
            return
        await self._set_health(False)
        who, adapter = self._who(spec), self._adapter.backend
        # the provider's own words only from its own API (a hosted row at its default URL)
        hosted = spec.provider == adapter and self._s.at_the_providers_own_url
        if failure.kind == Kind.ACCOUNT:
            log.error(
                "%s refused the account of replica %s (%s): NOT_SERVING; add credit (or "
                "quota) to the account of its API key, the replica tries again every %.0f s "
                "(PROVIDER_AUTH_RECHECK_S)",
                who,
                self._replica,
                for_the_operator(failure, hosted=hosted),
                self._s.auth_recheck_s,
                extra=request_id_fields(failure.request_id),
            )
            return
        log.error(
            "%s refused the credentials of replica %s (%s): NOT_SERVING; fix the "
            "API key (%s_API_KEY or %s_API_KEY_FILE) and restart the replica",
            who,
            self._replica,
            for_the_operator(failure, hosted=hosted),
            adapter.upper(),
            adapter.upper(),
            extra=request_id_fields(failure.request_id),
        )

    async def _healthy(self, spec: ModelSpec) -> None:
        if self._out_at is not None:
            self._out_at = None
            await self._set_health(True)
            what = "account" if self._out_kind == Kind.ACCOUNT else "credentials"
            log.info(
                "%s accepts the %s of replica %s again: SERVING",
                self._who(spec),
                what,
                self._replica,
            )


async def _next(
    stream: AsyncGenerator[model_pb2.GenerateChunk, None], remaining_s: float
) -> model_pb2.GenerateChunk | None:
    """The stream's next chunk (None at its end), or TimeoutError after ``remaining_s``."""
    async with asyncio.timeout(max(0.0, remaining_s)):
        return await anext(stream, None)
