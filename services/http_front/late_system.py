"""An OpenAI system or developer message after the conversation's last assistant message, with
no user or tool message after it (AutoGen's GroupChat asking who speaks next after an agent's
turn: [user, assistant "Day 1", system "select the next speaker"]).

The front hoists a late system message into the Gateway's system text (``openai_api``), which
would leave that assistant message last: the Gateway's prefill, whose text the answer
continues. The caller sent no prefill: a Claude row continued "Day 1" rather than answering
the system message, and a gpt-4o row refused "a last assistant message (a prefill ...)",
naming a message the caller did not mean so. Such a request is refused here, naming the system
message and why; OpenAI's model reads a system message where it stands, which the Gateway's
messages cannot say."""

from __future__ import annotations

from typing import Any

from services.http_front.errors import ApiError, invalid

_SYSTEM = ("system", "developer")
_CALLERS_TURN = ("user", "tool")


def late_system_refusal(raw_messages: list[Any]) -> ApiError | None:
    """The 400 for ``raw_messages`` (already parsed: each an object with a known role) whose
    hoisted system text would leave an assistant message last, else None."""
    roles = [raw.get("role") if isinstance(raw, dict) else None for raw in raw_messages]
    last_assistant = max((i for i, role in enumerate(roles) if role == "assistant"), default=-1)
    if last_assistant < 0 or any(role in _CALLERS_TURN for role in roles[last_assistant:]):
        return None
    late = next((i for i, role in enumerate(roles) if i > last_assistant and role in _SYSTEM), None)
    if late is None:
        return None  # a last assistant message the caller sent as such: the Gateway's prefill
    return invalid(
        f"messages[{late}]: a {roles[late]} message after the last assistant message "
        f"(messages[{last_assistant}]) with no user message after it is not supported by "
        "cachemesh: system and developer messages join the system prompt, which would leave "
        "that assistant message last, read as a prefill the answer continues; add a user "
        "message after the assistant's (e.g. the instruction as a user message), or send the "
        "system message before it",
        f"messages[{late}]",
    )
