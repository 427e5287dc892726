"""tau-bench airline conversations replayed turn by turn, with their system prompt and tools.

Each trajectory (``agent/tau_bench/airline_gpt-4o_trajectories.jsonl``) becomes one request per
assistant turn: the system prompt and the 14 tools (a breakpoint after each, as an agent caching
its prefix would mark them), and the conversation so far with a breakpoint on its last block.
The recorded assistant turns (text and tool calls) and tool results form the history, so each
request is what the agent sent at that point of the real conversation.
"""

from __future__ import annotations

import json
import random
from collections import deque
from pathlib import Path

from cachemesh.loadtest.workloads.base import (
    TENANT_A,
    DataInvalid,
    Item,
    data_file,
    malformed,
    nonempty,
    read_jsonl,
    tool_from_schema,
)
from cachemesh.v1 import gateway_pb2 as pb

TRAJECTORIES = "agent/tau_bench/airline_gpt-4o_trajectories.jsonl"
TOOLS = "agent/tau_bench/airline_tools.json"


def load_tools(path: Path) -> list[pb.Tool]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataInvalid(f"{path}: not a JSON list of tools ({exc})") from None
    tools = []
    try:
        for entry in entries:
            fn = entry["function"]
            tools.append(tool_from_schema(fn["name"], fn.get("description", ""), fn["parameters"]))
    except (KeyError, TypeError, AttributeError) as exc:
        raise malformed(path, exc) from None
    nonempty(path, tools, "tool")[-1].cache_control.SetInParent()
    return tools


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) and value.strip() not in ("", "None") else ""


class CallIds:
    """A conversation's recorded tool call ids made unique: tau-bench's trajectories reuse
    ids within a conversation (278 of the 2,454 requests of 200 conversations had one twice),
    and a request whose tool_use ids repeat is refused (INVALID_ARGUMENT: "... is used
    twice"). A repeated id's next use is ``<id>-<place>`` (another suffix if that is taken
    too); a tool result answers its id's oldest unanswered use in the latest message with
    calls (one message may call the same recorded id twice, then answer it twice), or its
    latest use when every such use is answered. The agent workload and ``make
    bench-prefix``'s replay convert with this one rule."""

    def __init__(self) -> None:
        self._latest: dict[str, str] = {}  # recorded id -> the unique id of its last use
        # recorded id -> its uses not answered yet, in the message ``self._place`` only: a
        # result answers a call of the message just before it, never an older one
        self._unanswered: dict[str, deque[str]] = {}
        self._place: int | None = None
        self._given: set[str] = set()

    def call(self, recorded: str, place: int) -> str:
        """The id of a call recorded as ``recorded`` in the conversation's message ``place``."""
        unique, n = recorded, 0
        while unique in self._given:
            unique = f"{recorded}-{place}" + (f"-{n}" if n else "")
            n += 1
        self._given.add(unique)
        self._latest[recorded] = unique
        if place != self._place:
            self._place, self._unanswered = place, {}
        self._unanswered.setdefault(recorded, deque()).append(unique)
        return unique

    def result(self, recorded: str) -> str:
        """The id a tool result recorded as answering ``recorded`` answers."""
        waiting = self._unanswered.get(recorded)
        if waiting:
            return waiting.popleft()
        return self._latest.get(recorded, recorded)


def _messages(raw: list[dict[str, object]]) -> list[pb.Message]:
    """tau-bench (OpenAI-style) messages to Gateway messages; consecutive tool results merge."""
    out: list[pb.Message] = []
    ids = CallIds()
    for message in raw:
        role = message["role"]
        if role == "user":
            text = _text(message.get("content")) or "(no text)"
            out.append(pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)]))
        elif role == "assistant":
            blocks = [pb.ContentBlock(text=t) for t in [_text(message.get("content"))] if t]
            for call in message.get("tool_calls") or []:  # type: ignore[attr-defined]
                fn = call["function"]
                unique = ids.call(str(call["id"]), len(out))  # recorded ids repeat
                use = pb.ToolUse(id=unique, name=fn["name"], input_json=fn["arguments"])
                blocks.append(pb.ContentBlock(tool_use=use))
            out.append(
                pb.Message(role=pb.ROLE_ASSISTANT, content=blocks or [pb.ContentBlock(text="OK.")])
            )
        elif role == "tool":
            result = pb.ToolResult(
                tool_use_id=ids.result(str(message["tool_call_id"])),
                content=str(message.get("content", "")),
            )
            add_tool_result(out, result)
    return out


