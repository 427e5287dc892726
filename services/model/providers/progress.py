"""One provider call's progress, shared by an adapter and the driver: whether the first token
has gone out, what the model wrote so far (its text, its tool calls, its thinking) and the
usage the provider has reported so far (what an interrupted answer is billed for); and the
helpers both adapters end a call with."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.common import strict_json
from services.common.output_count import streamed_output_tokens
from services.model.providers.failures import request_id_shown

log = logging.getLogger("cachemesh.model")
# A stop reason the adapter does not know: the answer may be cut (never stored by L1).
UNKNOWN_STOP_REASON = "max_tokens"
MAX_UNKNOWN_LOGGED = 32  # distinct unknown stop reasons logged per process, then no more
_unknown_logged: set[tuple[str, str]] = set()
# The running count of what the model wrote counts it whole again once what was written since
# its last whole count is an eighth of it (else what was written since the last progress
# chunk, alone): a long answer is counted about nine times over in all, not once a piece (its
# length squared), and the count a chunk carries is the whole count plus at most an eighth of
# the output counted in pieces. Text alone sends no progress chunk and is never counted here.
RECOUNT_SHARE = 8
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a str holds a pair as one character


@dataclass
class Progress:
    replica: str
    backend: str
    estimated_prompt_tokens: int  # Plan's count, until the provider reports its own
    started: bool = False
    # the replica serves its waiting calls' turns by tenant (its gate's fair queue), told in
    # the start (``GenerateStart.tenant_fair_queue``); False: no gate, the engine's own order
    tenant_fair_queue: bool = False
    # the run of the engine answering (``GenerateStart.engine_instance``; "": not known), set
    # by the adapter before the start
    engine_instance: str = ""
    pieces: list[str] = field(default_factory=list)
    # tool calls' names and argument JSON as streamed, finished or not: output tokens too
    tool_pieces: list[str] = field(default_factory=list)
    # the model's thinking as streamed (never passed on): output tokens too
    reasoning_pieces: list[str] = field(default_factory=list)
    usage: pc.ProviderUsage | None = None
    # the usage fields the provider reported with a figure no call has, and why
    # (``usage_check``): taken as not reported
    distrusted: dict[str, str] = field(default_factory=dict)
    # the row's tokenizer's count (``ProviderApi``'s): each ``progress`` chunk then carries the
    # running count of what the model wrote (None: it carries none)
    count: Callable[[str], int] | None = None
    # the provider's id of this call (its response's ``request-id`` / ``x-request-id`` header:
    # what an operator hands the provider about it), as ``shown_request_id`` lets it be shown
    # ("" if none, or none that may be shown); set by the adapter once the response came
    request_id: str = ""
    shown_request_id: Callable[[object], str] = field(default=request_id_shown)
    _counted: int = field(default=0, init=False)  # the output's whole count, when last made
    _counted_chars: int = field(default=0, init=False)  # and its length then
    _since: int = field(default=0, init=False)  # the pieces counted since, batch by batch
    _since_chars: int = field(default=0, init=False)
    _uncounted: list[str] = field(default_factory=list, init=False)  # written since a count
    _half: str = field(default="", init=False)  # a text piece's last half character, held
    # the UTF-8 bytes of the visible output so far (text, tool calls) and its non-empty pieces
    # (each at least one provider token), then the same of the whole output (thinking too):
    # what ``OutputCut`` reads
    visible_bytes: int = field(default=0, init=False)
    visible_pieces: int = field(default=0, init=False)
    produced_bytes: int = field(default=0, init=False)
    produced_pieces: int = field(default=0, init=False)

    def answered(self, headers: Mapping[str, str], name: str) -> None:
        """The provider answered (a stream began): its id of the call, from its ``name``
        header."""
        self.request_id = self.shown_request_id(headers.get(name))

    def reported(self, usage: pc.ProviderUsage) -> model_pb2.GenerateChunk:
        """The provider's report of the prompt's usage before the first token (Anthropic's
        message_start: it bills the prompt and its cache writes from then on), kept as the
        usage so far. The ``progress`` chunk returned wakes the driver (``ProviderApi``), which
        does not pass it on: its wait for the first token now ends a margin before the
        deadline, so that a call cut there still sends that usage (a start, an interrupted
        end) for the router to bill."""
        self.usage = usage
        return model_pb2.GenerateChunk(progress=model_pb2.GenerateProgress(output_tokens=0))

    def start(self, prompt_tokens: int | None = None) -> model_pb2.GenerateChunk:
        self.started = True
        return model_pb2.GenerateChunk(
            start=model_pb2.GenerateStart(
                replica=self.replica,
                prompt_tokens=self.estimated_prompt_tokens
                if prompt_tokens is None
                else prompt_tokens,
                kv_cached_tokens=0,  # a provider reports its cache reuse at the end
                kv_cached_unreported=True,
                backend=self.backend,
                tenant_fair_queue=self.tenant_fair_queue,
                engine_instance=self.engine_instance,
            )
        )

    def text(self, text: str) -> model_pb2.GenerateChunk:
        """A piece of the answer's text. A character a provider split between two pieces (an
        emoji's UTF-16 halves, each escaped in its own event) is whole in the next: a trailing
        high surrogate is held back for it (one the stream ends on is half a character, and
        dropped); a surrogate still alone is U+FFFD (``wellformed``)."""
        text, self._half = self._half + text, ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self._half = text[:-1], text[-1]
        text = wellformed(text)
        self.pieces.append(text)
        if text:
            self._grew(_utf8_length(text), visible=True)
        if self.count is not None:  # counted at the next progress chunk, if one comes
            self._uncounted.append(text)
        return model_pb2.GenerateChunk(text=text)

    def tool_piece(self, piece: str) -> model_pb2.GenerateChunk:
        """A tool call's name or a piece of its arguments, as the provider streams it: output
        tokens, and the ``progress`` chunk that tells the router the answer goes on (the call
        itself goes out whole, ``tool_use_chunk``; a slow engine may take longer writing it
        than the router lets a call be silent mid-answer)."""
        if piece:
            self.tool_pieces.append(piece)
            self._grew(_utf8_length(piece), visible=True)
        return self._progress(piece)

    def reasoning(self, piece: str) -> model_pb2.GenerateChunk:
        """A piece of the model's thinking, as the provider streams it (an engine serving a
        reasoning model: ``reasoning_content``; Anthropic's ``thinking_delta``): output tokens
        the provider bills, and a ``progress`` chunk, as for a tool call's piece (a model may
        think for longer than the router lets a call be silent). The thinking itself goes
        nowhere: the contract has no place for it, and no client is shown it."""
        if piece:
            self.reasoning_pieces.append(piece)
            self._grew(_utf8_length(piece), visible=False)
        return self._progress(piece)

    def _grew(self, size: int, *, visible: bool) -> None:
        """One non-empty piece of ``size`` UTF-8 bytes written, ``visible`` or thinking."""
        if visible:
            self.visible_bytes += size
            self.visible_pieces += 1
        self.produced_bytes += size
        self.produced_pieces += 1

    def produced(self) -> tuple[str, str, str]:
        """What the model wrote so far: its text, its tool calls' names and arguments, and
        its thinking."""
        return (
            "".join(self.pieces),
            wellformed("".join(self.tool_pieces)),
            wellformed("".join(self.reasoning_pieces)),
        )

    def visible(self) -> tuple[str, str]:
        """What the model wrote so far that the caller sees: its text and its tool calls'
        names and arguments (not its thinking)."""
        return "".join(self.pieces), wellformed("".join(self.tool_pieces))

    def output_tokens(self) -> int:
        """The count of what the model wrote so far (its text, tool calls and thinking), with
        the row's tokenizer, or its non-empty pieces when they are more
        (``streamed_output_tokens``: each piece a provider streams is at least one of its
        tokens): a provider's output when it reports none (0 without ``count``). Before, 1,281
        whitespace pieces cut were billed 325, and 1,000 ending with a report of no output
        count 250."""
        if self.count is None:
            return 0
        counted = sum(self.count(part) for part in self.produced() if part)
        return streamed_output_tokens(counted, self.produced_pieces)

    def _progress(self, piece: str) -> model_pb2.GenerateChunk:
        """The ``progress`` chunk of ``piece`` (already recorded), with the running count of
        what the model wrote: a call the router cuts or its caller leaves gets no ``end``, and
        is billed this count (and the text the router received after it)."""
        output_tokens = self._counted_with(piece)
        return model_pb2.GenerateChunk(
            progress=model_pb2.GenerateProgress(output_tokens=output_tokens)
        )

    def _counted_with(self, piece: str) -> int:
        """The running count with ``piece`` written: whole (each part counted as an interrupted
        end counts it, ``ProviderApi``) once what was written since the last whole count is an
        eighth of it, else that count plus what was written since, counted at each progress
        chunk (the text between two of them together: an answer of text alone, which sends no
        progress chunk, is never counted here), or the non-empty pieces written so far when
        they are more (``streamed_output_tokens``: a runaway of whitespace thinking, 1,281
        pieces of 32 spaces, was counted 411). 0 without ``count``."""
        if self.count is None:
            return 0
        if piece:
            self._uncounted.append(piece)
        if not self._uncounted:
            return streamed_output_tokens(self._counted + self._since, self.produced_pieces)
        written = wellformed("".join(self._uncounted))
        self._uncounted.clear()
        self._since_chars += len(written)
        if self._since_chars * RECOUNT_SHARE >= self._counted_chars:
            self._counted = sum(self.count(part) for part in self.produced() if part)
            self._counted_chars += self._since_chars
            self._since = self._since_chars = 0
        else:
            self._since += self.count(written)
        return streamed_output_tokens(self._counted + self._since, self.produced_pieces)


def _utf8_length(text: str) -> int:
    """``text``'s length in UTF-8 (a lone surrogate as the 3 bytes it would take)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def reported_prompt_tokens(usage: pc.ProviderUsage) -> int | None:
    """The prompt's tokens in a provider's report (Anthropic's input, cache-write and cache-read
    tokens; OpenAI's prompt_tokens, its cached ones in it); None when it reports none."""
    kind = usage.WhichOneof("report")
    if kind == "anthropic":
        report = usage.anthropic
        total = (
            report.input_tokens
            + report.cache_creation_input_tokens
            + report.cache_read_input_tokens
        )
        return total or None
    if kind == "openai":
        return usage.openai.prompt_tokens or None
    return None


