"""The Gateway's ``tool_choice`` read one way by every service: the mode it means (unset and
``MODE_UNSPECIFIED`` are ``auto``, as before the field) and its canonical form, which the
semantic cache's scope and the prompt-cache accounting take so that a request under one
choice never meets what another choice made."""

from __future__ import annotations

from typing import Literal

from cachemesh.v1 import gateway_pb2 as pb
from services.common.errors import shown

Mode = Literal["auto", "none", "any", "tool"]

_MODES: dict[int, Mode] = {
    pb.ToolChoice.MODE_UNSPECIFIED: "auto",
    pb.ToolChoice.MODE_AUTO: "auto",
    pb.ToolChoice.MODE_NONE: "none",
    pb.ToolChoice.MODE_ANY: "any",
    pb.ToolChoice.MODE_TOOL: "tool",
}


def mode_of(request: pb.CompleteRequest) -> Mode:
    """The request's mode; an enum value this build does not know is refused by the router
    (``validate``) before anything reads it, so here it reads as ``auto`` only in a test."""
    return _MODES.get(request.tool_choice.mode, "auto")


def sent_mode(request: pb.CompleteRequest) -> Mode:
    """The mode as the providers are sent it: a request without tools is sent no tool_choice
    (OpenAI refuses one without tools: "'tool_choice' is only allowed when 'tools' are
    specified"), so NONE without tools is ``auto``, which calls no tool either (the router
    refuses ANY and TOOL without tools)."""
    return mode_of(request) if request.tools else "auto"


def canonical(request: pb.CompleteRequest) -> str:
    """ "" for what is sent as ``auto`` (every scope and digest made before the field stays the
    one it was), else ``none``, ``any`` or ``tool:<name>``."""
    mode = sent_mode(request)
    if mode == "auto":
        return ""
    if mode == "tool":
        return f"tool:{request.tool_choice.name}"
    return mode


def problem(request: pb.CompleteRequest) -> str | None:
    """Why the request's tool_choice cannot be sent, naming the field; None when it can."""
    choice = request.tool_choice
    if choice.mode not in _MODES:
        return (
            f"tool_choice.mode: {choice.mode} is not a mode this router knows (AUTO, NONE, ANY, "
            "TOOL); send one of them"
        )
    mode = _MODES[choice.mode]
    if mode != "tool":
        if choice.name:
            return (
                f"tool_choice.name: a name is taken only with mode TOOL, got mode "
                f"{mode.upper()}; omit the name or send mode TOOL"
            )
        if mode == "any" and not request.tools:
            return "tool_choice.mode: ANY needs tools: send tools, or omit tool_choice"
        return None
    if not choice.name:
        return "tool_choice.name: mode TOOL needs the name of one of the request's tools"
    names = [tool.name for tool in request.tools]
    if choice.name not in names:
        offered = ", ".join(shown(n) for n in names[:10]) or "none"
        return (
            f"tool_choice.name: {shown(choice.name)} is not among the request's tools (offered: "
            f"{offered}); name one of them, or send the tool in tools"
        )
    return None
