"""A request the Gateway takes fits every message the stack passes it on in, with
CACHEMESH_MAX_MESSAGE_BYTES lowered (a deployment capping memory).

ROUTER_MAX_REQUEST_BYTES defaulted to the message limit itself: the router took a request as
large as the limit, then passed it to the model with its prompt's KV block hashes (2 bytes a
token) in a message over that limit, and every request above ~73% of it failed
RESOURCE_EXHAUSTED with gRPC's "Sent message larger than max" from inside the stack. Now the
default (and the most start-up allows) is half the message limit, and a model call the hashes
would take over the limit goes without them (the replica counts the prompt itself): a request
just under the Gateway's limit is answered, of prose or of text of one token every 1.3 bytes,
and billed by prefix-cache (not estimated: its Plan and commits went through too). A prompt of
more than a token a byte (hundreds of tools of a few bytes each) made Plan's answer, its hashes
alone, over the limit: prefix-cache now answers without them, and the request is answered.
"""

from __future__ import annotations

import json
import random
import string
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachemesh import CachemeshError, Client, RequestTooLargeError, build_request
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from services.common.env import Env
from services.router.settings import max_request_bytes
from services.tools.stack import Stack
from services.tools.stack.otlp_sink import OtlpSink
from services.tools.stack.service_table import SERVICES
from tests.integration.harness import started_stack

pytestmark = pytest.mark.integration

MESSAGE_BYTES = 256 * 1024
# the router's request limit as it starts with the stack's settings (ROUTER_MAX_REQUEST_BYTES
# unset)
REQUEST_BYTES = max_request_bytes(
    Env({"CACHEMESH_MAX_MESSAGE_BYTES": str(MESSAGE_BYTES)}), MESSAGE_BYTES
)
PROSE = ("the", "quarterly", "report", "shows", "revenue", "growth", "of", "percent", "in", "asia")


Served = tuple[Client, Stack, OtlpSink]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    run_dir = tmp_path_factory.mktemp("lowered-messages")
    # .env pins the HTTP front's body limit at 1 MiB, which it refuses over the message limit
    lowered = {
        "CACHEMESH_MAX_MESSAGE_BYTES": str(MESSAGE_BYTES),
        "HTTP_FRONT_MAX_BODY_BYTES": str(REQUEST_BYTES),
    }
    with started_stack(run_dir, lowered) as (stack, sink):
        keys = read_env_file(run_dir / "demo-keys.env")
        with Client(
            stack.router_address, api_key=keys["CACHEMESH_KEY_A"], max_attempts=1, timeout_s=120
        ) as answering:
            yield answering, stack, sink


@pytest.fixture(scope="module")
def client(served: Served) -> Client:
    return served[0]


def _near_the_limit(words: list[str]) -> pb.CompleteRequest:
    """A sim-large request of ``words`` just under the Gateway's request limit."""
    text, size = "", 0
    for word in words:
        size += len(word) + 1
        if size > REQUEST_BYTES - 128:
            break
        text += word + " "
    request = build_request(text, model="sim-large", max_tokens=16, request_id=uuid.uuid4().hex)
    assert REQUEST_BYTES - 512 < request.ByteSize() <= REQUEST_BYTES
    return request


def _answered(client: Client, request: pb.CompleteRequest) -> pb.CompleteResponse:
    try:
        reply = client.complete(request)
    except CachemeshError as error:  # gRPC's own text from inside the stack, before
        pytest.fail(f"a {request.ByteSize()} B request the Gateway takes was refused: {error}")
    assert reply.served_by != pb.LAYER_SEMANTIC_CACHE and reply.content
    assert not reply.cost.estimated  # prefix-cache's Plan and commits carried it too
    return reply


def test_a_request_of_prose_just_under_the_gateways_limit_is_answered(client: Client) -> None:
    words = [
        f"{PROSE[i % len(PROSE)]}{i}" if i % 50 == 0 else PROSE[i % len(PROSE)]
        for i in range(REQUEST_BYTES)
    ]
    _answered(client, _near_the_limit(words))


