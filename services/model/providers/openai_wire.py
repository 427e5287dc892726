"""OpenAI Chat Completions through the official ``openai`` SDK: OpenAI itself, or any
OpenAI-compatible engine (vLLM, SGLang, Ollama, llama.cpp's llama-server, TGI) by base URL.

``chat_params`` maps a Gateway request to the Chat Completions body: the system blocks become
one system message, tools become functions, an assistant's ``tool_use`` blocks its
``tool_calls``, a user's ``tool_result`` blocks ``tool`` messages (placed right after the
assistant turn that called them, as the API requires; a ``tool`` message has no error flag, so
a result with ``is_error`` is sent as ``TOOL_ERROR_PREFIX`` + its content; to OpenAI itself a
tool call id over its 40 characters is sent shortened, ``openai_tool_id``, one to one within
the request, ``tool_ids``);
``prompt_cache_key`` is sent as the replica gives it (``cache_key.for_provider``: derived for
the tenant, so that tenants sharing the operator's account never share a cache bucket), a
row's ``prompt_cache_retention`` is sent (so OpenAI keeps a prefix as long as prefix-cache
predicts, not its own default), the output limit goes in the model's own parameter
(``max_completion_tokens`` for OpenAI's current models), and
``stream_options.include_usage`` asks for the usage chunk that ends the stream before
``[DONE]`` (its cache reads are ``prompt_tokens_details.cached_tokens``, or DeepSeek's
``prompt_cache_hit_tokens``). Cache breakpoints have no meaning here (OpenAI caches
automatically) and are not sent. A reasoning model's thinking, which an engine streams apart
from the answer (``reasoning_of``), goes on only as ``progress`` chunks, as a tool call's
pieces do until the call is whole.
https://platform.openai.com/docs/api-reference/chat/create
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import openai

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common import tool_choice
from services.common.models import ModelSpec
from services.model.providers.config import provider_name
from services.model.providers.engine_run import EngineRun, NoProps
from services.model.providers.failures import (
    StreamCut,
    lost_after_end,
    never_sent,
)
from services.model.providers.prefill_echo import EchoedPrefill
from services.model.providers.progress import Progress, contract_stop_reason, tool_use_chunk
from services.model.providers.tool_ids import tool_ids
from services.model.providers.usage_check import believed_count, most_tokens

# finish reasons in the Gateway's words: OpenAI's, and OpenAI-compatible engines' own (TGI
# before 2.2.1 "eos_token", Together "eos", others "end", "stop_sequence"); see stop_reason_of
STOP_REASONS = {
    "stop": "end_turn",
    "eos_token": "end_turn",
    "eos": "end_turn",
    "end": "end_turn",
    "stop_sequence": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
    "abort": "max_tokens",  # vLLM, SGLang: the request was aborted, the answer is cut
}


def stop_reason_of(finish_reason: str, called_tools: bool, who: str = "openai") -> str:
    """The Gateway's stop reason for a choice's ``finish_reason``. A turn that called tools is
    ``tool_use`` however it finished (gpt-4o streaming and Ollama say ``stop``), unless it hit
    the output limit (``max_tokens``: a call may be cut) or a content filter (``refusal``);
    an unknown reason is ``max_tokens`` (``contract_stop_reason``: the answer may be cut; its
    line names ``who`` answered it, ``provider_name``)."""
    mapped = contract_stop_reason(who, finish_reason, STOP_REASONS)
    return "tool_use" if called_tools and mapped == "end_turn" else mapped


# what marks a failed tool's result (is_error) in its ``tool`` message, for the model to see
TOOL_ERROR_PREFIX = "Error: "


def _tool_content(result: pb.ToolResult) -> str:
    return TOOL_ERROR_PREFIX + result.content if result.is_error else result.content


def _texts(blocks: list[pb.ContentBlock]) -> str:
    return "\n\n".join(block.text for block in blocks if block.WhichOneof("kind") == "text")


def echoed_prefill(spec: ModelSpec, request: pb.CompleteRequest) -> str:
    """The prefill's text as sent (a last assistant message's), when the row's engine repeats it
    at the start of its answer (``ModelSpec.echoes_prefill``), else ""."""
    if not spec.echoes_prefill or not request.messages:
        return ""
    last = request.messages[-1]
    return _texts(list(last.content)) if last.role == pb.ROLE_ASSISTANT else ""


# the longest tool call id OpenAI takes: a longer one, on an assistant message's call or a tool
# message, is its 400 "Invalid 'messages[1].tool_calls[0].id': string too long. Expected a
# string with maximum length 40" (code string_above_max_length)
OPENAI_TOOL_ID_CHARS = 40
_DIGEST_CHARS = 12


def openai_tool_id(call_id: str, n: int = 1) -> str:
    """``call_id`` as an id OpenAI takes: itself when it is 40 characters or fewer; else its
    first 27 and a digest of the whole (40 in all: two ids alike in their first 27 stay two).
    ``n``: the ``n``-th id tried for it (``tool_ids``: when the first is already an id of the
    request), its first characters less ``_n``'s length, then the digest and ``_n`` (40 still).
    The same on a call and on its ``tool`` message, so the pair still matches: an id is opaque,
    only pairing them. Before, an id another model wrote (vLLM's ``chatcmpl-tool-`` and 32 hex
    digits, 46 characters: ``auto``'s next turn may go to a gpt tier) or a client's own went as
    it was, and OpenAI refused the conversation (400) on every later turn."""
    if len(call_id) <= OPENAI_TOOL_ID_CHARS:
        return call_id
    digest = hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()
    suffix = "" if n == 1 else f"_{n}"
    kept = OPENAI_TOOL_ID_CHARS - _DIGEST_CHARS - 1 - len(suffix)
    return f"{call_id[:kept]}_{digest[:_DIGEST_CHARS]}{suffix}"


def _fits_openai(call_id: str) -> bool:
    return len(call_id) <= OPENAI_TOOL_ID_CHARS


def _as_sent(call_id: str) -> str:
    return call_id


def _messages(request: pb.CompleteRequest, tool_id: Callable[[str], str]) -> list[dict[str, Any]]:
    """The messages; ``tool_id``: each tool call id as the provider is sent it."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": _texts(list(request.system))})
    for message in request.messages:
        blocks = list(message.content)
        if message.role == pb.ROLE_ASSISTANT:
            calls = [
                {
                    "id": tool_id(block.tool_use.id),
                    "type": "function",
                    "function": {
                        "name": block.tool_use.name,
                        "arguments": block.tool_use.input_json or "{}",
                    },
                }
                for block in blocks
                if block.WhichOneof("kind") == "tool_use"
            ]
            entry: dict[str, Any] = {"role": "assistant", "content": _texts(blocks) or None}
            if calls:
                entry["tool_calls"] = calls
            messages.append(entry)
            continue
        for block in blocks:
            if block.WhichOneof("kind") == "tool_result":
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": tool_id(block.tool_result.tool_use_id),
                        "content": _tool_content(block.tool_result),
                    }
                )
        if text := _texts(blocks):
            messages.append({"role": "user", "content": text})
    return messages


