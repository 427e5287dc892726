"""The one error a service raises for a request it refuses: a gRPC status and a message."""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request refused with ``code``; ``message`` names the field and what to do."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
