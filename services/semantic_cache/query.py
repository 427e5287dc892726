"""From a ``CompleteRequest`` to the cache's view of it: the scope, the query text, the mode.

DESIGN.md, "What a cache hit may serve": an answer is served only within one scope, the
sha256 of a canonical serialisation of the tenant, the namespace, the requested model string
(``auto`` included) and what the router's model table resolves it to where the string alone
does not say it (``sc.ModelFacts``: a row's ``upstream_id``), the tools and system prompt, the
conversation before the last user turn (and the non-text blocks of that turn, in their places
among its text), and the temperature (unset = 1.0; where a row that may answer is sent none when
unset, its engine sampling at its own default, an unset one and an explicit 1.0 are two
scopes, neither the one they shared before the facts were sent).
``cache_control`` markers, ``max_tokens``, ``request_id`` and ``routing`` are not part of it
(the router refuses an ``auto`` hit whose tier is below the one the request's thresholds
force, and names the tiers it accepts in its Lookup: ``Query.accepted_tiers``, refused by the
check; and the rows ``auto``'s tiers resolve to now: ``Query.accepted_models``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common import tool_choice
from services.common.fair_walks import FairWalks
from services.common.prompt import last_user_text
from services.semantic_cache.recent import TenantRecent
from services.semantic_cache.records import Answer

Mode = Literal["use", "refresh", "no_store", "bypass"]
# v2: the last user turn's non-text blocks keep their places among its text
# (``last_turn_layout``); v3: the exact key keeps the first line's own indentation and is
# composed (``normalise``). An entry of an older version is in a scope no lookup of this one
# names: never served, it ages out (its TTL) or is evicted first (it is never used again)
SCOPE_VERSION = "cachemesh.semantic.scope.v3"
# A query whose question (the last user turn's text, which it holds) is longer than this is
# not remembered by ``RecentQueries``: 1,024 of them at the router's 1 MiB request limit
# would hold ~1 GB. A large request with a short question (a document) is remembered.
RECENT_QUERY_BYTES = 64 * 1024
# A question longer than this, stripped, has its stripped text as its exact key, no more read
# (composed, its indentation): longer than any question stored or matched exactly
# (``cache.MAX_STORED_QUESTION_CHARS``), only its length is read, and a 1 MiB one held the
# event loop 40 ms read whole.
KEYED_CHARS = 64 * 1024
# A request larger than this has its query derived in a worker thread (``derived``); one
# smaller takes a few milliseconds at most, less than the hop to a thread would cost it.
QUERY_IN_THREAD_BYTES = 64 * 1024

_MODES: dict[int, Mode] = {
    pb.SEMANTIC_MODE_UNSPECIFIED: "use",
    pb.SEMANTIC_MODE_USE: "use",
    pb.SEMANTIC_MODE_REFRESH: "refresh",
    pb.SEMANTIC_MODE_NO_STORE: "no_store",
    pb.SEMANTIC_MODE_BYPASS: "bypass",
}


@dataclass(frozen=True)
class Query:
    """What the cache needs from one request (``text`` is None for a prefill or no text)."""

    tenant: str
    namespace: str
    scope: str
    text: str | None
    mode: Mode
    threshold: float | None  # None = the configured threshold
    max_tokens: int
    temperature: float = 1.0  # unset = 1.0
    # not part of the scope: names the single-flight lease a miss takes, so that a retry of
    # the same request (its router died mid-call; its Lookup marked ``retry``) leads again
    # instead of waiting on itself
    request_id: str = ""
    # not part of the scope either: the answer tiers the Lookup accepts (empty: any); an
    # answer of another tier is never served (``tier_refusal``)
    accepted_tiers: tuple[str, ...] = ()
    # nor this: the model rows whose answers the Lookup accepts (empty: any), ``auto``'s tiers'
    # rows now; an answer another row made (a tier repointed since) is never served
    accepted_models: tuple[str, ...] = ()

    def read(self, answer: Answer) -> sc.CachedAnswer | None:
        """The answer's ``CachedAnswer`` when the refusals need it (None: the Lookup accepts
        any tier and any row): parsed once per candidate, for both refusals."""
        if not (self.accepted_tiers or self.accepted_models):
            return None
        return sc.CachedAnswer.FromString(answer.payload)

    def answer_refusal(self, answer: Answer) -> str:
        """Why the answer is not served to this query ("" = it may be): its tier is not one
        the Lookup accepts (an ``auto`` retry whose thresholds force a larger tier), or the row
        that made it is not one ``auto`` resolves to now (its tier was repointed)."""
        return self.refusal(self.read(answer))

    def refusal(self, cached: sc.CachedAnswer | None) -> str:
        """``answer_refusal`` of an answer already read (``read``)."""
        if cached is None:
            return ""
        if self.accepted_tiers and cached.tier not in self.accepted_tiers:
            accepted = ", ".join(self.accepted_tiers)
            return (
                f"tier: the cached answer is the {cached.tier} tier's; the request accepts "
                f"{accepted}"
            )
        return self.row_refusal(cached)

    def row_refusal(self, cached: sc.CachedAnswer | None) -> str:
        """Why an answer already read (``read``) is not served for the row that made it ("" =
        it may be): not one the query's model resolves to now. Unlike a tier refusal (one
        request's: a retry), no Lookup of the scope is served it while the router's table
        says so (semantic-cache README, "Refused for its row")."""
        if cached is not None and self.accepted_models and cached.model not in self.accepted_models:
            accepted = ", ".join(self.accepted_models)
            return (
                f"model: the cached answer is {cached.model}'s; the request's model resolves "
                f"to {accepted} now"
            )
        return ""

    @functools.cached_property
    def normalised(self) -> str:
        """Read several times a lookup (the exact key, the lease key, the Store): made once."""
        return normalise(self.text or "")


def normalise(text: str) -> str:
    """The exact-match key: the text composed (NFC: an "é" of one code point or of two is one
    letter), its line endings ``\n``, without the blank lines and whitespace at its ends, nor
    the indentation all its lines share (code indented as a whole is the same code). Each
    line's own indentation is kept, the first one's too: v2 stripped the text, so the first
    line's lost, and "x = 1\n    print(x)" (an IndentationError) was served the answer of
    "    x = 1\n    print(x)" (prints 1). Letter case and inner whitespace are kept: "ls -L"
    is not "ls -l", "True" is not "true", "MB" is not "Mb", and Python's indentation and a
    quoted string's spaces are meaning. A text equal to a stored one up to case and spacing
    meets it on the folded key (``folded``), served only when ``folding.folding_refusal``
    finds nothing that can change its meaning."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").rstrip()
    stripped = text.lstrip()
    if len(stripped) > KEYED_CHARS:  # never stored nor matched: only its length is read
        return stripped
    text = text[text.rfind("\n", 0, len(text) - len(stripped)) + 1 :]  # from its first line
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    cut = _shared_indent(text)
    if cut:  # every line that is not blank begins with it: a blank one loses as much
        text = re.sub(f"^[^\\S\\n]{{1,{cut}}}", "", text, flags=re.MULTILINE)
    return text