def _tool_choice(request: pb.CompleteRequest) -> str | dict[str, Any] | None:
    """Chat Completions' ``tool_choice`` (``auto``: none sent, the default with tools; ANY is
    ``required``); an OpenAI-compatible engine (llama-server, vLLM) takes the same form."""
    mode = tool_choice.sent_mode(request)
    if mode == "auto":
        return None
    if mode == "tool":
        return {"type": "function", "function": {"name": request.tool_choice.name}}
    return "required" if mode == "any" else "none"


def chat_params(spec: ModelSpec, request: pb.CompleteRequest) -> dict[str, Any]:
    """The Chat Completions body (less ``stream`` and ``stream_options``)."""
    # OpenAI's own API bounds a tool call id; an OpenAI-compatible engine gets its ids as they
    # were (vLLM's own are longer, and it takes them back)
    tool_id: Callable[[str], str] = _as_sent
    if spec.provider == "openai":
        # one to one within the request (a client's id may be another's shortened form):
        # the adapters' one rule, ``services.model.providers.tool_ids``
        tool_id = tool_ids(request, _fits_openai, openai_tool_id).__getitem__
    params: dict[str, Any] = {"model": spec.upstream, "messages": _messages(request, tool_id)}
    if request.tools:
        params["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    **({"description": tool.description} if tool.description else {}),
                    "parameters": json.loads(tool.input_schema_json or '{"type": "object"}'),
                },
            }
            for tool in request.tools
        ]
    choice = _tool_choice(request)
    if choice is not None:
        params["tool_choice"] = choice
    params[spec.max_tokens_param] = request.max_tokens
    if request.HasField("temperature"):
        params["temperature"] = request.temperature
    if request.cache.prompt_cache_key:
        params["prompt_cache_key"] = request.cache.prompt_cache_key
    if spec.prompt_cache_retention is not None:
        params["prompt_cache_retention"] = spec.prompt_cache_retention
    return params


