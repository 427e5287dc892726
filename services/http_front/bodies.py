"""A request's body: read within HTTP_FRONT_BODY_TIMEOUT_S and the front's ``BodyBudget``,
refused before it is parsed when no request of the Gateway's limit could be in it, parsed and
translated off the event loop when large, and the Gateway request it makes sized as the router
sizes it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from aiohttp import web
from opentelemetry import trace

from cachemesh.v1 import gateway_pb2 as pb
from services.common.fair_walks import FairWalks
from services.http_front.errors import RATE_LIMIT_RETRY_AFTER_S, Api, ApiError
from services.http_front.fields import parse_body
from services.http_front.limits import BodyBudget, BodyFull, Reading
from services.http_front.marks import BODY_BYTES, BODY_CUT
from services.http_front.metrics import HttpFrontMetrics
from services.http_front.settings import ESCAPE_EXPANSION, HttpFrontSettings

_T = TypeVar("_T")
# A body larger than this is read from JSON and translated to the Gateway's request in a
# worker thread: translating walks every message and block in Python, and a 2.2 MB body of
# 60,000 one-letter messages held the front's event loop ~1 s (every request of every tenant
# and /healthz with it); in a thread the loop runs between the interpreter's switches. One
# smaller takes a few milliseconds at most, less than the hop to a thread would cost it.
TRANSLATE_IN_THREAD_BYTES = 64 * 1024


class Bodies:
    """The front's reading of request bodies: ``read`` (a body's JSON, within
    HTTP_FRONT_BODY_TIMEOUT_S and the front's ``BodyBudget``), ``translated`` (off the event
    loop when the body is large) and ``sized`` (the Gateway request, as the router sizes it)."""

    def __init__(
        self, settings: HttpFrontSettings, budget: BodyBudget, metrics: HttpFrontMetrics | None
    ) -> None:
        self._settings = settings
        self._body_budget = budget
        self._metrics = metrics
        # one thread of its own for the translation of large bodies (``_translated``), taken
        # by tenant in turn: one tenant's flood of them queues there, not in the default
        # executor, and delays another tenant's by one walk, not the whole flood
        self._walks = FairWalks("front-translate")

    async def read(self, api: Api, request: web.Request, tenant: str) -> dict[str, Any]:
        """The body's JSON, read up to ``max_json_bytes``: the size that counts is its
        request's (``sized``), which escapes do not swell. One over ``max_body_bytes`` is
        parsed only when its request could be under it (``_least_request``) and it holds no
        more JSON values than one under it could (parsing is the cost that grows with them).
        Its declared length is reserved of ``tenant``'s share of the front's ``BodyBudget``
        before it is read, and its bytes taken of the budget as they arrive, until it is
        parsed: no room for them (or its share none for its declared length), a 529 / 503 the
        SDKs retry (``_no_room``)."""
        settings = self._settings
        most = settings.max_json_bytes
        if request.content_length is not None and request.content_length > most:
            raise _json_too_large(request.content_length, settings.max_body_bytes)
        with self._body_budget.reading(tenant) as held:
            try:
                held.reserve(request.content_length or 0)
                raw = await self._read_in_time(request, held)
            except BodyFull:
                raise self._no_room(api, request) from None
            if len(raw) > settings.max_body_bytes:
                _least_request(raw, settings.max_body_bytes)
                _few_values(raw, settings.max_body_bytes)
            request[BODY_BYTES] = len(raw)
            return await self.translated(request, tenant, partial(parse_body, raw, api))

    async def _read_in_time(self, request: web.Request, held: Reading) -> bytes:
        settings = self._settings
        wait_s = settings.body_timeout_s
        try:
            async with asyncio.timeout(wait_s):
                raw = await _read(request, settings.max_json_bytes, held)
        except TimeoutError:
            # a body dripped a byte at a time held its buffer and its connection for ever
            request[BODY_CUT] = True
            raise ApiError(
                "request_timeout",
                f"request body not received whole within {wait_s:g} s of its headers; send "
                "it without pauses (the connection is closed)",
            ) from None
        if raw is None:
            raise _json_too_large(None, settings.max_body_bytes)
        return raw

    def _no_room(self, api: Api, request: web.Request) -> ApiError:
        """The refusal of a body the front's ``BodyBudget`` had no room for: the front's
        overload (529 / 503, ``retry-after``), which both SDKs retry. The rest of its body is
        read and dropped after the refusal (aiohttp's lingering read, up to 10 s): closed at
        once, a connection whose caller is still sending is reset, and its SDK may see no
        answer but the reset."""
        if self._metrics is not None:
            self._metrics.body_refused(api)
        size = request.content_length
        sized = f"its {size:,} bytes" if size is not None else "its bytes"
        budget = self._body_budget
        return ApiError(
            "overloaded",
            f"the HTTP front is busy reading other requests' bodies: no room for {sized} (it "
            f"reads at most {budget.limit:,} bytes of bodies at once, its "
            f"HTTP_FRONT_BODY_BUDGET_BYTES, at most {budget.tenant_limit:,} of them one "
            "tenant's); retry shortly",
            retry_after_s=RATE_LIMIT_RETRY_AFTER_S,
        )

    def sized(self, gw: pb.CompleteRequest) -> pb.CompleteRequest:
        """``gw`` when the Gateway takes its size: it is measured as the router measures
        ROUTER_MAX_REQUEST_BYTES (serialized), against HTTP_FRONT_MAX_BODY_BYTES."""
        size = gw.ByteSize()
        limit = self._settings.max_body_bytes
        if size > limit:
            # as the router's span of a request over its limit says it
            trace.get_current_span().set_attribute("cachemesh.request_bytes", size)
            raise ApiError(
                "request_too_large",
                f"request too large: {size:,} bytes as the Gateway's request (serialized, as "
                f"the router measures it; the text, not its JSON escapes), at most {limit:,} "
                "bytes (the HTTP front's HTTP_FRONT_MAX_BODY_BYTES, the Gateway's "
                "ROUTER_MAX_REQUEST_BYTES): send a shorter prompt (fewer or shorter messages, "
                "tools or documents), or ask the operator to raise both",
            )
        return gw

    async def translated(
        self, request: web.Request, tenant: str, translate: Callable[[], _T]
    ) -> _T:
        """``translate()``, in this front's translation thread when the body is large
        (``_translated``)."""
        return await _translated(self._walks, request, tenant, translate)


async def _read(request: web.Request, most: int, held: Reading) -> bytes | None:
    """The body, or None once it is over ``most`` bytes (decompressed). Not kept on the request,
    as aiohttp's ``read`` keeps it until the response: through a call of minutes. Each chunk
    kept is covered by ``held`` (``BodyFull`` when it cannot be)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > most:
            return None
        held.cover(size)
        chunks.append(chunk)
    return b"".join(chunks)


async def _translated(
    walks: FairWalks, request: web.Request, tenant: str, translate: Callable[[], _T]
) -> _T:
    """``translate()``, in ``walks``' thread in ``tenant``'s turn when the request's body is
    over ``TRANSLATE_IN_THREAD_BYTES``: on a first-come thread, tenant b's 76 kB request
    waited 1.03 s behind tenant a's 10 x 1 MB (0.015 s alone)."""
    if request.get(BODY_BYTES, 0) > TRANSLATE_IN_THREAD_BYTES:
        return await walks.run(tenant, translate)
    return translate()


def _json_too_large(size: int | None, limit: int) -> ApiError:
    got = f" ({size:,} bytes)" if size is not None else ""
    return ApiError(
        "request_too_large",
        f"request body too large{got}: at most {limit * ESCAPE_EXPANSION:,} bytes of JSON "
        f"({ESCAPE_EXPANSION} times the HTTP front's HTTP_FRONT_MAX_BODY_BYTES, a request of "
        f"{limit:,} bytes, its text all written as \\uXXXX escapes): send a shorter prompt, or "
        "ask the operator to raise it",
    )


# the bytes of JSON a request may hold beyond its text for each of its members and values (a
# colon, comma or opening bracket): a member's name and its quotes, an enum's text (a role, a
# block's type), a number, the field's tag in the Gateway's request not counted
STRUCTURE_BYTES = 64
# a body up to this many times HTTP_FRONT_MAX_BODY_BYTES is parsed before its size is known
PARSED_OVER = 2


def _least_request(raw: bytes, limit: int) -> None:
    """A 413 unless ``raw``, a body over ``limit``, could be a request of at most ``limit``
    bytes, before it is parsed (a plain-ASCII body of 12 MiB took 52 to 81 ms of the event
    loop to parse and build before its 413; this, 17 ms). Only a body over ``PARSED_OVER``
    times the limit: one under it costs at most that many times a body at the limit, and its
    413 names the size the router measures (``Bodies.sized``). The least request a body makes: its
    bytes, less 5 for each backslash (a ``\\uXXXX`` escape, 6 bytes, is 1 at least in UTF-8;
    any other escape saves 1), 1 for each whitespace byte and ``STRUCTURE_BYTES`` for each
    colon, comma and opening bracket (a member or value: its name, quotes, an enum). A request
    refused here is one the router refuses too (but, as ``_few_values``, for one padded with
    long values of fields the front drops, such as OpenAI's ``metadata``)."""
    if len(raw) <= PARSED_OVER * limit:
        return
    structure = len(raw) - len(raw.translate(None, b":,{["))  # one pass each, in C
    spaces = len(raw) - len(raw.translate(None, b" \n\r\t"))
    least = len(raw) - 5 * raw.count(b"\\") - spaces - STRUCTURE_BYTES * structure
    if least > limit:
        raise ApiError(
            "request_too_large",
            f"request too large: its JSON of {len(raw):,} bytes holds at least {least:,} bytes "
            f"of text, over {limit:,}, the HTTP front's HTTP_FRONT_MAX_BODY_BYTES (measured as "
            "the Gateway's request, its text not its escapes): send a shorter prompt, or ask "
            "the operator to raise it",
        )


def _few_values(raw: bytes, limit: int) -> None:
    """A 413 unless ``raw``, a body over ``limit``, holds at most ``limit`` commas and opening
    brackets and braces. Each JSON value or member but the first follows one (a member's
    value, its name's colon), so their count bounds what parsing builds: at most 1.5 times
    what a body at the limit can (``[{},{},...]``: ``limit / 3`` objects there, ``limit / 2``
    here). Unchecked, a body of ``ESCAPE_EXPANSION`` times the limit built six times as much
    (``{},`` in 12 MiB: 300 MiB, seconds of the event loop). Each one in a request the Gateway
    takes stands for a byte of it at least (a comma of its text; the tag of a message, a block,
    a tool), so a request refused here is one the router refuses too (but for one padded with
    fields the front drops, such as OpenAI's ``metadata``)."""
    values = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if values > limit:
        raise ApiError(
            "request_too_large",
            f"request too large: its JSON holds {values:,} values (commas, brackets and "
            f"braces) in {len(raw):,} bytes, over {limit:,}, the HTTP front's "
            "HTTP_FRONT_MAX_BODY_BYTES (a request of that many bytes holds fewer): send a "
            "shorter prompt (fewer messages, tools or items), or ask the operator to raise it",
        )
