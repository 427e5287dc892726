"""The Anthropic Messages API through the official ``anthropic`` SDK (async, streaming).

``messages_params`` maps a Gateway request to the Messages API's body one to one (system
blocks, tools and content blocks keep their ``cache_control`` breakpoints, 5-minute or 1-hour;
``tool_use`` / ``tool_result`` blocks as they are); ``AnthropicAdapter.stream`` reads the SSE
stream (message_start, content_block_start / delta / stop, message_delta, message_stop; the
SDK skips pings and raises on an ``error`` event) and turns it into the Model contract's
chunks: message_start's usage (the prompt, billed from then on) as ``Progress.reported``'s
chunk, which the driver keeps; ``start`` at the first content block, text deltas as they
arrive, a ``tool_use`` block once its input JSON is complete, and ``end`` with the reported
usage; each piece of a tool call as it streams, and of a ``thinking`` block (which goes
nowhere else), is a ``progress`` chunk.
https://docs.claude.com/en/api/messages-streaming
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import anthropic

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common import tool_choice
from services.common.models import ModelSpec
from services.model.providers.failures import (
    StreamCut,
    lost_after_end,
    never_sent,
)
from services.model.providers.progress import Progress, contract_stop_reason, tool_use_chunk
from services.model.providers.tool_ids import tool_ids as shared_tool_ids
from services.model.providers.usage_check import believed_count, most_tokens, token_count

# Anthropic's stop reasons, in the Gateway's words (end_turn | max_tokens | tool_use)
STOP_REASONS = {
    "end_turn": "end_turn",
    "stop_sequence": "end_turn",
    "pause_turn": "end_turn",
    "max_tokens": "max_tokens",
    "model_context_window_exceeded": "max_tokens",
    "tool_use": "tool_use",
    "refusal": "refusal",
}
_TTL = {pb.CACHE_TTL_5M: "5m", pb.CACHE_TTL_1H: "1h"}


def cache_control(block: pb.ContentBlock | pb.Tool) -> dict[str, str] | None:
    if not block.HasField("cache_control"):
        return None
    control = {"type": "ephemeral"}
    if (ttl := _TTL.get(block.cache_control.ttl)) is not None:
        control["ttl"] = ttl
    return control


# the tool_use ids the Messages API takes; another is a 400 ("messages.1.content.0.tool_use.id:
# String should match pattern '^[a-zA-Z0-9_-]+$'")
_TOOL_ID = re.compile(r"[a-zA-Z0-9_-]+")


def tool_id(call_id: str) -> str:
    """``call_id`` as an id the Messages API takes: itself when it is one; else its other
    characters as ``_`` and a digest of the whole (two ids differing only there stay two).
    The same on a tool_use and on its tool_result, so the pair still matches: an id is
    opaque, only pairing them. Before, an id another provider's model wrote (an
    OpenAI-compatible engine's ``functions.calc:0``, a client's own) went as it was, and
    Anthropic refused the conversation (400) on every later turn sent to a Claude model."""
    if _fits(call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{re.sub(r'[^a-zA-Z0-9_-]', '_', call_id)}_{digest}"


def _candidate(call_id: str, n: int) -> str:
    """The ``n``-th id tried for ``call_id`` (``tool_ids.tool_ids``): ``tool_id``'s, then
    ``_2``, ``_3`` ... after it."""
    base = tool_id(call_id)
    return base if n == 1 else f"{base}_{n}"


def _fits(call_id: str) -> bool:
    return _TOOL_ID.fullmatch(call_id) is not None


def tool_ids(request: pb.CompleteRequest) -> dict[str, str]:
    """Each tool id of the request's messages -> the id sent for it, one to one within the
    request (the adapters' one rule, ``services.model.providers.tool_ids``): an id in the API's
    pattern is itself; another is ``tool_id``'s, and when that is already taken (an id of the
    request is literally another's rewrite, or two rewrites meet) ``_2``, ``_3`` ... after it
    until it is not. Before, ``tool_id`` alone: ``a.b`` and a call named ``a_b_`` + its digest
    went as one id, which Anthropic refuses (``tool_use`` ids must be unique) or pairs with the
    wrong result."""
    return shared_tool_ids(request, _fits, _candidate)


def _block(block: pb.ContentBlock, ids: Mapping[str, str]) -> dict[str, Any]:
    """``block`` as the Messages API takes it; ``ids``: the request's tool ids as sent
    (``tool_ids``, which maps every one; a system block has none)."""
    kind = block.WhichOneof("kind")
    out: dict[str, Any]
    if kind == "tool_use":
        use = block.tool_use
        out = {
            "type": "tool_use",
            "id": ids[use.id],
            "name": use.name,
            "input": json.loads(use.input_json or "{}"),
        }
    elif kind == "tool_result":
        result = block.tool_result
        out = {
            "type": "tool_result",
            "tool_use_id": ids[result.tool_use_id],
            "content": result.content,
        }
        if result.is_error:
            out["is_error"] = True
    else:
        out = {"type": "text", "text": block.text}
    if (control := cache_control(block)) is not None:
        out["cache_control"] = control
    return out


def _results_first(message: pb.Message) -> list[pb.ContentBlock]:
    """A message's blocks, its ``tool_result`` blocks first (a stable sort: each group in its
    order): the Messages API refuses a message after a tool call that does not begin with its
    results (400, "Did not find 1 tool_result block(s) at the beginning of this message"),
    where a user's text beside the results, before them, is a turn OpenAI-compatible engines
    take (``openai_wire`` sends the results as ``tool`` messages, then the text)."""
    return sorted(message.content, key=lambda block: block.WhichOneof("kind") != "tool_result")


def _tool_choice(request: pb.CompleteRequest) -> dict[str, Any] | None:
    """The Messages API's ``tool_choice`` (``auto``: none sent, the API's default with tools)."""
    mode = tool_choice.sent_mode(request)
    if mode == "auto":
        return None
    if mode == "tool":
        return {"type": "tool", "name": request.tool_choice.name}
    return {"type": mode}


def messages_params(spec: ModelSpec, request: pb.CompleteRequest) -> dict[str, Any]:
    """The Messages API body (less ``stream``, which the adapter adds)."""
    params: dict[str, Any] = {"model": spec.upstream, "max_tokens": request.max_tokens}
    if request.system:
        params["system"] = [_block(block, {}) for block in request.system]
    if request.tools:
        tools = []
        for tool in request.tools:
            entry: dict[str, Any] = {"name": tool.name}
            if tool.description:
                entry["description"] = tool.description
            entry["input_schema"] = json.loads(tool.input_schema_json or '{"type": "object"}')
            if (control := cache_control(tool)) is not None:
                entry["cache_control"] = control
            tools.append(entry)
        params["tools"] = tools
    choice = _tool_choice(request)
    if choice is not None:
        params["tool_choice"] = choice
    ids = tool_ids(request)
    params["messages"] = [
        {
            "role": "assistant" if message.role == pb.ROLE_ASSISTANT else "user",
            "content": [_block(block, ids) for block in _results_first(message)],
        }
        for message in request.messages
    ]
    if request.HasField("temperature"):
        params["temperature"] = request.temperature
    return params


# The SDK (anthropic 2.x) sends ``anthropic-version: 2026-10-21``, the version that removed the
# sampling parameters: under it, a request with ``temperature`` (at its default value too) is a
# 400, ``temperature: Extra inputs are not permitted``, and its ``create()`` has no such
# parameter. ``2023-06-01`` takes it, and differs from 2026-10-21 in no field this adapter
# sends or reads (2026-10-21's other refusals, a user text block's ``citations`` and an
# assistant message's ``document`` block, are blocks it never sends), so a request that carries
# a temperature goes as 2023-06-01; one without goes as the SDK's own version.
# https://platform.claude.com/docs/en/api/versioning
SAMPLING_VERSION = "2023-06-01"


def sampling_options(temperature: float | None) -> dict[str, Any]:
    """``create()``'s options for a request's temperature: the body field the SDK has no
    argument for, and the API version that takes it; none without one."""
    if temperature is None:
        return {}
    return {
        "extra_body": {"temperature": temperature},
        "extra_headers": {"anthropic-version": SAMPLING_VERSION},
    }


def _merge_usage(
    target: pc.AnthropicUsage, usage: Any, most: int, distrusted: dict[str, str]
) -> set[str]:
    """Folds a usage object of the stream into ``target``: message_start's, then
    message_delta's (cumulative counts: a field it leaves null keeps its value, and an input
    count lower than the provider reported before, e.g. a proxy's 0 for a count it does not
    have, is not believed; ``target`` holds the provider's counts only, never Plan's;
    the output count is message_delta's, message_start's being a placeholder). A count no call
    has (``usage_check``) is not folded: it goes in ``distrusted``. Returns the counts it
    reported."""
    reported: set[str] = set()
    if usage is None:
        return reported
    for name in (
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "output_tokens",
    ):
        value = getattr(usage, name, None)
        if value is not None:
            count, why = token_count(value, most)
            if count is None:
                distrusted[name] = why
                continue
            kept = getattr(target, name) if name != "output_tokens" else 0  # start's: a guess
            setattr(target, name, max(count, kept))
            reported.add(name)
    creation = getattr(usage, "cache_creation", None)
    if creation is not None:
        for name in ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"):
            value = getattr(creation, name, None)
            if value is not None:
                count, why = token_count(value, most)
                if count is None:
                    distrusted[f"cache_creation.{name}"] = why
                else:
                    setattr(target.cache_creation, name, count)
    return reported


def _thinking_tokens(usage: Any, most: int, distrusted: dict[str, str]) -> int:
    """Of the output, the thinking's tokens as the provider reported them
    (``usage.output_tokens_details.thinking_tokens``, cumulative), else 0. One no call has
    is not believed: named in ``distrusted``, 0."""
    details = getattr(usage, "output_tokens_details", None)
    value = getattr(details, "thinking_tokens", None)
    return believed_count("output_tokens_details.thinking_tokens", value, most, distrusted)


# the fields of the prompt's report: one not believed, and none of them is (their split)
_PROMPT_FIELDS = frozenset(
    {
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "cache_creation.ephemeral_5m_input_tokens",
        "cache_creation.ephemeral_1h_input_tokens",
    }
)


def _settled(
    usage: pc.AnthropicUsage, progress: Progress, input_reported: bool
) -> pc.AnthropicUsage:
    """A copy of ``usage`` with the prompt's counts settled (``_settle_prompt``): the bill of
    message_start's report, while ``usage`` itself keeps the provider's counts only. Before,
    Plan's count was filled into ``usage`` at message_start, and the count message_delta then
    reported (an engine whose message_start says 0 or null, SGLang's, mlx-node's) lost to it,
    the larger kept: 25 reported, Plan's 1,000 billed."""
    settled = pc.AnthropicUsage()
    settled.CopyFrom(usage)
    _settle_prompt(settled, progress, input_reported)
    return settled