# the indentation of each of a text's lines with a character
_INDENT = re.compile(r"^[^\S\n]*(?=\S)", re.MULTILINE)


def _shared_indent(text: str) -> int:
    """The length of the indentation every line of ``text`` with a character begins with,
    character by character (a tab is not four spaces). A text whose first line is not
    indented, as most are, is not read further."""
    shared: str | None = None
    for match in _INDENT.finditer(text):
        indent = match.group()
        if shared is None:
            shared = indent
        elif not indent.startswith(shared):
            size = 0
            while size < min(len(shared), len(indent)) and shared[size] == indent[size]:
                size += 1
            shared = shared[:size]
        if not shared:
            return 0
    return len(shared or "")


def folded(text: str) -> str:
    """The folded key: whitespace collapsed, lowercased with ``str.lower`` (not casefolded:
    casefold() maps "ß" to "ss", and "Maße", measurements, would meet "Masse", mass)."""
    return " ".join(text.split()).lower()


def query_from_request(
    tenant: str, request: pb.CompleteRequest, facts: sc.ModelFacts | None = None
) -> Query:
    """``facts``: what the router's table makes of the request's model (None: nothing more
    than its string, as from a router older than them)."""
    cache = request.cache
    return Query(
        tenant=tenant,
        namespace=cache.namespace,
        scope=scope_of(tenant, request, facts),
        text=last_user_text(request),
        mode=_MODES.get(cache.semantic, "use"),
        threshold=cache.threshold if cache.HasField("threshold") else None,
        max_tokens=request.max_tokens,
        temperature=request.temperature if request.HasField("temperature") else 1.0,
        request_id=request.request_id,
    )


