"""``Code`` (the cores' status codes) to and from ``grpc.StatusCode``, for the servicers."""

from __future__ import annotations

import grpc

from services.common.errors import Code


def grpc_code(code: Code) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]


def code_of(status: grpc.StatusCode) -> Code:
    return Code[status.name]
