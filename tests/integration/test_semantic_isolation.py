"""Adversarial scope probes on real processes: no L1 entry is ever served across a scope.

One request is answered and stored; then the same question, word for word (the strongest
temptation: the exact-match path) and as a paraphrase, is sent with exactly one part of the
scope changed: tenant, namespace, system prompt (even by one character), tool set (order, a
description, a parameter schema, one more tool, none), earlier turns (one word, or none),
model, sampling (temperature). None may be served from the semantic cache. The unchanged
request, sent last, is served (so the probes could have hit).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import pytest

from cachemesh import Client, build_request
from cachemesh.demo import workload
from cachemesh.v1 import gateway_pb2 as pb

pytestmark = pytest.mark.integration

QUESTION = "How do I change the email address on my account?"
PARAPHRASE = "How can I change my account's email address?"
SYSTEM = "You are the support assistant of Northwind Air."
HISTORY = (
    pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hi, I have a question.")]),
    pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(text="Sure, go ahead.")]),
)
TOOLS = tuple(workload.TOOLS[:2])


def base(question: str, ns: str, **changes: object) -> pb.CompleteRequest:
    options: dict[str, object] = {
        "model": "sim-small",
        "system": SYSTEM,
        "history": HISTORY,
        "namespace": ns,
        "temperature": 0.0,
    }
    options.update(changes)
    request = build_request(question, max_tokens=120, **options)  # type: ignore[arg-type]
    request.tools.extend(TOOLS)
    return request


def reorder_tools(request: pb.CompleteRequest) -> None:
    tools = list(request.tools)
    del request.tools[:]
    request.tools.extend(reversed(tools))


def redescribe_tool(request: pb.CompleteRequest) -> None:
    request.tools[0].description += " "


def reschema_tool(request: pb.CompleteRequest) -> None:
    schema = json.loads(request.tools[0].input_schema_json)
    schema["properties"]["verbose"] = {"type": "boolean"}
    request.tools[0].input_schema_json = json.dumps(schema)


def add_tool(request: pb.CompleteRequest) -> None:
    request.tools.add().CopyFrom(workload.TOOLS[len(TOOLS)])


def drop_tools(request: pb.CompleteRequest) -> None:
    del request.tools[:]


Probe = tuple[str, dict[str, object], Callable[[pb.CompleteRequest], None] | None]
PROBES: list[Probe] = [
    ("namespace", {"namespace": "other"}, None),
    ("system prompt", {"system": SYSTEM + " "}, None),
    ("another system prompt", {"system": "You are the support assistant of a bank."}, None),
    ("no system prompt", {"system": None}, None),
    ("tool order", {}, reorder_tools),
    ("a tool's description", {}, redescribe_tool),
    ("a tool's parameter schema", {}, reschema_tool),
    ("one more tool", {}, add_tool),
    ("no tools", {}, drop_tools),
    ("earlier turns", {"history": ()}, None),
    (
        "one word of an earlier turn",
        {
            "history": (
                HISTORY[0],
                pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(text="Sure, go on.")]),
            )
        },
        None,
    ),
    ("model", {"model": "sim-large"}, None),
    ("model auto", {"model": "auto"}, None),
    ("temperature", {"temperature": 0.3}, None),
    ("temperature unset", {"temperature": None}, None),
]


def test_no_entry_is_served_across_any_part_of_the_scope(
    client_a: Client, client_b: Client
) -> None:
    ns = uuid.uuid4().hex[:12]
    stored = client_a.complete(base(QUESTION, ns))
    assert stored.served_by != pb.LAYER_SEMANTIC_CACHE
    leaks: list[str] = []
    for question in (QUESTION, PARAPHRASE):
        for client, who in ((client_b, "tenant b"), (client_a, "tenant a")):
            for name, changes, edit in PROBES if who == "tenant a" else [("tenant", {}, None)]:
                request = base(question, ns, **changes)
                if edit is not None:
                    edit(request)
                request.cache.semantic = pb.SEMANTIC_MODE_NO_STORE  # probes leave no entries
                if client.complete(request).served_by == pb.LAYER_SEMANTIC_CACHE:
                    leaks.append(f"{name}: {question!r}")
    assert leaks == []
    for question in (QUESTION, PARAPHRASE):
        again = client_a.complete(base(question, ns))
        assert again.served_by == pb.LAYER_SEMANTIC_CACHE, question
        assert again.semantic.exact == (question == QUESTION)


def test_concurrent_identical_misses_share_one_model_call(client_a: Client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ns = uuid.uuid4().hex[:12]
    request = build_request("What is the baggage allowance on a domestic flight?", namespace=ns)
    request.max_tokens = 60
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(client_a.complete, [request] * 4))
    layers = sorted(r.served_by for r in responses)
    assert layers.count(pb.LAYER_SEMANTIC_CACHE) == 3, layers  # one model call, shared
    texts = {"".join(b.text for b in r.content) for r in responses}
    assert len(texts) == 1  # the same answer for all four