class RecentQueries:
    """The queries of the last ``size`` requests, by tenant and the request's bytes.

    A miss's Store (or Release) carries the request its Lookup carried: deriving the scope
    again cost ~0.2 ms for an agent's 19 kB request, where serializing and hashing it costs
    ~0.02. The same bytes are the same request, so the same query; a different tenant or
    any changed field is another key, but for the request_id: a repeat under a new id (an
    exact hit) is the same query with its own id. A question over ``RECENT_QUERY_BYTES`` is
    derived each time. The bound is shared fairly between tenants (``TenantRecent``):
    another tenant's flood of requests never pushes this one's queries out. Not
    thread-safe: the event loop's.
    """

    def __init__(self, size: int = 1024) -> None:
        self._queries: TenantRecent[bytes, Query] = TenantRecent(size)
        # one thread of its own for the queries of large requests (``derived``): a flood of
        # them queues there, not in the default executor (embeddings, the WAL's fsyncs)
        # one thread for the walks of large requests, each tenant's queue taken in turn
        self._walks = FairWalks("semantic-query")

    def of(
        self, tenant: str, request: pb.CompleteRequest, facts: sc.ModelFacts | None = None
    ) -> Query:
        query = self._queries.get(tenant, key := _key(request, facts))
        if query is None:
            return self._held(tenant, key, query_from_request(tenant, request, facts))
        return _with_id(query, request)

    async def derived(
        self, tenant: str, request: pb.CompleteRequest, facts: sc.ModelFacts | None = None
    ) -> Query:
        """``of``, but a request over ``QUERY_IN_THREAD_BYTES`` has its query derived in a
        worker thread: its scope walks every block in Python, and a 900 kB request of 100,000
        one-letter messages held the event loop, every tenant's lookups and health checks
        with it, for 0.3-0.6 s; in a thread the loop runs between the interpreter's switches."""
        if request.ByteSize() <= QUERY_IN_THREAD_BYTES:
            return self.of(tenant, request, facts)
        query = self._queries.get(tenant, key := _key(request, facts))
        if query is None:
            derived = await self._walks.run(tenant, query_from_request, tenant, request, facts)
            return self._held(tenant, key, derived)
        return _with_id(query, request)

    def _held(self, tenant: str, key: bytes, query: Query) -> Query:
        if len(query.text or "") <= RECENT_QUERY_BYTES:  # never a large question held
            self._queries.put(tenant, key, query)
        return query

    def __len__(self) -> int:
        return len(self._queries)


def _with_id(query: Query, request: pb.CompleteRequest) -> Query:
    """A held query for a repeat of its request: the same request under another id (each
    call of a client has one of its own: an exact hit is a repeat) is the same query but for
    the id, which names its lease."""
    if query.request_id == request.request_id:
        return query
    return dataclasses.replace(query, request_id=request.request_id)


def _key(request: pb.CompleteRequest, facts: sc.ModelFacts | None) -> bytes:
    """The sha256 of the request's bytes but its ``request_id``, the one field of it the query
    takes as it is (the scope and the rest never read it): with it, every repeat of a request
    (a new id each call) derived its query anew, ~30 us of an exact hit's ~0.6 ms Lookup. The
    model facts are part of the scope, so of the key too (after the request's bytes)."""
    request_id = request.request_id
    request.request_id = ""  # put back before anything else runs: nothing awaits in between
    try:
        data = request.SerializeToString(deterministic=True)
    finally:
        request.request_id = request_id
    digest = hashlib.sha256(data)
    if facts is not None and (facts.upstreams or facts.engine_default_temperature):
        digest.update(b"\0" + facts.SerializeToString(deterministic=True))
    return digest.digest()