def test_a_dense_request_just_under_the_gateways_limit_is_answered(client: Client) -> None:
    # random letters, digits and punctuation: ~0.76 tokens a byte, whose KV block hashes
    # (1.5 bytes for each of its bytes) and itself are over the message limit together
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + string.punctuation
    words = ["".join(rng.choice(alphabet) for _ in range(15)) for _ in range(REQUEST_BYTES // 16)]
    reply = _answered(client, _near_the_limit(words))
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens > REQUEST_BYTES // 2


def test_a_request_of_many_small_tools_just_under_the_gateways_limit_is_answered(
    client: Client,
) -> None:
    # each tool a few bytes on the wire and ~9 tokens in the canonical prompt ("<tool
    # name=..>"): ~1.3 tokens a byte, whose KV block hashes alone are over the message limit
    request = build_request(
        "Which tool fits?", model="sim-large", max_tokens=16, request_id=uuid.uuid4().hex
    )
    # a repeated field's wire size is the sum of its entries': each tool's counted alone (the
    # whole request's ByteSize after each of ~15,000 tools took 3.4 s of CPU)
    size = request.ByteSize()
    for i in range(REQUEST_BYTES):
        tool = request.tools.add(name=f"t{i:x}")
        size += pb.CompleteRequest(tools=[tool]).ByteSize()
        if size > REQUEST_BYTES - 16:
            del request.tools[-1]
            break
    assert REQUEST_BYTES - 512 < request.ByteSize() <= REQUEST_BYTES
    reply = _answered(client, request)
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens > REQUEST_BYTES


def _errors(stack: Stack, code: str) -> float:
    address = stack.metrics_addresses["router"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "cachemesh_router_errors_total" and sample.labels.get("code") == code
    )


def test_a_request_just_over_the_gateways_limit_gets_the_routers_refusal(served: Served) -> None:
    # gRPC's transport refused it, at the limit itself, before any code of the router ran:
    # "Received message larger than max (131073 vs. 131072)", naming no setting, in no metric,
    # no access-log line and no span
    client, stack, sink = served
    before = _errors(stack, "RESOURCE_EXHAUSTED")
    request_id = uuid.uuid4().hex
    request = build_request("x", model="sim-large", max_tokens=16, request_id=request_id)
    block = request.messages[-1].content[0]
    while (short := REQUEST_BYTES + 1 - request.ByteSize()) != 0:  # the lengths' varints grow
        block.text = "x" * (len(block.text) + short)
    size = request.ByteSize()
    assert size == REQUEST_BYTES + 1
    with pytest.raises(RequestTooLargeError) as refused:  # not a RateLimitError
        client.complete(request)
    assert refused.value.reason == "REQUEST_TOO_LARGE"
    message = str(refused.value)
    assert f"{size:,} bytes" in message and f"limit of {REQUEST_BYTES:,} bytes" in message
    assert "ROUTER_MAX_REQUEST_BYTES" in message and "larger than max" not in message
    # counted, with its access-log line and its span, as every refused call (the refusal
    # reaches the caller before the servicer's end has counted it: looked at until it comes)
    counted_by = time.monotonic() + 10
    while _errors(stack, "RESOURCE_EXHAUSTED") == before and time.monotonic() < counted_by:
        time.sleep(0.05)
    assert _errors(stack, "RESOURCE_EXHAUSTED") == before + 1
    router = next(spec for spec in SERVICES if spec.name == "router")
    deadline = time.monotonic() + 30
    line: dict[str, object] | None = None
    spans = []
    while time.monotonic() < deadline:
        text = stack.log_path(router).read_text()
        lines = [json.loads(row) for row in text.splitlines() if request_id in row]
        access = [x for x in lines if x.get("logger") == "cachemesh.access"]
        line = access[0] if access else None
        spans = [
            span
            for span in sink.all_spans()
            if span.service == "router" and span.attributes.get("cachemesh.request_bytes") == size
        ]
        if line is not None and spans:
            break
        time.sleep(0.1)
    assert line is not None and line["status"] == "RESOURCE_EXHAUSTED"
    (span,) = spans
    assert span.name == "/cachemesh.v1.Gateway/Complete"
    assert span.attributes["rpc.grpc.status_code"] == 8  # RESOURCE_EXHAUSTED