def cached_field(usage: Any) -> tuple[str, Any]:
    """The prompt's tokens read from the provider's cache, and the field that reports them:
    OpenAI's ``prompt_tokens_details.cached_tokens``, else DeepSeek's
    ``prompt_cache_hit_tokens`` (its prompt_tokens = prompt_cache_hit_tokens +
    prompt_cache_miss_tokens; https://api-docs.deepseek.com/guides/kv_cache). Never both: they
    count the same tokens."""
    cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None)
    if cached is not None:
        return "prompt_tokens_details.cached_tokens", cached
    return "prompt_cache_hit_tokens", getattr(usage, "prompt_cache_hit_tokens", None)


_CACHED_FIELDS = ("prompt_tokens_details.cached_tokens", "prompt_cache_hit_tokens")


def _usage(
    usage: Any, planned_prompt: int, most: int, distrusted: dict[str, str]
) -> tuple[pc.OpenAIUsage, int, bool]:
    """The usage chunk as the contract carries it, with whether it reported the output's
    count. A prompt count not reported (null, missing, or 0: Ollama's for a prompt it had
    cached; a prompt is never empty) is ``planned_prompt``, Plan's count (at least the cached
    tokens); a null ``completion_tokens`` is left 0 for the stream's end to count;
    total_tokens is then their sum. Before, such a count went on as 0: a prompt of 0
    prefix-cache refuses (the answer unbilled) or an answer billed 0 output tokens. A count no
    call has (negative, not whole, past ``most``) is taken as not reported, and named in
    ``distrusted``: the prompt's or its cached part's, and the prompt is Plan's count with
    nothing cached."""

    def count(name: str, value: Any) -> int:
        return believed_count(name, value, most, distrusted)

    completion_details = getattr(usage, "completion_tokens_details", None)
    reasoning = count(
        "completion_tokens_details.reasoning_tokens",
        getattr(completion_details, "reasoning_tokens", None),
    )
    cached = count(*cached_field(usage))
    prompt = count("prompt_tokens", getattr(usage, "prompt_tokens", None))
    completion = count("completion_tokens", getattr(usage, "completion_tokens", None))
    completion_known = completion_reported(usage) and "completion_tokens" not in distrusted
    total = count("total_tokens", getattr(usage, "total_tokens", None))
    if distrusted.keys() & {"prompt_tokens", *_CACHED_FIELDS}:
        prompt = cached = 0
    if prompt == 0:
        prompt = max(planned_prompt, cached)
        total = prompt + completion
    if not completion_known or distrusted:
        total = prompt + completion
    report = pc.OpenAIUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        prompt_tokens_details=pc.OpenAIPromptTokensDetails(cached_tokens=cached),
        completion_tokens_details=pc.OpenAICompletionTokensDetails(reasoning_tokens=reasoning),
    )
    return report, reasoning, completion_known


def completion_reported(usage: Any) -> bool:
    return getattr(usage, "completion_tokens", None) is not None


# where an OpenAI-compatible engine streams a reasoning model's thinking, in the order read: a
# delta's first non-empty one is its thinking (vLLM's backward-compatible deltas carry the same
# text in both). llama-server, DeepSeek and older vLLM: ``reasoning_content``; vLLM 0.11 and
# later, OpenRouter, Ollama: ``reasoning``. OpenAI itself streams none.
REASONING_FIELDS = ("reasoning_content", "reasoning")


def reasoning_of(delta: Any) -> str:
    """The piece of thinking in a streamed delta ("" if none): a field the SDK does not
    declare, kept as the engine sent it (a field that is not text is no thinking)."""
    for name in REASONING_FIELDS:
        piece = getattr(delta, name, None)
        if isinstance(piece, str) and piece:
            return piece
    return ""