def scope_of(tenant: str, request: pb.CompleteRequest, facts: sc.ModelFacts | None = None) -> str:
    """The scope's sha256 (the module's docstring). ``facts`` adds a field only where it says
    more than the model string (``_model_fields``): every other scope is the one it was."""
    history = list(request.messages)
    last: list[object] = []
    if history and history[-1].role == pb.ROLE_USER:
        last = last_turn_layout(history.pop())
    fields: dict[str, object] = {
        "v": SCOPE_VERSION,
        "tenant": tenant,
        "namespace": request.cache.namespace,
        "model": request.model,
        "temperature": (request.temperature if request.HasField("temperature") else 1.0) + 0.0,
        "tools": [[t.name, t.description, t.input_schema_json] for t in request.tools],
        "system": [_block(b) for b in request.system],
        "history": _HOLE,
        "last_turn": last,
    }
    choice = tool_choice.canonical(request)
    if choice:  # only a choice but auto: every scope made before the field is the one it was
        fields["tool_choice"] = choice
    if facts is not None:
        fields.update(_model_fields(request, facts))
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # the canonical JSON as it always was, its history hashed a slice at a time: one dumps of
    # 100,000 turns held the interpreter ~0.25 s at once, in a worker thread too (``derived``)
    head, _, tail = canonical.partition(_HISTORY_SLOT)  # once: a string's quotes are escaped
    digest = hashlib.sha256(head.encode("utf-8"))
    digest.update(b'"history":[')
    for start in range(0, len(history), _HISTORY_SLICE):
        turns = [
            [int(m.role), [_block(b) for b in m.content]]
            for m in history[start : start + _HISTORY_SLICE]
        ]
        part = json.dumps(turns, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest.update((b"," if start else b"") + part[1:-1].encode("utf-8"))
    digest.update(b"]" + tail.encode("utf-8"))
    return digest.hexdigest()


def _model_fields(request: pb.CompleteRequest, facts: sc.ModelFacts) -> dict[str, object]:
    """The scope's fields from the router's model facts, none where they add nothing: the
    rows' upstream models where one is not its row's id (an ``upstream_id`` repointed is a
    new scope: the old model's answers are never served for the new one's), and, for a row
    whose engine samples an unset temperature at its own default (llama-server: 0.8), an
    explicit 1.0, which that engine is sent and samples at: the scope of an unset one holds
    1.0 too, so each of the two gets a field of its own (``temperature_sent`` for the explicit
    1.0, ``engine_temperature`` for the unset one). The scope both shared before
    ``ModelFacts`` holds answers of either sampling (a router without them stored an explicit
    1.0's answers there too): neither reads it again, its entries age out. An explicit other
    value was never shared and keeps its scope."""
    fields: dict[str, object] = {}
    if facts.upstreams:
        fields["upstreams"] = sorted(facts.upstreams)
    if facts.engine_default_temperature:
        if not request.HasField("temperature"):
            fields["engine_temperature"] = "default"
        elif request.temperature == 1.0:
            fields["temperature_sent"] = True
    return fields


_HOLE = "\0history"  # where the history goes in the canonical JSON
_HISTORY_SLOT = '"history":' + json.dumps(_HOLE)
_HISTORY_SLICE = 256  # turns dumped at a time


def last_turn_layout(turn: pb.Message) -> list[object]:
    """The last user turn as the scope holds it: its non-text blocks whole, in their places
    among its text, each run of text blocks one ``["text"]`` (the text itself is what the
    embedding compares: ``last_user_text`` joins a run's blocks as one text block of them
    joined by a line break would read). Without the places, [tool_result, "Is that right?"]
    and ["Is that right?", tool_result] were one scope: the second was served the first's
    answer, though its model reads another prompt (scope v1)."""
    layout: list[object] = []
    for block in turn.content:
        if block.WhichOneof("kind") != "text":
            layout.append(_block(block))
        elif not layout or layout[-1] != _TEXT_RUN:
            layout.append(_TEXT_RUN)
    return layout


_TEXT_RUN = ("text",)  # a run of text blocks (json.dumps writes it as a list)


def _block(block: pb.ContentBlock) -> list[object]:
    """One content block without its ``cache_control``."""
    kind = block.WhichOneof("kind")
    if kind == "text":
        return ["text", block.text]
    if kind == "tool_use":
        use = block.tool_use
        return ["tool_use", use.id, use.name, use.input_json]
    if kind == "tool_result":
        result = block.tool_result
        return ["tool_result", result.tool_use_id, result.content, result.is_error]
    return ["empty"]