def wellformed(text: str) -> str:
    """``text`` as UTF-8 (and so protobuf) can carry it: the two halves of a character a
    provider split between two pieces (each escaped in its own JSON: ``"\\ud83d"``, then
    ``"\\ude00"``), which Python's ``json`` reads as two lone UTF-16 surrogates, joined (the
    pieces are joined first), and each surrogate still alone made U+FFFD, as a UTF-8 decoder
    shows what it cannot read. Before, the chunk could not be built and the answer broke off
    there (an Anthropic stream: billed, cut, retried by the client)."""
    if text.isascii() or not _LONE_SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def tool_use_chunk(call_id: str, name: str, arguments: str) -> model_pb2.GenerateChunk:
    """A finished tool call as a ``tool_use`` block; its input is the JSON object the model
    wrote (an empty input is ``{}``). Anything else (not JSON, or JSON but not an object: a
    tool's input is an object, and a client sending it back would be refused) is kept,
    visibly, as ``{"_unparsed_arguments": <the text>}``, never dropped. So is what Python's
    json reads but JSON has not (NaN, Infinity, a number beyond a double, a lone UTF-16
    surrogate escape) or cannot read at all (nested too deeply): the HTTP front could not
    serve it as JSON, nor a client send it back."""
    call_id, name = wellformed(call_id), wellformed(name)
    raw = wellformed(arguments).strip() or "{}"
    if strict_json.object_or_none(raw) is None:
        raw = json.dumps({"_unparsed_arguments": raw})
    return model_pb2.GenerateChunk(
        block=pb.ContentBlock(tool_use=pb.ToolUse(id=call_id, name=name, input_json=raw))
    )


def contract_stop_reason(
    backend: str,
    reason: str,
    known: Mapping[str, str],
    logged: set[tuple[str, str]] = _unknown_logged,
) -> str:
    """A provider's stop reason in the contract's words (``known``); one it does not know
    (an engine's own, a new one) is ``max_tokens``: nothing says the answer is whole (vLLM
    and SGLang end an aborted request with "abort"), so the client is told it may be cut and
    the semantic cache, which stores ``end_turn`` answers only, does not keep it. Logged
    once per value (at most ``MAX_UNKNOWN_LOGGED`` of them: an engine cannot flood the log)."""
    mapped = known.get(reason)
    if mapped is not None:
        return mapped
    if (backend, reason) not in logged and len(logged) < MAX_UNKNOWN_LOGGED:
        logged.add((backend, reason))
        log.warning(
            "%s answered with the unknown stop reason %r: passed on as max_tokens, the answer"
            " may be cut (logged once)",
            backend,
            reason[:64],
        )
    return UNKNOWN_STOP_REASON
