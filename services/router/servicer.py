"""The public ``cachemesh.v1.Gateway``: auth, validation, answer-once, then the pipeline."""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
from opentelemetry import trace

from cachemesh.retry_info import (
    BUDGET_EXHAUSTED,
    RATE_LIMITED,
    REQUEST_ID_KEY,
    REQUEST_TOO_LARGE,
    UNSUPPORTED_VALUE,
)
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from services.common import rpc_tracing
from services.common.aborts import abort
from services.common.auth import AmbiguousCredential, KeyLookup, bearer_token
from services.common.background import unless_cancelled
from services.common.clock import Clock, MonotonicClock, Throttles, suppressed
from services.common.errors import Code, RequestError
from services.common.fair_walks import FairWalks
from services.common.grace import GraceEnd
from services.common.models import ModelTable
from services.common.retry_info import (
    refusal_trailers,
    retry_trailers,
)
from services.common.server import DEFAULT_REQUEST_BYTES
from services.common.status import grpc_code
from services.router import spans
from services.router.access_log import Call, RequestLog, billed_late
from services.router.answer_ledger import (
    AnswerLedger,
    Claimed,
    LedgerOperation,
    LedgerUnavailable,
    Recorded,
    Running,
    new_claim,
)
from services.router.breaker import Breaker
from services.router.call_trailers import (
    PREVIOUS_ATTEMPTS_KEY,
    Metadata,
    channel_retried,
    failed_call_trailers,
)
from services.router.idempotency import (
    IdempotencyConflict,
    IdempotencyTable,
    conflict,
    fingerprint,
)
from services.router.limit_denials import Denial
from services.router.limit_policy import DAY_BUDGET, MONTH_BUDGET
from services.router.limit_tickets import ModelUse, Ticket
from services.router.limits import Limiter
from services.router.model_answer import DeadlineCut
from services.router.pipeline import Pipeline, chunks_of
from services.router.prompt_counts import counting
from services.router.validation import UnsupportedValue, validate_request

Context = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger(__name__)

# A call that is a retry: gRPC's retry policy marks its attempts after the first
# (``grpc-previous-rpc-attempts: N``, N >= 1); a caller's own retry (same request_id) may send
# ``cachemesh-retry: 1`` to get the same protection. By value: "0" or "" marks no retry.
RETRY_HEADERS = (PREVIOUS_ATTEMPTS_KEY, "cachemesh-retry")
LEDGER_TIMEOUT_S = 0.5  # the longest the answer ledger may hold an answer back
# (by ``asyncio.timeout``: Python 3.11's ``asyncio.wait_for`` drops a cancel that comes as the
# call it bounds ends, ``services.common.background``; a repeat whose caller left while it
# waited on another router's call went on waiting, 8 cancels at random instants of 200)
# a ledger call's failures (claim, give_back, record) logged at most once this often for each
# kind (the first at once): a Redis down was a WARNING line each request
LEDGER_FAILED_LOG_EVERY_MS = 10_000
# how often a retry whose id another router's call holds looks for that call's answer
CLAIM_POLL_S = 0.05
# A request larger than this is validated in a worker thread: validation walks every block in
# Python, and a 900 kB request of 100,000 one-letter messages (refused later for its context
# window) held the event loop, every tenant's requests and health checks with it, for 0.3-0.7 s;
# in a thread the loop runs between the interpreter's switches. One smaller is walked in a few
# milliseconds at most, less than the hop to a thread would cost it.
VALIDATE_IN_THREAD_BYTES = 64 * 1024

