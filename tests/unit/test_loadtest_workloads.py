"""The workloads build requests the Gateway accepts, with the shapes they promise."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cachemesh.loadtest.workloads import NAMES, DataInvalid, WorkloadSpec, build, normalise
from cachemesh.loadtest.workloads.bfcl import FLOAT_NOTE, JSON_SCHEMA_TYPES, QUERIES, json_schema
from cachemesh.loadtest.workloads.mix import parse_weights
from cachemesh.v1 import gateway_pb2 as pb
from services.common.models import ModelTable, load_model_table
from services.router.validation import validate_request
from tests.public_data import data_dir

TABLE = load_model_table()


def _spec(name: str, **kw: object) -> WorkloadSpec:
    return WorkloadSpec(name, 3, "ns", data_dir(), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_every_request_passes_the_gateways_validation(name: str) -> None:
    workload = build(_spec(name))
    for _ in range(300):
        item = workload.next_item()
        validate_request(item.request, TABLE, set(TABLE.models))
        assert item.request.cache.namespace.startswith("ns")


# a hosted deployment: OpenAI's and Anthropic's tool-name rules apply (the simulator's do not)
HOSTED = ModelTable(
    models=TABLE.models, auto={"small": "gpt-4-1-mini", "large": "claude-sonnet-4-5"}
)


@pytest.mark.parametrize("model", ["gpt-4-1", "claude-sonnet-4-5", "auto"])
def test_every_bfcl_row_passes_the_gateways_validation_for_a_hosted_row(model: str) -> None:
    """171 of the 1,053 live_multiple rows name a function with dots, which the hosted
    providers refuse (43 of 2,000 requests of the default mix were refused): sent as BFCL's
    harness sends them to those APIs, ``.`` as ``_``."""
    workload = build(_spec("tools"))
    rows = int(str(workload.params()["queries"]))
    dotted = 0
    for _ in range(rows):  # each row once (a seeded order of all of them)
        request = workload.next_item().request
        request.model = model
        validate_request(request, HOSTED, set(TABLE.models))
        names = [tool.name for tool in request.tools]
        dotted += any("_" in name for name in names)
        assert not any("." in name for name in names)
    assert rows == 1053 and dotted > 0


def _types(schema: object, seen: Counter[str], property_: bool = False) -> Counter[str]:
    """Every ``type`` named in ``schema`` and the schemas nested in it (``properties``,
    ``items``); a schema naming none is counted as ``(none)``, a property with BFCL's float
    format and note as ``float property``."""
    if isinstance(schema, dict):
        seen[str(schema.get("type", "(none)"))] += 1
        if property_ and schema.get("format") == "float":
            assert str(schema.get("description", "")).endswith(FLOAT_NOTE), schema
            seen["float property"] += 1
        for sub in (schema.get("properties") or {}).values():
            _types(sub, seen, property_=True)
        if isinstance(schema.get("items"), dict):
            _types(schema["items"], seen)
    return seen


def _float_properties(schema: object) -> int:
    """The members of ``properties`` maps in ``schema`` whose type is BFCL's ``float``."""
    if not isinstance(schema, dict):
        return 0
    members = list((schema.get("properties") or {}).values())
    here = sum(1 for sub in members if isinstance(sub, dict) and sub.get("type") == "float")
    nested = [*members, schema["items"]] if isinstance(schema.get("items"), dict) else members
    return here + sum(_float_properties(sub) for sub in nested)


def test_every_bfcl_tool_schema_is_sent_with_json_schemas_types_only() -> None:
    """live_multiple's rows name 4,241 ``dict``, 341 ``float``, 7 ``any`` and 3 ``tuple`` types,
    which the hosted providers refuse (JSON Schema has them not: every one of the 4,178
    function schemas failed draft 2020-12's meta-schema): sent as BFCL's harness sends them
    (its GORILLA_TO_OPENAPI: ``any`` as ``string``), each becomes its JSON Schema type, a
    ``float`` property also gets BFCL's ``format: "float"`` and description note (330 of the
    341; the 11 in ``items`` only the type, as in BFCL's ``_cast_to_openai_type``), and
    nothing else changes."""
    raw: Counter[str] = Counter()
    floats = 0
    for line in (data_dir() / QUERIES).read_text(encoding="utf-8").splitlines():
        for function in json.loads(line)["function"]:
            _types(function.get("parameters", {}), raw)
            floats += _float_properties(function.get("parameters", {}))
    foreign = {t: raw[t] for t in raw if t not in JSON_SCHEMA_TYPES}
    assert foreign == {"dict": 4241, "float": 341, "any": 7, "tuple": 3}  # every schema typed
    workload = build(_spec("tools"))
    rows = int(str(workload.params()["queries"]))
    sent: Counter[str] = Counter()
    for _ in range(rows):  # each row once (all of them: every row has a user message)
        for tool in workload.next_item().request.tools:
            _types(json.loads(tool.input_schema_json), sent)
    assert rows == 1053 and floats == 330
    assert sent == {
        "object": raw["object"] + raw["dict"],
        "number": raw["number"] + raw["float"],
        "array": raw["array"] + raw["tuple"],
        "string": raw["string"] + raw["any"],
        "float property": floats,
        **{t: raw[t] for t in ("integer", "boolean") if raw[t]},
    }


