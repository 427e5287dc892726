"""A parameter of the wrong type or range, given to the Python client as a user might (the key
read with ``os.environ.get`` of an unset variable, a question as bytes or an int, text decoded
with ``surrogateescape``, a max_tokens too large for its int32 field, a string where a request
goes): a TypeError or ValueError naming the parameter, before anything is sent, never showing
a secret or the text. They were AttributeErrors ("'NoneType' object has no attribute 'strip'",
"'str' object has no attribute 'request_id'") or protobuf's errors naming nothing ("bad
argument type for built-in operation", "Value out of range: 1099511627776", "'utf-8' codec
can't encode character '\\udcff'")."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cachemesh import AsyncClient, Client, build_request
from cachemesh.admin import AdminClient
from cachemesh.v1 import gateway_pb2 as pb

SECRET = "cm_live_0123456789abcdef"
TARGET = "127.0.0.1:1"  # nothing is sent: each refusal comes before a call


@pytest.mark.parametrize("make", [Client, AsyncClient])
def test_an_api_key_of_none_names_the_parameter(make: Any) -> None:
    with pytest.raises(TypeError, match=r"^api_key is None, not a str: is the variable"):
        make(TARGET, api_key=None)


def test_an_api_key_of_bytes_names_its_type_not_its_value() -> None:
    with pytest.raises(TypeError, match=r"^api_key must be a str, got bytes") as caught:
        Client(TARGET, api_key=SECRET.encode())  # type: ignore[arg-type]
    assert SECRET not in str(caught.value)


def test_an_admin_token_of_none_names_the_parameter() -> None:
    with pytest.raises(TypeError, match=r"^admin_token is None"):
        AdminClient(TARGET, admin_token=None)  # type: ignore[arg-type]


def test_a_target_that_is_not_a_str_names_the_parameter() -> None:
    with pytest.raises(TypeError, match=r"^target must be a str, 'host:port', got int"):
        Client(50051, api_key=SECRET)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "error", "said"),
    [
        ({"question": 123}, TypeError, r"^question must be a str, got int$"),
        ({"question": b"hi"}, TypeError, r"^question must be a str, got bytes$"),
        ({"question": "q", "system": b"s"}, TypeError, r"^system must be a str, got bytes$"),
        ({"question": "q", "model": None}, TypeError, r"^model must be a str, got NoneType$"),
        ({"question": "q", "max_tokens": "64"}, TypeError, r"^max_tokens must be an int, got str"),
        ({"question": "q", "max_tokens": True}, TypeError, r"^max_tokens must be an int, got bool"),
        ({"question": "q", "max_tokens": 2**40}, ValueError, r"^max_tokens must be an int32"),
        ({"question": "q", "threshold": "0.9"}, TypeError, r"^threshold must be a number"),
        ({"question": "q", "temperature": "1"}, TypeError, r"^temperature must be a number"),
        ({"question": "q", "namespace": 7}, TypeError, r"^namespace must be a str, got int$"),
        ({"question": "q", "request_id": 7}, TypeError, r"^request_id must be a str, got int$"),
    ],
)
def test_a_request_parameter_of_the_wrong_type_or_range_is_named(
    given: dict[str, Any], error: type[Exception], said: str
) -> None:
    with pytest.raises(error, match=said):
        build_request(**given)


@pytest.mark.parametrize("parameter", ["question", "system", "model", "namespace", "request_id"])
def test_text_that_is_not_utf8_names_the_parameter_never_the_text(parameter: str) -> None:
    private = "my account number 12345 " + b"\xff".decode("utf-8", "surrogateescape")
    given = {"question": "q", parameter: private}
    with pytest.raises(ValueError, match=rf"^{parameter} is not valid UTF-8 text") as caught:
        build_request(**given)  # type: ignore[arg-type]
    assert "12345" not in str(caught.value) and not isinstance(caught.value, UnicodeError)


def test_none_for_an_optional_text_is_unset_as_before() -> None:
    """``request_id=os.environ.get(...)`` of an unset variable: protobuf took None as unset
    before the type checks, and still does for the two optional texts (V2)."""
    request = build_request("q", namespace=None, request_id=None)  # type: ignore[arg-type]
    assert (request.cache.namespace, request.request_id) == ("", "")


def test_values_the_gateway_checks_still_reach_it() -> None:
    """0 and a negative max_tokens, a threshold outside [0, 1]: the Gateway's
    InvalidRequestError names the field (a local refusal would move them out of the tree)."""
    request = build_request("q", max_tokens=0, threshold=5, temperature=1)
    assert (request.max_tokens, request.cache.threshold, request.temperature) == (0, 5.0, 1.0)
    assert build_request("q", max_tokens=-1).max_tokens == -1
    assert build_request("q", max_tokens=2**31 - 1).max_tokens == 2**31 - 1


def test_a_str_where_a_request_goes_says_how_to_make_one() -> None:
    with Client(TARGET, api_key=SECRET) as client:
        for call in (client.complete, client.stream):
            with pytest.raises(TypeError, match=r"^request must be a cachemesh.v1 CompleteRequest"):
                call("How do I reset my password?")  # type: ignore[arg-type]


def test_the_async_client_refuses_a_str_request_as_clearly() -> None:
    async def run() -> None:
        async with AsyncClient(TARGET, api_key=SECRET) as client:
            with pytest.raises(TypeError, match=r"^request must be a cachemesh.v1 CompleteRequest"):
                await client.complete("hi")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match=r"^request must be a cachemesh.v1 CompleteRequest"):
                client.stream("hi")  # type: ignore[arg-type]

    asyncio.run(run())


def test_a_request_built_directly_is_taken_as_before() -> None:
    request = pb.CompleteRequest(model="auto", max_tokens=8, request_id="r1")
    with Client(TARGET, api_key=SECRET) as client:
        assert client.stream(request) is not None  # no call starts until the first read