@dataclass
class ToolCall:
    """A tool call as streamed so far: its id and name (empty until a piece names them) and
    its argument pieces, read as they come (``add``) far enough to know when they close."""

    id: str = ""
    name: str = ""
    pieces: list[str] = field(default_factory=list)
    _depth: int = 0  # brackets open outside strings
    _in_string: bool = False
    _escaped: bool = False  # the last character was a backslash inside a string
    _closed: bool = False  # an object or array opened and closed again at the top

    def add(self, piece: str) -> None:
        """One more piece of its arguments: each character is read once (linear in the
        arguments, however many pieces and ids they come in)."""
        self.pieces.append(piece)
        for char in piece:
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]" and self._depth:
                self._depth -= 1
                self._closed = self._depth == 0

    def whole(self) -> bool:
        """Whether its arguments so far are a whole JSON object or array (a call that can end
        here)."""
        return self._closed and not self._depth and not self._in_string

    def empty(self) -> bool:
        """Whether it has no arguments yet (a tool without parameters may send none)."""
        return not any(piece.strip() for piece in self.pieces)


class ToolCalls:
    """The tool calls of one streamed turn, in the order they began. A piece belongs to the
    call held at its ``index``; one carrying an id other than that call's starts a new call
    once that call's arguments are whole JSON (Ollama sends every call of a turn whole, as
    index 0, ollama/ollama#15457; vercel/ai#14277's rule), and so does the first piece at an
    index. Before its arguments are whole, a new id is the same call's (Poolside gives a
    call's later pieces another id, poolsideai/pool#9; some engines a new id each piece;
    Atlas opens a call twice, Avarok-Cybersecurity/atlas#33): the last id is kept. An engine
    that sends no index is read the same way, as if every piece had one index. A call with
    no arguments yet is followed by a new call when a piece with a new id names another
    function (a tool without parameters, then another call under the same index). Before,
    parallel calls merged into one: the last id and name, every call's arguments run
    together (``_unparsed_arguments``)."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._held: dict[int | None, ToolCall] = {}  # index (None: none) -> its call now

    def piece(self, index: int | None, call_id: str | None, name: str | None = None) -> ToolCall:
        """The call a streamed piece (its ``index``, ``id`` and function ``name``) belongs to,
        begun if new."""
        held = self._held.get(index)
        if held is None or (call_id and held.id and call_id != held.id and self._ended(held, name)):
            held = self._held[index] = ToolCall()
            self.calls.append(held)
        if call_id:
            held.id = call_id
        return held

    @staticmethod
    def _ended(held: ToolCall, name: str | None) -> bool:
        """Whether a piece with a new id, naming ``name``, comes after ``held`` rather than
        inside it: its arguments are whole, or it has none and the piece names another
        function (the same name again is the call opened twice)."""
        return held.whole() or (held.empty() and bool(name) and name != held.name)


# the response header naming the provider's id of the call (the SDK's ``request_id`` of its
# errors, ``_request_id`` of its parsed answers)
REQUEST_ID_HEADER = "x-request-id"


# A self-hosted llama-server's /props and the field naming its run: ``media_marker``, a random
# string each start of the server draws (llama.cpp tools/server/server-common.h,
# get_media_marker(): "each time the server restarts, the marker will be different"; pinned
# only if its operator sets LLAMA_MEDIA_MARKER, then no restart is seen here, as before)
PROPS_PATH = "props"
RUN_FIELD = "media_marker"
PROPS_TIMEOUT_S = 2.0  # each read's (httpx); a refresh's whole: ``engine_run.REFRESH_BOUND_S``


def engine_run(props: object) -> str:
    """The engine's run named by its /props answer (a digest of ``RUN_FIELD``, which is
    llama-server's guard against media placeholders typed into a prompt: never passed on as
    is); "" when it has none (another engine, an older llama-server)."""
    marker = props.get(RUN_FIELD) if isinstance(props, dict) else None
    if not isinstance(marker, str) or not marker:
        return ""
    return hashlib.sha256(marker.encode()).hexdigest()[:16]


class OpenAIAdapter:
    backend = "openai"

    def __init__(
        self, client: openai.AsyncOpenAI, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._client = client
        base = client.base_url
        # the engine's /props, next to the base URL's ``v1``
        path = base.raw_path.rstrip(b"/")
        if path.endswith(b"/v1"):
            path = path[: -len(b"v1")]
        self._props_url = str(
            base.copy_with(raw_path=path.rstrip(b"/") + b"/" + PROPS_PATH.encode())
        )
        # a self-hosted engine's run, refreshed off the call path (``EngineRun``); named in
        # its log by host and port only (the base URL may carry credentials)
        self._run = EngineRun(self._props_run, f"{base.host}:{base.port}", clock)

    async def close(self) -> None:
        await self._run.close()
        await self._client.close()

    async def _props_run(self) -> str:
        """The engine's run (``engine_run`` of its /props); ``NoProps`` if it has none (a
        404); any failure raised (``EngineRun`` bounds it)."""
        try:
            props = await self._client.get(
                self._props_url, cast_to=object, options={"timeout": PROPS_TIMEOUT_S}
            )
        except openai.NotFoundError as exc:
            raise NoProps() from exc
        return engine_run(props)

    async def stream(
        self,
        spec: ModelSpec,
        request: pb.CompleteRequest,
        progress: Progress,
        timeout_s: float,
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        # a self-hosted engine's run (a restart: its KV cache gone, GenerateStart.
        # engine_instance tells prefix-cache), refreshed in the background when due: the call
        # sends it as known when its chat's headers came, and never waits for /props
        self_hosted = spec.provider == "self_hosted"
        if self_hosted:
            self._run.refresh_if_due()
        with never_sent():
            params = chat_params(spec, request)
            chunks = await self._client.chat.completions.create(
                **params,
                stream=True,
                stream_options={"include_usage": True},
                timeout=timeout_s,
            )
        if self_hosted:
            progress.engine_instance = self._run.run
        progress.answered(chunks.response.headers, REQUEST_ID_HEADER)  # its id of the call
        calls = ToolCalls()
        echo = EchoedPrefill(echoed_prefill(spec, request))
        finish: str | None = None  # set by the final event; None: the stream was cut
        report: pc.OpenAIUsage | None = None
        counted_output = False  # the report's completion_tokens was null: counted here
        reasoning = 0
        most, distrusted = most_tokens(spec), progress.distrusted
        try:
            async with chunks:
                async for chunk in chunks:
                    if chunk.usage is not None:
                        report, reasoning, known = _usage(
                            chunk.usage, progress.estimated_prompt_tokens, most, distrusted
                        )
                        counted_output = not known
                        progress.usage = pc.ProviderUsage(openai=report)  # kept as it comes
                    # ``or ()``: some OpenAI-compatible engines send ``"choices": null`` (on the
                    # usage chunk, on a heartbeat); before, a TypeError broke the answer there
                    for choice in chunk.choices or ():
                        delta = choice.delta
                        if delta is not None and (thinking := reasoning_of(delta)):
                            # the model thinks (its first token: the prefill is done); the
                            # router sees it go on, the client never sees it
                            if not progress.started:
                                yield progress.start()
                            yield progress.reasoning(thinking)
                        if delta is not None and delta.content:
                            if not progress.started:
                                yield progress.start()
                            if text := echo.take(delta.content):
                                yield progress.text(text)
                        for call in (delta.tool_calls if delta is not None else None) or []:
                            if not progress.started:
                                yield progress.start()
                            named = call.function.name if call.function is not None else None
                            entry = calls.piece(call.index, call.id, named)
                            if call.function is not None:
                                if call.function.name:
                                    entry.name = call.function.name
                                    yield progress.tool_piece(call.function.name)
                                if call.function.arguments:
                                    entry.add(call.function.arguments)
                                    yield progress.tool_piece(call.function.arguments)
                        if choice.finish_reason:
                            finish = choice.finish_reason
        except Exception as exc:  # (a CancelledError passes)
            if finish is None or report is None:
                raise  # broken before the answer and its usage were whole: a broken stream
            # the answer and its bill are whole: only [DONE] was lost (the connection, an
            # error chunk, a chunk this adapter could not read after them)
            lost_after_end(provider_name(spec, self.backend), spec.id, exc, progress.request_id)
        if finish is None:
            raise StreamCut("the stream ended without a choice's finish_reason")
        if not progress.started:
            yield progress.start()
        if text := echo.rest():
            yield progress.text(text)
        for n, call in enumerate(calls.calls):
            yield tool_use_chunk(call.id or f"call_{n}", call.name, "".join(call.pieces))
        stop_reason = stop_reason_of(finish, bool(calls.calls), provider_name(spec, self.backend))
        end = model_pb2.GenerateEnd(stop_reason=stop_reason, reasoning_tokens=reasoning)
        if report is not None:
            if counted_output:  # the provider reported no output count: this adapter's
                report.completion_tokens = progress.output_tokens()
                report.total_tokens = report.prompt_tokens + report.completion_tokens
            end.output_tokens = report.completion_tokens
            end.provider_usage.openai.CopyFrom(report)
        yield model_pb2.GenerateChunk(end=end)