def add_tool_result(messages: list[pb.Message], result: pb.ToolResult) -> None:
    """Append ``result`` to ``messages``: into the last message when that one is a user's
    holding tool results (consecutive results, e.g. of parallel calls, are one user message:
    every tool_use needs its tool_result in the message right after it, or the router refuses
    the request), else as a new user message. The agent workload and ``make bench-prefix``'s
    replay convert with this one rule."""
    block = pb.ContentBlock(tool_result=result)
    last = messages[-1] if messages else None
    if last is not None and last.role == pb.ROLE_USER and last.content[-1].HasField("tool_result"):
        last.content.append(block)
    else:
        messages.append(pb.Message(role=pb.ROLE_USER, content=[block]))


def conversation_requests(
    row: dict[str, object], tools: list[pb.Tool], model: str, max_tokens: int, namespace: str
) -> list[pb.CompleteRequest]:
    raw: list[dict[str, object]] = row["messages"]  # type: ignore[assignment]
    system = pb.ContentBlock(text=str(raw[0]["content"]))
    system.cache_control.SetInParent()
    messages = _messages(raw[1:])
    requests = []
    for k in range(1, len(messages)):
        if messages[k].role != pb.ROLE_ASSISTANT or messages[k - 1].role != pb.ROLE_USER:
            continue
        history = [pb.Message() for _ in range(k)]
        for copy, original in zip(history, messages[:k], strict=True):
            copy.CopyFrom(original)
        history[-1].content[-1].cache_control.SetInParent()
        requests.append(
            pb.CompleteRequest(
                model=model,
                max_tokens=max_tokens,
                tools=tools,
                system=[system],
                messages=history,
                cache=pb.CacheOptions(namespace=namespace),
            )
        )
    return requests


class TauAgent:
    """Conversations in a seeded order, each replayed turn by turn, then the next; each turn
    names its conversation (``Item.session``), so the runner sends a turn only after the
    previous turn's answer, as the agent did."""

    name = "agent"

    def __init__(
        self, data_dir: Path, seed: int, namespace: str, model: str = "sim-large",
        max_tokens: int = 512,
    ) -> None:  # fmt: skip
        self._path = data_file(data_dir, TRAJECTORIES)
        # each conversation with its line in the file (a malformed one is named by it)
        self._rows = list(enumerate(read_jsonl(self._path), 1))
        self._tools = load_tools(data_file(data_dir, TOOLS))
        random.Random(seed).shuffle(self._rows)
        self._seed, self._namespace, self._model, self._max_tokens = (
            seed,
            namespace,
            model,
            max_tokens,
        )
        self._conversation = 0
        self._pending: list[pb.CompleteRequest] = []

    def params(self) -> dict[str, object]:
        return {
            "seed": self._seed, "source": TRAJECTORIES, "conversations": len(self._rows),
            "model": self._model, "max_tokens": self._max_tokens,
        }  # fmt: skip

    def labels(self) -> dict[frozenset[str], int]:
        return {}

    def next_item(self) -> Item:
        for _ in range(len(self._rows)):  # a whole pass with no request: none will come
            if self._pending:
                break
            number, row = self._rows[self._conversation % len(self._rows)]
            self._conversation += 1
            try:
                self._pending = conversation_requests(
                    row, self._tools, self._model, self._max_tokens, self._namespace
                )
            except (KeyError, TypeError, AttributeError, IndexError) as exc:
                raise malformed(self._path, exc, f", conversation {number}") from None
        if not self._pending:
            raise DataInvalid(
                f"{self._path}: no conversation has an assistant turn after a user's (nothing "
                "to send): check --data-dir"
            )
        session = f"{self.name}-{self._conversation}"  # the conversation's place in the run
        return Item(self.name, TENANT_A, self._pending.pop(0), session=session)
