"""What OpenAI's and Anthropic's APIs check of a tool's parameter schema that the loopback
servers check too: that each ``type`` in it is one of JSON Schema's (a name of its seven, or a
non-empty list of distinct ones), in the schema and every schema nested in it.

Both APIs take a tool's parameters as "a JSON Schema object" (OpenAI's ``parameters``,
Anthropic's ``input_schema``) and refuse one that is not valid JSON Schema: OpenAI's 400
``invalid_function_parameters`` quotes the meta-schema check ("Invalid schema for function
'...': [] is not of type 'object', 'boolean'.", FoundationAgents/OpenManus#1162); Anthropic's
says "tools.N.custom.input_schema: JSON schema is invalid. It must match JSON Schema draft
2020-12" (anthropics/claude-code#7365). Only the types are checked here: the rest of the
meta-schema is not (a loopback server that refused more than the tests need would be a second
meta-schema to keep).
"""

from __future__ import annotations

from typing import Any

from cachemesh import json_schema

TYPES = frozenset(json_schema.TYPES)


def _problem(kind: Any) -> str | None:
    """What is wrong with a ``type`` value, in the meta-schema check's words, else None."""
    if isinstance(kind, str) and kind in TYPES:
        return None
    if isinstance(kind, list) and all(isinstance(k, str) and k in TYPES for k in kind):
        if not kind:
            return "[] should be non-empty"
        if len(set(kind)) != len(kind):
            return f"{kind!r} has non-unique elements"
        return None
    return f"{kind!r} is not valid under any of the given schemas"


def bad_type(schema: Any) -> str | None:
    """What is wrong with the first ``type`` in ``schema`` (or a schema nested in it) that
    JSON Schema has not, else None."""
    if not isinstance(schema, dict):
        return None
    if "type" in schema and (problem := _problem(schema["type"])) is not None:
        return problem
    # the nested schemas: the keywords the router's walker walks (one list: a schema the router
    # passes is one these servers pass)
    for _, sub in json_schema.subschemas(schema):
        if (found := bad_type(sub)) is not None:
            return found
    return None