def _settle_prompt(usage: pc.AnthropicUsage, progress: Progress, input_reported: bool) -> None:
    """The prompt's counts the bill takes: as reported, else (not reported, or a part of the
    report no call has) Plan's count. Done at the stream's end (and on a copy for
    message_start's report): Plan's count fills in only what the provider never reported."""
    if progress.distrusted.keys() & _PROMPT_FIELDS:
        usage.input_tokens = usage.cache_creation_input_tokens = usage.cache_read_input_tokens = 0
        usage.ClearField("cache_creation")
        input_reported = False
    if not input_reported or prompt_of(usage) == 0:
        _unreported_input(usage, progress.estimated_prompt_tokens)


def _unreported_input(usage: pc.AnthropicUsage, planned_prompt: int) -> None:
    """An ``input_tokens`` the provider did not report (null, or a prompt of 0 tokens in
    all, which no prompt is): Plan's count of the prompt less its reported cache tokens.
    Before, it went on as 0: a prompt of 0 that prefix-cache refuses, the answer unbilled."""
    cache = usage.cache_creation_input_tokens + usage.cache_read_input_tokens
    usage.input_tokens = max(planned_prompt - cache, 0)


def prompt_of(usage: pc.AnthropicUsage) -> int:
    return usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens


# the response header naming the provider's id of the call (the SDK's ``request_id`` of its
# errors, ``_request_id`` of its parsed answers)
REQUEST_ID_HEADER = "request-id"


