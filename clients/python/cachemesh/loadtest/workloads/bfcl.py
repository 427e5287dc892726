"""BFCL v4 live_multiple: real users' queries sent with the tool lists they came with.

171 of the 1,053 rows name a function with dots (``ChaDri.change_drink``), which OpenAI's and
Anthropic's tool names may not hold (``^[a-zA-Z0-9_-]+$``: the router refuses such a name for a
hosted row as the providers do). BFCL's own harness sends ``.`` as ``_`` to those APIs; so does
this workload, for every row (the same request whichever row answers it). The rows hold no
recorded calls or expected answers, so the tool list is the only place a name appears.

The rows' parameter schemas name types JSON Schema has not (live_multiple: 4,241 ``dict``, 341
``float``, 7 ``any``, 3 ``tuple``), which OpenAI (``parameters``: "a JSON Schema object") and
Anthropic (``input_schema``: "JSON schema is invalid. It must match JSON Schema draft 2020-12")
refuse (every one of its 4,178 function schemas failed draft 2020-12's meta-schema). BFCL's
harness converts them before it calls a provider; so does this workload (``json_schema``), for
every row: none fails it then.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

from cachemesh import json_schema as schema_words
from cachemesh.loadtest.workloads.base import (
    TENANT_A,
    DataInvalid,
    Item,
    data_file,
    malformed,
    nonempty,
    read_jsonl,
    tool_from_schema,
)
from cachemesh.v1 import gateway_pb2 as pb

QUERIES = "agent/bfcl/BFCL_v4_live_multiple.jsonl"


def api_tool_name(name: str) -> str:
    """A BFCL function name as a provider's API takes it: ``.`` as ``_`` (BFCL's rule)."""
    return name.replace(".", "_")


# BFCL's type names as its harness sends them to a provider: its GORILLA_TO_OPENAPI, whole
# (ShishirPatil/gorilla, berkeley-function-call-leaderboard/bfcl_eval/constants/type_mappings.py;
# ``any`` as "string", as BFCL sends it). A name not in it is refused (``NotJsonSchemaType``):
# BFCL's harness sends such a name as "string", which would hide a data file it never saw.
GORILLA_TO_OPENAPI = {
    "integer": "integer", "number": "number", "float": "number", "string": "string",
    "boolean": "boolean", "bool": "boolean", "array": "array", "list": "array",
    "dict": "object", "object": "object", "tuple": "array", "any": "string",
    "byte": "integer", "short": "integer", "long": "integer", "double": "number",
    "char": "string", "ArrayList": "array", "Array": "array", "HashMap": "object",
    "Hashtable": "object", "Queue": "array", "Stack": "array", "Any": "string",
    "String": "string", "Bigint": "integer",
}  # fmt: skip
# what BFCL's harness adds to a property whose type is ``float`` (its ``_cast_to_openai_type``,
# bfcl_eval/model_handler/utils.py): a format, and this to its description
FLOAT_FORMAT = "float"
FLOAT_NOTE = " This is a float type value."
JSON_SCHEMA_TYPES = frozenset(schema_words.TYPES)


class NotJsonSchemaType(ValueError):
    """A type name neither JSON Schema's nor one BFCL's harness converts."""


def json_schema(schema: object, *, property_: bool = False) -> object:
    """A BFCL parameter schema as JSON Schema, as BFCL's harness sends it to a provider
    (``_cast_to_openai_type`` in ShishirPatil/gorilla's berkeley-function-call-leaderboard/
    bfcl_eval/model_handler/utils.py): each type name by ``GORILLA_TO_OPENAPI`` (``dict`` as
    ``object``, ``float`` as ``number``, ``any`` as ``string``...); a property (``property_``: a
    member of a ``properties`` map) of type ``float`` also gets ``format: "float"`` and
    ``FLOAT_NOTE`` at its description's end. The harness walks ``properties`` and ``items``
    (two levels of them); this walks every schema nested in it (``schema_words.subschemas``),
    the same rules where the harness reaches. Not followed: the harness sends a property with
    no type as a string (live_multiple has none; a property typed by ``anyOf`` would become a
    string and its alternatives at once, which no value meets). A new value (``schema`` is
    unchanged). ``NotJsonSchemaType`` for a type name not in BFCL's table (nor JSON
    Schema's)."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, object] = dict(schema)
    kind = out.get("type")
    if isinstance(kind, str):
        if kind not in GORILLA_TO_OPENAPI and kind not in JSON_SCHEMA_TYPES:
            raise NotJsonSchemaType(f"type {kind!r} is not a JSON Schema type")
        out["type"] = GORILLA_TO_OPENAPI.get(kind, kind)
        if property_ and kind == "float":
            out["format"] = FLOAT_FORMAT
            described = out.get("description")
            out["description"] = (
                f"{described}{FLOAT_NOTE}" if isinstance(described, str) else FLOAT_NOTE.strip()
            )
    # only the nested schemas are walked (``schema_words.subschemas``: the router's walker's
    # keywords; a ``default`` or an ``enum`` value is data, whatever keys it holds)
    for (key, slot), sub in schema_words.subschemas(schema):
        if slot is None:
            out[key] = json_schema(sub)
            continue
        if out[key] is schema[key]:  # the keyword's list or map, copied at its first schema
            out[key] = copy.copy(schema[key])
        out[key][slot] = json_schema(sub, property_=key == "properties")  # type: ignore[index]
    return out