_UNAUTHENTICATED = (
    "send 'authorization: Bearer <key>' metadata with an API key issued for your tenant"
)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        keys: KeyLookup,
        table: ModelTable,
        deployed: set[str],
        pipeline: Pipeline,
        answers: IdempotencyTable,
        limiter: Limiter,
        log: RequestLog,
        ledger: AnswerLedger | None = None,
        ledger_failed: Callable[[LedgerOperation], None] = lambda operation: None,
        ledger_breaker: Breaker | None = None,
        clock: Clock | None = None,
        grace_end: GraceEnd | None = None,
        max_request_bytes: int = DEFAULT_REQUEST_BYTES,
    ) -> None:
        """``max_request_bytes``: ROUTER_MAX_REQUEST_BYTES, a larger request (serialized) is
        refused RESOURCE_EXHAUSTED naming it (gRPC reads larger ones, up to twice it, so that
        the router, not gRPC, refuses them).
        ``grace_end``: the server's, set when its drain's grace ends: a call cut then is
        recorded UNAVAILABLE (what its caller got), not as its caller's cancel.
        ``ledger_failed``: told of each call to ``ledger`` that failed or did not answer in
        ``LEDGER_TIMEOUT_S``, or was not made while ``ledger_breaker`` left its Redis alone
        (its renewals' failures: the ledger's own ``failed``); ``ledger_breaker``: None, the
        ledger is called whatever its earlier calls did; ``clock``: paces the ledger's failure
        lines (None: the monotonic clock)."""
        self._ledger_log = Throttles(
            clock if clock is not None else MonotonicClock(), LEDGER_FAILED_LOG_EVERY_MS
        )
        self._keys = keys
        self._table = table
        self._deployed = deployed
        self._pipeline = pipeline
        self._answers = answers
        self._limiter = limiter
        self._log = log  # the access-log line and the request metrics, when a call ends
        self._ledger = ledger
        self._ledger_failed = ledger_failed
        self._ledger_breaker = ledger_breaker
        self._grace_end = grace_end
        self._max_request_bytes = max_request_bytes
        # one thread of its own for the walks of large requests: a flood of them queues
        # there, not in the default executor (the key file's re-reads), each tenant's in a
        # queue of its own taken in turn
        self._walks = FairWalks("router-validate")
        self._background: set[asyncio.Task[None]] = set()  # claims given back
        self._handlers = 0  # Complete and StreamComplete calls whose handler has not ended
        self._no_handlers = asyncio.Event()
        self._no_handlers.set()

    def _cancelled(self) -> str:
        """How a cancelled call ended: UNAVAILABLE when the router's own shutdown cut it (the
        grace ended; its caller got UNAVAILABLE), else CANCELLED (its caller left)."""
        if self._grace_end is not None and self._grace_end.ended:
            return "UNAVAILABLE"
        return "CANCELLED"

    async def handlers_ended(self, timeout_s: float) -> bool:
        """Waits, at most ``timeout_s``, until no Complete or StreamComplete handler runs;
        False if some still did. At shutdown, after ``server.stop``: gRPC cancels the calls
        still in flight at the end of the grace and returns before their handlers have ended,
        and a cancelled model call's bill is only scheduled as its handler unwinds."""
        try:
            await asyncio.wait_for(self._no_handlers.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _entered(self) -> None:
        self._handlers += 1
        self._no_handlers.clear()

    def _left(self) -> None:
        self._handlers -= 1
        if self._handlers == 0:
            self._no_handlers.set()

    async def Complete(self, request: pb.CompleteRequest, context: Context) -> pb.CompleteResponse:
        call = self._log.begin("Complete")
        rpc_tracing.end_after(call.bills)  # its root span carries the bills that come after
        rpc_tracing.end_after(call.late_bills)
        ended = ""
        self._entered()
        try:
            own_id = bool(request.request_id)  # before ``_accept`` makes one up
            tenant = await self._accept(request, context, call)
            try:
                answered = self._answered(
                    tenant,
                    request,
                    call,
                    _is_retry(context),
                    context.time_remaining(),
                    streamed=False,
                    own_id=own_id,
                )
                async with aclosing(answered) as chunks:
                    async for chunk in chunks:
                        if chunk.WhichOneof("part") == "end":
                            ended = "OK"
                            return chunk.end
            except RequestError as exc:
                await _abort_failed(context, call, exc, _made_id(request, own_id))
            except _Denied as exc:
                await _refuse(context, tenant, exc.denial, _made_id(request, own_id))
            await abort(context, grpc.StatusCode.INTERNAL, "the request ended without an answer")
            raise AssertionError("unreachable: abort raises")
        except asyncio.CancelledError:
            ended = self._cancelled()
            raise
        finally:
            self._left()
            self._log.finish(call, request, _status(context, ended))

    async def StreamComplete(
        self, request: pb.CompleteRequest, context: Context
    ) -> AsyncIterator[pb.CompleteChunk]:
        call = self._log.begin("StreamComplete")
        rpc_tracing.end_after(call.bills)  # its root span carries the bills that come after
        rpc_tracing.end_after(call.late_bills)
        ended = ""
        self._entered()
        try:
            own_id = bool(request.request_id)  # before ``_accept`` makes one up
            tenant = await self._accept(request, context, call)
            try:
                answered = self._answered(
                    tenant,
                    request,
                    call,
                    _is_retry(context),
                    context.time_remaining(),
                    own_id=own_id,
                )
                async with aclosing(answered) as chunks:
                    async for chunk in chunks:
                        yield chunk
                ended = "OK"
            except RequestError as exc:
                await _abort_failed(context, call, exc, _made_id(request, own_id))
            except _Denied as exc:
                await _refuse(context, tenant, exc.denial, _made_id(request, own_id))
        except (asyncio.CancelledError, GeneratorExit):
            ended = self._cancelled()
            raise
        finally:
            self._left()
            self._log.finish(call, request, _status(context, ended))

    async def _accept(self, request: pb.CompleteRequest, context: Context, call: Call) -> str:
        """The caller's tenant, once its key and its request are valid (the limits come later:
        a retry of an answered request is served its answer whatever they say now)."""
        try:
            token = bearer_token(context.invocation_metadata())
        except AmbiguousCredential as exc:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, f"{exc}; {_UNAUTHENTICATED}")
        if token is None:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, "no API key: " + _UNAUTHENTICATED)
        tenant = await self._keys.checked_tenant_for(token or "")
        if tenant is None:
            await abort(
                context, grpc.StatusCode.UNAUTHENTICATED, "unknown API key: " + _UNAUTHENTICATED
            )
        call.tenant = tenant or ""
        # the root span names the tenant of every request, a refused one too (invalid, over
        # its limits); the request's fields once they are valid (the pipeline writes none)
        root = trace.get_current_span()
        root.set_attribute("cachemesh.tenant", call.tenant)
        size = request.ByteSize()  # before validation reads it all
        if size > self._max_request_bytes:
            root.set_attribute("cachemesh.request_bytes", size)
            message = too_large(size, self._max_request_bytes)
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                message,
                refusal_trailers(Code.RESOURCE_EXHAUSTED, message, REQUEST_TOO_LARGE),
            )
        try:
            if size > VALIDATE_IN_THREAD_BYTES:
                await self._walks.run(
                    call.tenant, validate_request, request, self._table, self._deployed
                )
            else:
                validate_request(request, self._table, self._deployed)
        except UnsupportedValue as exc:  # its status details say so (the HTTP front's code)
            trailers = refusal_trailers(exc.code, exc.message, UNSUPPORTED_VALUE)
            await abort(context, grpc_code(exc.code), exc.message, trailers)
        except RequestError as exc:
            await abort(context, grpc_code(exc.code), exc.message)
        if not request.request_id:  # its answer goes in no ledger: no caller knows this id
            request.request_id = uuid.uuid4().hex
        spans.request_attributes(root, call.tenant, request)
        assert tenant is not None
        return tenant

    async def _answered(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        call: Call,
        retried: bool,
        time_remaining_s: float | None,
        *,
        streamed: bool = True,
        own_id: bool = True,
    ) -> AsyncGenerator[pb.CompleteChunk, None]:
        """The request's chunks, once per request_id: a retry or a concurrent duplicate
        replays the first call's answer (not subject to the limits: it uses nothing, and the
        caller was billed for it); a new request is admitted by the limits (``_Denied``, which
        its waiting duplicates get too). A refused request's place in the answer-once table
        is given back, and the table is bounded only as answers are kept, so refusals never
        push another request's answer out of it. ``time_remaining_s``: the client's deadline
        (None: it set none), which bounds the model call. ``own_id``: the caller sent the
        request_id; one the router made up (``_accept``) no caller can retry with, so such a
        request is neither claimed nor recorded in the answer ledger.

        Across routers (the answer ledger): a call marked as a possible retry (``retried``)
        claims its id before anything else, as its answer may be recorded already; any other
        call with its own id claims it only once L1 did not answer it, just before its first
        model call (the pipeline's ``before_model``), so an L1 hit costs no Redis round trip:
        an answer recorded for the id (an unmarked repeat that reached another router) is
        served instead, and another router's call holding the id is waited for. Admitted by
        the limits first, such a replay gives its reservation back (``Limiter.unused``), as
        does any call that ends before its first model call was sent (cancelled, out of time
        or refused during its L1 Lookup, its Plan, or a wait on an identical request's call),
        or with every model call it sent refused by its replica before its start (the
        pipeline's ``model_refused``): it used no model tokens.

        A duplicate waiting on a first call whose caller left (cancelled it, or its deadline
        cut it) before its answer takes the id and runs as a new call, as one arriving after
        it would; only the first call's own failure is its answer."""
        mark = fingerprint(request)  # once: the table and the ledger both key on it
        loop = asyncio.get_running_loop()
        # the client's deadline on the loop's clock: a duplicate that waited on a first call
        # runs with what is left of it, not what it had when it came
        deadline = None if time_remaining_s is None else loop.time() + time_remaining_s
        while True:
            try:
                claimed, future = self._answers.claim(tenant, request, mark)
            except IdempotencyConflict as exc:
                raise RequestError(Code.INVALID_ARGUMENT, str(exc)) from exc
            if claimed:
                break
            call.replayed = True
            try:
                first = await asyncio.shield(future)
            except _FirstLeft:
                call.replayed = False  # its caller left it: claimed again, or waited on again
                continue
            except (_Denied, RequestError) as exc:
                raise _own_copy(exc) from None  # not the first call's instance and frames
            call.end = _replayed(first)
            for chunk in chunks_of(call.end):
                yield chunk
            return
        if deadline is not None:
            time_remaining_s = deadline - loop.time()
            if time_remaining_s <= 0:
                raise RequestError(
                    Code.DEADLINE_EXCEEDED,
                    "the request's deadline passed while it waited on an identical call "
                    "(same request_id) whose caller left it",
                )
        # how long a wait on another router's call for this id may last: the call's deadline
        wait_until = deadline
        end: pb.CompleteResponse | None = None
        # its model calls sent and refused, and its answer once billed (its end may never
        # be read)
        use = ModelUse()
        ticket: Ticket | None = None
        failure: Exception | None = None  # the first call's refusal, for its duplicates
        held = _Held()  # this call's claim on the id in the ledger
        recorded = False
        left = False  # its caller left before its answer (cancelled it, or its deadline cut it)
        try:
            if retried and own_id:
                found = await self._take(tenant, request, mark, wait_until, held)
                if found is not None:
                    end = found  # kept unmarked, for this router's own replays of it
                    call.end = _replayed(found)
                    call.replayed = True
                    for chunk in chunks_of(call.end):
                        yield chunk
                    return
            counting(request)  # the limits' count of the prompt serves the pipeline too
            admitted = await self._limiter.admit(tenant, request, time_remaining_s=time_remaining_s)
            if isinstance(admitted, Denial):
                raise _Denied(admitted)
            ticket = admitted

            async def before_model() -> pb.CompleteResponse | None:
                try:
                    held.replay = await self._take(tenant, request, mark, wait_until, held)
                except BaseException:
                    # refused, or ended while it waited on another router's call (its caller
                    # left, its deadline passed): no model call, nothing used
                    held.modelless = True
                    raise
                if held.replay is None:
                    return None
                held.modelless = True
                call.replayed = True
                return _replayed(held.replay)

            unmarked = own_id and not retried and self._ledger is not None
            run = self._pipeline.run(
                tenant,
                request,
                streamed=streamed,
                time_remaining_s=time_remaining_s,
                charge=partial(self._limiter.charge, ticket),
                bills=call.bills,
                answer_billed=use.answer_billed,
                retried=retried,
                before_model=before_model if unmarked else None,
                model_sent=use.model_sent,
                model_refused=use.model_refused,
                late_bill=call.late_bill,
            )
            async with aclosing(run) as chunks:
                async for chunk in chunks:
                    if chunk.WhichOneof("part") == "end":
                        call.end = chunk.end
                        if held.replay is not None:
                            end = held.replay  # kept unmarked, as above
                        else:
                            end = chunk.end
                            if own_id:
                                recorded = await self._record(tenant, request, end, mark)
                    yield chunk
        except (_Denied, RequestError) as exc:
            if isinstance(exc, _Denied) or exc.code in _THE_REQUESTS_OWN:
                failure = _own_copy(exc)  # without this call's frames
            else:
                left = _callers_deadline(exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            left = True  # its caller cancelled it, or gRPC did at the caller's deadline
            raise
        finally:
            _settle(self._answers, tenant, request, future, end, failure, left)
            if ticket is not None:
                # the answer counts once it is billed, whether or not its caller read its end
                # (one with no text has its start sent after its bill, and its end after that);
                # another call's answer, or none before a model call was sent or with every
                # one sent refused before its start: nothing used; one that went at the
                # router's estimate before its FINAL answered, as billed once that comes
                self._finish_when_billed(ticket, end, use, call, held.modelless)
            if held.renewing is not None:
                held.renewing.cancel()
            if held.claim is not None and not recorded:  # failed, refused, or an unbilled answer
                self._give_back(tenant, request.request_id, held.claim)
            if held.unconfirmed is not None and not recorded:  # (recorded: over it)
                self._give_back(tenant, request.request_id, held.unconfirmed)

    def _finish_when_billed(
        self,
        ticket: Ticket,
        end: pb.CompleteResponse | None,
        use: ModelUse,
        call: Call,
        modelless: bool,
    ) -> None:
        """``Limiter.finish`` of the request's end, or of its answer as billed when it went at
        the router's estimate before its bill (``call.late``): prefix-cache's bill counted, not
        the estimate (which the limits count only when the outbox keeps the bill); after the
        bills of its calls cut without an answer (``call.bills``), its hold released with them."""
        late = call.late

        def billed(_: object = None) -> None:
            billed = billed_late(late)
            answer = billed if billed is not None else end
            self._limiter.finish(ticket, answer, use, modelless=modelless, bills=call.bills)

        if late is not None and not late.done():
            late.add_done_callback(billed)
        else:
            billed()

    async def _take(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        mark: str,
        wait_until: float | None,
        held: _Held,
    ) -> pb.CompleteResponse | None:
        """The answer the ledger recorded for the request's id (served instead of a model
        call), else None, with this call's claim on the id in ``held`` (renewed until the
        call ends) when it took one (not when the ledger is absent or failed)."""
        found = await self._claim(tenant, request, mark, wait_until, held)
        if isinstance(found, pb.CompleteResponse):
            return found
        if found is not None and self._ledger is not None:
            held.claim = found
            held.renewing = asyncio.ensure_future(
                self._ledger.hold(tenant, request.request_id, found)
            )
        return None

    async def _claim(
        self,
        tenant: str,
        request: pb.CompleteRequest,
        mark: str,
        wait_until: float | None,
        held: _Held,
    ) -> pb.CompleteResponse | Claimed | None:
        """For a call that may be a retry: the answer another router recorded for it, or this
        call's claim on the id (it makes the model call). While another router's call holds
        the id, waits for its answer (until ``wait_until``, the event loop's time of this
        call's deadline; None: it has none); when that claim goes (the call failed, or its
        router died and the lease lapsed) takes it. None: no ledger, or it failed (the call is
        served anew: only the protection across routers is lost; a claim whose reply did not
        come may still have been taken, so it is kept in ``held.unconfirmed``, to be given back
        at the call's end)."""
        if self._ledger is None:
            return None
        loop = asyncio.get_running_loop()
        while True:
            if self._left_alone("claim"):
                return None
            mine = new_claim(mark)  # this call's, should the reply never reach it
            try:
                async with asyncio.timeout(LEDGER_TIMEOUT_S):
                    # a cancel lost under the claim (redis-py sends under ``wait_for``,
                    # ``services.common.background``) ends the call here: it went on to its
                    # model call, for a caller that had left
                    found = await unless_cancelled(
                        self._ledger.claim(tenant, request.request_id, mark, mine)
                    )
            except (LedgerUnavailable, TimeoutError) as exc:  # costs only the retry protection
                # Redis may hold it all the same (the reply, not the claim, was lost): a call
                # that then failed left it held for its whole lease, not renewed, and a retry on
                # another router waited on it ~10 s
                held.unconfirmed = mine
                self._ledger_failed("claim")
                self._ledger_broke(exc)
                self._log_ledger("claim", "claim failed (%s); serving the call anew", exc)
                return None
            except asyncio.CancelledError:
                # its caller left as the claim was out: Redis may hold it for this call, which
                # never learnt so (it was held until its lease lapsed, and a repeat of the id
                # on another router waited on it): given back, if it is still this call's
                self._give_back(tenant, request.request_id, mine)
                raise
            self._ledger_answered()
            if isinstance(found, Claimed):
                return found
            if found.fingerprint != mark:
                raise RequestError(Code.INVALID_ARGUMENT, str(conflict(request.request_id)))
            if isinstance(found, Recorded):
                return found.answer
            assert isinstance(found, Running)
            left_s = math.inf if wait_until is None else wait_until - loop.time()
            if left_s <= 0:
                raise RequestError(
                    Code.DEADLINE_EXCEEDED,
                    f"the first call with request_id {request.request_id[:64]!r} is still "
                    "running on another router and did not answer within this call's "
                    "deadline; retry it with the same request_id for its answer",
                )
            await asyncio.sleep(min(CLAIM_POLL_S, left_s))

    def _give_back(self, tenant: str, request_id: str, claimed: Claimed) -> None:
        """Releases this call's claim (in the background: the call has ended), so that a
        retry waiting on it runs at once instead of when its lease lapses."""
        ledger = self._ledger
        if ledger is None or self._left_alone("give_back"):
            return

        async def give_back() -> None:
            try:
                async with asyncio.timeout(LEDGER_TIMEOUT_S):
                    await ledger.give_back(tenant, request_id, claimed)
            except (LedgerUnavailable, TimeoutError) as exc:
                self._ledger_failed("give_back")
                self._ledger_broke(exc)
                self._log_ledger(
                    "give_back",
                    "a claim was not given back (%s); a retry on another router waits until "
                    "it lapses",
                    exc,
                )
                return
            self._ledger_answered()

        task = asyncio.ensure_future(give_back())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _record(
        self, tenant: str, request: pb.CompleteRequest, end: pb.CompleteResponse, mark: str
    ) -> bool:
        """Records a billed answer before it goes out (a request with the caller's own
        request_id): every model call's, whether its prompt read the provider's cache
        (``LAYER_PREFIX_CACHE``) or not; an L1 hit bills nothing. True when recorded (over this
        call's claim, if it held one)."""
        if self._ledger is None or end.served_by not in _BILLED_LAYERS:
            return False
        if self._left_alone("record"):
            return False
        try:
            async with asyncio.timeout(LEDGER_TIMEOUT_S):
                await self._ledger.record(tenant, request.request_id, mark, end)
        except (LedgerUnavailable, TimeoutError) as exc:  # the answer is served all the same
            self._ledger_failed("record")
            self._ledger_broke(exc)
            self._log_ledger(
                "record", "record failed (%s); a retry on another router may bill again", exc
            )
            return False
        self._ledger_answered()
        return True

    def _left_alone(self, operation: LedgerOperation) -> bool:
        """True when the ledger's Redis is left alone (its calls failed in a row): the call is
        not made, and counts as failed (the request loses only its protection across routers,
        as when the call fails), without a log line of its own (the breaker's says why)."""
        if self._ledger_breaker is None or not self._ledger_breaker.open():
            return False
        self._ledger_failed(operation)
        return True

    def _log_ledger(
        self, operation: LedgerOperation, line: str, exc: LedgerUnavailable | TimeoutError
    ) -> None:
        """A ledger call's failure (``line`` with its ``_kind``): the first of an operation and
        kind at once, then one a ``LEDGER_FAILED_LOG_EVERY_MS`` at most, saying how many were
        not logged (each counted in ``ledger_failed`` all the same); DEBUG once the breaker has
        left the ledger's Redis alone (its WARNING said what requests go without)."""
        said = "answer ledger: " + line + "%s"
        if self._ledger_breaker is not None and self._ledger_breaker.tripped:
            log.debug(said, _kind(exc), "")
        elif due := self._ledger_log.due(operation, type(exc).__name__):
            log.warning(said, _kind(exc), suppressed(due, LEDGER_FAILED_LOG_EVERY_MS))

    def _ledger_broke(self, exc: LedgerUnavailable | TimeoutError) -> None:
        """A ledger call failed: Redis's failure counts toward leaving it alone; a record that
        does not read is an answer of Redis's."""
        if self._ledger_breaker is None:
            return
        if isinstance(exc, LedgerUnavailable) and not exc.redis_failed:
            self._ledger_breaker.answered()
        else:
            self._ledger_breaker.failed()

    def _ledger_answered(self) -> None:
        if self._ledger_breaker is not None:
            self._ledger_breaker.answered()


_BILLED_LAYERS = frozenset((pb.LAYER_MODEL, pb.LAYER_PREFIX_CACHE))


@dataclass
class _Held:
    """One call's place in the answer ledger: its claim on the id and the task renewing it
    (None: it took none); ``replay``: the answer another call recorded for the id, served in
    place of a model call; ``modelless``: the call ended before any model call of its own (a
    replay, or refused, cancelled or out of time while it claimed or waited on another
    router's call), so its admission gives its reservation back (``Limiter.finish``)."""

    claim: Claimed | None = None
    renewing: asyncio.Future[None] | None = None
    # a claim whose reply never came (the ledger timed out or failed): maybe taken, not renewed,
    # given back at the call's end unless its answer was recorded (over it)
    unconfirmed: Claimed | None = None
    replay: pb.CompleteResponse | None = None
    modelless: bool = False


# A first call's refusals its identical duplicates would meet too (anything else, e.g. its own
# deadline passing, tells them only to retry).
_THE_REQUESTS_OWN = frozenset(
    (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION)
)


def too_large(size: int, limit: int) -> str:
    """The refusal of a request over ROUTER_MAX_REQUEST_BYTES: its size, the limit, what to do."""
    return (
        f"request too large: {size:,} bytes serialized, over the Gateway's limit of {limit:,} "
        "bytes (the router's ROUTER_MAX_REQUEST_BYTES): send a shorter prompt (fewer or "
        "shorter messages, tools or documents), or ask the operator to raise "
        "ROUTER_MAX_REQUEST_BYTES (at most half of CACHEMESH_MAX_MESSAGE_BYTES)"
    )


def _replayed(first: pb.CompleteResponse) -> pb.CompleteResponse:
    """The first call's answer as its retry gets it: marked ``replayed`` (billed once, on the
    first call: a client that sums costs must not add it again), the retry's span saying so and
    linking the first call's span. The first answer itself stays unmarked."""
    spans.replay_attributes(trace.get_current_span(), first)
    answer = pb.CompleteResponse()
    answer.CopyFrom(first)
    answer.replayed = True
    return answer


def _callers_deadline(exc: RequestError) -> bool:
    """Whether ``exc`` is the call's own deadline passing (the caller's; not the router's
    ROUTER_MODEL_TIMEOUT_S cutting a model call)."""
    if exc.code != Code.DEADLINE_EXCEEDED:
        return False
    return not (isinstance(exc, DeadlineCut) and exc.routers)


def _own_copy(exc: _Denied | RequestError) -> _Denied | RequestError:
    """A fresh instance of a refusal, for another task to raise."""
    if isinstance(exc, _Denied):
        return _Denied(exc.denial)
    if isinstance(exc, DeadlineCut):
        return DeadlineCut(exc.routers, exc.message)
    return RequestError(exc.code, exc.message, exc.reason, **exc.retry_advice())


class _FirstLeft(Exception):
    """The first call with a request_id ended without its answer because its caller left (it
    cancelled it, or its deadline cut it): a duplicate waiting on it runs as a new call."""


class _Denied(Exception):
    """A new request the tenant's limits refuse."""

    def __init__(self, denial: Denial) -> None:
        super().__init__(denial.message)
        self.denial = denial


async def _refuse(context: Context, tenant: str, denial: Denial, made_id: Metadata) -> None:
    await abort(
        context,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        denial.message,
        trailing_metadata=retry_trailers(
            Code.RESOURCE_EXHAUSTED,
            denial.message,
            denial.retry_after_ms,
            f"tenant:{tenant}",
            denial.exceeded,
            BUDGET_EXHAUSTED if denial.limit in (DAY_BUDGET, MONTH_BUDGET) else RATE_LIMITED,
        )
        + made_id,
    )


async def _abort_failed(context: Context, call: Call, exc: RequestError, made_id: Metadata) -> None:
    """Ends a Gateway call whose request failed: its status, message and trailers (the
    pushback, RetryInfo and ErrorInfo of ``failed_call_trailers``; ``made_id``: ``_made_id``'s)."""
    call.routers_deadline = isinstance(exc, DeadlineCut) and exc.routers
    trailers = failed_call_trailers(
        call,
        exc,
        made_id,
        context.time_remaining(),
        channel_retried(context.invocation_metadata()),
    )
    await abort(context, grpc_code(exc.code), exc.message, trailers)


def _made_id(request: pb.CompleteRequest, own_id: bool) -> Metadata:
    """A refusal's trailer naming the request_id the router made up for a request sent
    without one, as its access line and trace name it (the HTTP front's refusal named an id
    of its own instead, found in no log); none for the caller's own id: it knows it."""
    if own_id or not request.request_id:
        return ()
    return ((REQUEST_ID_KEY, request.request_id),)


def _is_retry(context: Context) -> bool:
    for key, value in context.invocation_metadata() or ():  # a few keys, read on every call
        if key in RETRY_HEADERS and _marks_retry(key, value):
            return True
    return False


def _marks_retry(key: str, value: str | bytes) -> bool:
    attempts, mark = RETRY_HEADERS
    if key == mark:
        return value == "1"
    if key == attempts:
        return channel_retried(((key, value),))
    return False


def _kind(exc: BaseException) -> str:
    return f"timed out after {LEDGER_TIMEOUT_S} s" if isinstance(exc, TimeoutError) else str(exc)


def _status(context: Context, ended: str) -> str:
    """The call's gRPC status name: what it aborted with, else how it ended (``ended``: OK or
    CANCELLED; empty when it raised something else, which gRPC reports as UNKNOWN)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return ended or "UNKNOWN"


def _settle(
    answers: IdempotencyTable,
    tenant: str,
    request: pb.CompleteRequest,
    future: asyncio.Future[pb.CompleteResponse],
    end: pb.CompleteResponse | None,
    failure: Exception | None = None,
    left: bool = False,
) -> None:
    """Resolves the answer-once record: the answer (kept, the table bounded), or the id
    released for a retry, its waiting duplicates told why: the first call's own refusal (the
    limits', an invalid or conflicting request); that its caller left it (``left``: cancelled,
    or its deadline passed), so they run as new calls; else to retry."""
    if future.done():
        return
    if end is not None:
        future.set_result(end)
        answers.kept(tenant, request.request_id)
        return
    answers.release(tenant, request.request_id, future)
    if failure is None and left:
        future.set_exception(_FirstLeft())
    else:
        future.set_exception(
            failure
            or RequestError(
                Code.UNAVAILABLE,
                f"the first call with request_id {request.request_id!r} failed; retry it",
            )
        )
    future.exception()  # mark retrieved: a failure with no waiter is not an error