class AnthropicAdapter:
    backend = "anthropic"

    def __init__(self, client: anthropic.AsyncAnthropic) -> None:
        self._client = client

    async def close(self) -> None:
        await self._client.close()

    async def stream(
        self,
        spec: ModelSpec,
        request: pb.CompleteRequest,
        progress: Progress,
        timeout_s: float,
    ) -> AsyncGenerator[model_pb2.GenerateChunk, None]:
        with never_sent():
            params = messages_params(spec, request)
            sampling = sampling_options(params.pop("temperature", None))
            events = await self._client.messages.create(
                **params, stream=True, timeout=timeout_s, **sampling
            )
        progress.answered(events.response.headers, REQUEST_ID_HEADER)  # its id of the call
        usage = pc.AnthropicUsage()  # the counts as reported
        prompt = pc.AnthropicUsage()  # and as message_start's report is billed
        input_reported = output_reported = False
        most, distrusted = most_tokens(spec), progress.distrusted
        tools: dict[int, list[Any]] = {}  # index -> [id, name, partial JSON pieces]
        stop_reason: str | None = None  # set by the final event; None: the stream was cut
        thinking = 0  # of the output, the thinking's tokens as reported (0: not reported)
        try:
            async with events:
                async for event in events:
                    kind = event.type
                    if kind == "message_start":
                        merged = _merge_usage(usage, event.message.usage, most, distrusted)
                        reported_thinking = _thinking_tokens(event.message.usage, most, distrusted)
                        thinking = reported_thinking or thinking
                        input_reported = "input_tokens" in merged
                        # the prompt as billed so far; ``usage`` keeps the provider's own
                        # counts, which message_delta's fold into
                        prompt = _settled(usage, progress, input_reported)
                        report = progress.reported(pc.ProviderUsage(anthropic=prompt))
                        if not progress.started:  # (a second message_start: nothing new)
                            yield report
                    elif kind == "content_block_start":
                        if not progress.started:
                            yield progress.start(prompt_of(prompt) or None)
                        block = event.content_block
                        if block.type == "tool_use":
                            tools[event.index] = [block.id, block.name, []]
                            yield progress.tool_piece(block.name)
                        elif block.type == "text" and block.text:
                            yield progress.text(block.text)
                    elif kind == "content_block_delta":
                        delta = event.delta
                        if delta.type == "text_delta" and delta.text:
                            yield progress.text(delta.text)
                        elif delta.type == "input_json_delta" and event.index in tools:
                            tools[event.index][2].append(delta.partial_json)
                            yield progress.tool_piece(delta.partial_json)
                        elif delta.type == "thinking_delta":
                            yield progress.reasoning(delta.thinking)
                        elif delta.type == "signature_delta":
                            yield progress.reasoning("")  # the thinking's end: no tokens
                    elif kind == "content_block_stop" and event.index in tools:
                        call_id, name, pieces = tools.pop(event.index)
                        yield tool_use_chunk(call_id, name, "".join(pieces))
                    elif kind == "message_delta":
                        reported = _merge_usage(usage, event.usage, most, distrusted)
                        reported_thinking = _thinking_tokens(event.usage, most, distrusted)
                        thinking = reported_thinking or thinking  # cumulative: the latest
                        # the answer's output count is message_delta's (message_start's is
                        # a placeholder)
                        output_reported = output_reported or "output_tokens" in reported
                        input_reported = input_reported or "input_tokens" in reported
                        reason = event.delta.stop_reason
                        if reason:
                            stop_reason = contract_stop_reason("anthropic", reason, STOP_REASONS)
        except Exception as exc:  # (a CancelledError passes)
            if stop_reason is None:
                raise  # broken before message_delta: a broken stream
            # only message_stop was lost (the connection, or an ``error`` event in its place):
            # message_delta brought the answer's end and its usage
            lost_after_end(self.backend, spec.id, exc, progress.request_id)
        if stop_reason is None:
            raise StreamCut("the stream ended without its message_delta's stop_reason")
        _settle_prompt(usage, progress, input_reported)
        if not output_reported:  # the provider reported no output count: this adapter's
            usage.output_tokens = progress.output_tokens()
        if not progress.started:
            yield progress.start(prompt_of(usage) or None)
        yield model_pb2.GenerateChunk(
            end=model_pb2.GenerateEnd(
                output_tokens=usage.output_tokens,
                stop_reason=stop_reason,
                reasoning_tokens=thinking,
                provider_usage=pc.ProviderUsage(anthropic=usage),
            )
        )
