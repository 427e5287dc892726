"""JSON Schema's types and the keywords whose value is a schema: one list for every walker of a
tool's parameter schema (the router's validation, the load tester's BFCL conversion, the
loopback provider servers' checks), so that what one walks the others walk too.

The keywords are those whose value is a schema, a list of schemas or a map of names to
schemas in JSON Schema draft 2020-12 (its applicator and unevaluated vocabularies; Core,
sections 10 and 11) and the two that earlier drafts had and clients still write
(``additionalItems``, ``definitions``; draft-07's ``dependencies``, whose values are a schema or
a list of property names: a walker looks at the schemas). A ``default``, ``enum`` or ``const``
value is data, whatever keys it holds: never walked. ``subschemas`` walks them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
# a keyword whose value is one schema
ONE_SCHEMA = (
    "items",  # a schema (2020-12) or a list of them (draft-07): both walked
    "additionalItems",
    "additionalProperties",
    "unevaluatedItems",
    "unevaluatedProperties",
    "propertyNames",
    "contains",
    "not",
    "if",
    "then",
    "else",
)
# a keyword whose value is a list of schemas
SCHEMA_LISTS = ("items", "prefixItems", "anyOf", "oneOf", "allOf")
# a keyword whose value maps names to schemas
SCHEMA_MAPS = (
    "properties",
    "patternProperties",
    "dependentSchemas",
    "dependencies",
    "$defs",
    "definitions",
)

# where a schema nested in another is: the keyword, and its index in the keyword's list or its
# name in the keyword's map (None: the keyword's value is the schema itself)
Where = tuple[str, int | str | None]


def subschemas(schema: Mapping[str, Any]) -> Iterator[tuple[Where, Any]]:
    """Each value nested in ``schema`` where a schema goes (``ONE_SCHEMA``'s keywords' dicts,
    then ``SCHEMA_LISTS``' lists' members, then ``SCHEMA_MAPS``' maps' values), with where it
    is; one level down only (a walker recurses). A member may be a boolean schema or, under
    ``dependencies``, a list of property names: the walker judges it."""
    for key in ONE_SCHEMA:
        if isinstance(sub := schema.get(key), dict):
            yield (key, None), sub
    for key in SCHEMA_LISTS:
        if isinstance(subs := schema.get(key), list):
            for i, sub in enumerate(subs):
                yield (key, i), sub
    for key in SCHEMA_MAPS:
        if isinstance(named := schema.get(key), dict):
            for name, sub in named.items():
                yield (key, name), sub