def _as_sent(path: Path, row: dict[str, object]) -> dict[str, object]:
    """``row`` with its functions' parameters as JSON Schema (``json_schema``); ``DataInvalid``
    naming the row and the function for a type neither JSON Schema's nor BFCL's."""
    functions = []
    for f in row["function"]:  # type: ignore[attr-defined]
        try:
            functions.append({**f, "parameters": json_schema(f.get("parameters", {}))})
        except NotJsonSchemaType as exc:
            raise DataInvalid(
                f"{path}: row {row.get('id', '?')}: function {f.get('name')!r}: {exc} nor one "
                "BFCL's harness converts (its GORILLA_TO_OPENAPI)"
            ) from None
    return {**row, "function": functions}


def _names_stay_distinct(path: Path, rows: list[dict[str, object]]) -> None:
    """``DataInvalid`` for a row two of whose names become one (``a.b`` beside ``a_b``): its
    requests would declare a tool twice, which the router refuses."""
    for row in rows:
        names = [str(f["name"]) for f in row["function"]]  # type: ignore[attr-defined]
        sent = [api_tool_name(n) for n in names]
        if len(set(sent)) != len(set(names)):
            raise DataInvalid(
                f"{path}: row {row.get('id', '?')}: two of its function names become one when "
                f"'.' is sent as '_' ({sorted(names)}): rename one"
            )


def bfcl_request(
    row: dict[str, object], model: str, max_tokens: int, namespace: str
) -> pb.CompleteRequest:
    turn: list[dict[str, str]] = row["question"][0]  # type: ignore[index]
    functions: list[dict[str, object]] = row["function"]  # type: ignore[assignment]
    tools = [
        tool_from_schema(
            api_tool_name(str(f["name"])), str(f.get("description", "")), f.get("parameters", {})
        )
        for f in functions
    ]
    tools[-1].cache_control.SetInParent()
    system = [pb.ContentBlock(text=m["content"]) for m in turn if m["role"] == "system"]
    messages = [
        pb.Message(
            role=pb.ROLE_USER if m["role"] == "user" else pb.ROLE_ASSISTANT,
            content=[pb.ContentBlock(text=m["content"])],
        )
        for m in turn
        if m["role"] != "system" and m["content"].strip()
    ]
    return pb.CompleteRequest(
        model=model,
        max_tokens=max_tokens,
        tools=tools,
        system=system,
        messages=messages,
        cache=pb.CacheOptions(namespace=namespace),
    )


class BfclTools:
    name = "tools"

    def __init__(
        self, data_dir: Path, seed: int, namespace: str, model: str = "auto", max_tokens: int = 256
    ) -> None:
        path = data_file(data_dir, QUERIES)
        rows = read_jsonl(path)
        try:
            asked = [r for r in rows if any(m["role"] == "user" for m in r["question"][0])]  # type: ignore[index]
            _names_stay_distinct(path, asked)
            asked = [_as_sent(path, r) for r in asked]
        except (KeyError, TypeError, IndexError) as exc:
            raise malformed(path, exc) from None
        self._rows = nonempty(path, asked, "query with a user message")
        random.Random(seed).shuffle(self._rows)
        self._seed, self._namespace, self._model, self._max_tokens = (
            seed,
            namespace,
            model,
            max_tokens,
        )
        self._i = 0

    def params(self) -> dict[str, object]:
        return {
            "seed": self._seed, "source": QUERIES, "queries": len(self._rows),
            "model": self._model, "max_tokens": self._max_tokens,
        }  # fmt: skip

    def labels(self) -> dict[frozenset[str], int]:
        return {}

    def next_item(self) -> Item:
        row = self._rows[self._i % len(self._rows)]
        self._i += 1
        return Item(
            self.name, TENANT_A, bfcl_request(row, self._model, self._max_tokens, self._namespace)
        )
