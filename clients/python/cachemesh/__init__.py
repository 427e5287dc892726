"""cachemesh client: typed access to the cachemesh Gateway over gRPC.

>>> from cachemesh import Client
>>> with Client("127.0.0.1:50051", api_key="cm_...") as client:
...     answer = client.ask("How do I reset my password?")

The names below load on first use, so importing the generated messages (``cachemesh.v1``)
alone does not import gRPC: the services' cores use the messages without the transport.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cachemesh._channel import channel_options
    from cachemesh._client import AsyncChunkStream, AsyncClient, ChunkStream, Client
    from cachemesh._errors import (
        AuthenticationError,
        CachemeshError,
        DeadlineExceededError,
        InvalidRequestError,
        MessageTooLargeError,
        NotFoundError,
        RateLimitError,
        RequestTooLargeError,
        UnavailableError,
    )
    from cachemesh._requests import answer_text, assistant_message, build_request, user_message
    from cachemesh._tls import Tls

_HOMES = {
    "AsyncChunkStream": "cachemesh._client",
    "AsyncClient": "cachemesh._client",
    "ChunkStream": "cachemesh._client",
    "Client": "cachemesh._client",
    "AuthenticationError": "cachemesh._errors",
    "CachemeshError": "cachemesh._errors",
    "DeadlineExceededError": "cachemesh._errors",
    "InvalidRequestError": "cachemesh._errors",
    "MessageTooLargeError": "cachemesh._errors",
    "NotFoundError": "cachemesh._errors",
    "RateLimitError": "cachemesh._errors",
    "RequestTooLargeError": "cachemesh._errors",
    "Tls": "cachemesh._tls",
    "UnavailableError": "cachemesh._errors",
    "channel_options": "cachemesh._channel",
    "answer_text": "cachemesh._requests",
    "assistant_message": "cachemesh._requests",
    "build_request": "cachemesh._requests",
    "user_message": "cachemesh._requests",
}

__all__ = [
    "AsyncChunkStream",
    "AsyncClient",
    "AuthenticationError",
    "CachemeshError",
    "ChunkStream",
    "Client",
    "DeadlineExceededError",
    "InvalidRequestError",
    "MessageTooLargeError",
    "NotFoundError",
    "RateLimitError",
    "RequestTooLargeError",
    "Tls",
    "UnavailableError",
    "answer_text",
    "assistant_message",
    "build_request",
    "channel_options",
    "user_message",
]


if not TYPE_CHECKING:  # a type checker reads the imports above: a misspelt name is an error

    def __getattr__(name: str) -> Any:
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module 'cachemesh' has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