def test_json_schema_converts_bfcls_types_where_they_nest_and_leaves_data_alone() -> None:
    """As BFCL's harness (``_cast_to_openai_type``): ``any`` as ``string``, a ``float``
    property with format and note (a ``float`` in ``items`` only its type); and nested where
    the harness does not reach (``anyOf``). A property with no type is left without one."""
    row = {
        "type": "dict",
        "required": ["a"],
        "properties": {
            "a": {"type": "tuple", "items": {"type": "float"}},
            "b": {"type": "any", "description": "any value"},
            "type": {"type": "dict", "default": {"type": "dict"}, "enum": [{"type": "float"}]},
            "c": {
                "type": "array",
                "items": {
                    "type": "dict",
                    "properties": {"d": {"type": "float", "description": "Rate."}, "e": {}},
                },
            },
            "f": {"anyOf": [{"type": "HashMap"}, {"type": "null"}]},
        },
    }
    before = json.dumps(row, sort_keys=True)
    assert json_schema(row) == {
        "type": "object",
        "required": ["a"],
        "properties": {
            "a": {"type": "array", "items": {"type": "number"}},
            "b": {"type": "string", "description": "any value"},
            "type": {"type": "object", "default": {"type": "dict"}, "enum": [{"type": "float"}]},
            "c": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "d": {
                            "type": "number",
                            "format": "float",
                            "description": "Rate. This is a float type value.",
                        },
                        "e": {},
                    },
                },
            },
            "f": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        },
    }
    assert json.dumps(row, sort_keys=True) == before  # the row itself is unchanged


def _build_from_one_row(tmp_path: Path, row_id: str, functions: list[dict[str, Any]]) -> None:
    """Builds the tools workload from a data directory whose BFCL file holds one row."""
    row = {"id": row_id, "question": [[{"role": "user", "content": "hi"}]], "function": functions}
    path = tmp_path / QUERIES
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    build(WorkloadSpec("tools", 3, "ns", tmp_path))


def test_a_bfcl_row_with_a_type_neither_json_schemas_nor_bfcls_is_refused(tmp_path: Path) -> None:
    """``Set`` is not in BFCL's GORILLA_TO_OPENAPI (its harness would send it as a string
    without a word): refused, naming the row and the function."""
    a_set = {"type": "dict", "properties": {"x": {"type": "Set"}}}
    with pytest.raises(DataInvalid, match=r"row live_multiple_y: function 'f': type 'Set'"):
        _build_from_one_row(tmp_path, "live_multiple_y", [{"name": "f", "parameters": a_set}])


def test_a_bfcl_row_whose_names_collide_once_sent_is_refused(tmp_path: Path) -> None:
    functions = [{"name": "a.b", "parameters": {}}, {"name": "a_b", "parameters": {}}]
    with pytest.raises(DataInvalid, match=r"row live_multiple_x: two of its function names"):
        _build_from_one_row(tmp_path, "live_multiple_x", functions)


def test_the_same_spec_gives_the_same_requests() -> None:
    one, two = build(_spec("mix")), build(_spec("mix"))
    assert [one.next_item().request for _ in range(50)] == [
        two.next_item().request for _ in range(50)
    ]


def test_agent_replays_turn_by_turn_with_a_cached_prefix() -> None:
    workload = build(_spec("agent"))
    first = [workload.next_item().request for _ in range(3)]
    assert len(first[0].tools) == 14 and first[0].tools[-1].HasField("cache_control")
    assert first[0].system[0].HasField("cache_control")
    # each turn extends the previous one's conversation
    assert len(first[1].messages) > len(first[0].messages)
    assert first[1].messages[0].content[0].text == first[0].messages[0].content[0].text
    for request in first:
        assert request.messages[-1].role == pb.ROLE_USER
        assert request.messages[-1].content[-1].HasField("cache_control")


def test_agent_turns_name_their_conversation_and_other_items_none() -> None:
    """The runner keeps a session's turns in order (each after the previous one's answer):
    every turn of one conversation, and only those, carries its session."""
    agent = build(_spec("agent"))
    items = [agent.next_item() for _ in range(60)]
    sessions = [item.session for item in items]
    assert all(sessions) and len(set(sessions)) > 3
    for one, two in itertools.pairwise(items):
        grows = len(two.request.messages) > len(one.request.messages)
        assert (one.session == two.session) == grows  # a new conversation starts over
    mixed = build(_spec("mix", mix="agent=1,faq=1,tools=1"))
    for item in (mixed.next_item() for _ in range(60)):
        assert bool(item.session) == (item.kind == "agent")


def test_faq_repeats_and_paraphrases_at_the_configured_rates() -> None:
    workload = build(_spec("faq", repeat_rate=0.4, paraphrase_rate=0.2))
    asked: set[str] = set()
    repeats = 0
    n = 2000
    for _ in range(n):
        item = workload.next_item()
        key = normalise(item.question)
        repeats += key in asked
        asked.add(key)
    assert 0.35 < repeats / n < 0.45
    labels = workload.labels()
    assert set(labels.values()) == {0, 1} and len(labels) > 10_000


def test_unrelated_prompts_do_not_repeat() -> None:
    workload = build(_spec("unrelated"))
    texts = [workload.next_item().request.messages[-1].content[0].text for _ in range(500)]
    assert len(set(texts)) == len(texts)


def test_mix_weights_are_parsed_and_checked() -> None:
    assert parse_weights("agent=1,faq=3") == {"agent": 1.0, "faq": 3.0}
    for bad in ("agent", "agent=-1", "agent=0", "=2"):
        with pytest.raises(ValueError):
            parse_weights(bad)
    with pytest.raises(ValueError, match="unknown"):
        build(_spec("mix", mix="agent=1,nope=1"))
    workload = build(_spec("mix", mix="faq=1,unrelated=0"))
    assert {workload.next_item().kind for _ in range(50)} == {"faq"}
