"""cachemesh client: typed access to the cachemesh Gateway over gRPC.

>>> from cachemesh import Client
>>> with Client("127.0.0.1:50051", api_key="cm_...") as client:
...     answer = client.ask("How do I reset my password?")
"""

from cachemesh._client import AsyncClient, Client
from cachemesh._errors import (
    AuthenticationError,
    CachemeshError,
    InvalidRequestError,
    RateLimitError,
    UnavailableError,
)
from cachemesh._requests import answer_text, build_request, user_message

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "CachemeshError",
    "Client",
    "InvalidRequestError",
    "RateLimitError",
    "UnavailableError",
    "answer_text",
    "build_request",
    "user_message",
]
