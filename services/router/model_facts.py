"""What the router's model table makes of a request's model string, for L1's scope.

DESIGN.md, "What a cache hit may serve": an answer is served only for the model and the
sampling that made it. L1 reads no model table (README "Upgrading"), so the router tells it,
in each Lookup, Store and Release, what the requested string alone does not say
(``ModelFacts``): the upstream model a row is called by where that is not its id (an
``upstream_id`` repointed to a newer snapshot is a new scope), and whether a row that may
answer samples an unset temperature at its engine's own default (a ``self_hosted`` row:
llama-server's 0.8), not the 1.0 an unset temperature is elsewhere. ``auto``'s tiers being
repointed is said per answer instead (``accepted_models``): an ``auto`` entry keeps its scope,
and one another row made is refused as a miss. Facts that add nothing are not sent, so every
scope they do not change is the one it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.models import AUTO, ModelSpec, ModelTable

# the providers whose APIs sample a request without a temperature at 1.0 (the simulator's
# rule, Anthropic's and OpenAI's documented defaults); a self_hosted engine applies its own
_UNSET_IS_ONE = frozenset({"simulated", "anthropic", "openai"})


def _rows(table: ModelTable, model: str) -> tuple[ModelSpec, ...]:
    """The rows a request for ``model`` may be answered by (none for a string the table does
    not have: validation refuses it before any Lookup)."""
    if model == AUTO:
        return table.answering(AUTO)
    spec = table.get(model)
    return () if spec is None else (spec,)


def _facts_of(table: ModelTable, model: str) -> sc.ModelFacts | None:
    rows = _rows(table, model)
    facts = sc.ModelFacts(
        upstreams=sorted(
            f"{row.id}={row.upstream_id}"
            for row in rows
            if row.upstream_id and row.upstream_id != row.id
        ),
        engine_default_temperature=any(row.provider not in _UNSET_IS_ONE for row in rows),
    )
    return facts if facts.upstreams or facts.engine_default_temperature else None


def _accepted_of(table: ModelTable, model: str) -> tuple[str, ...]:
    return tuple(row.id for row in table.answering(AUTO)) if model == AUTO else ()


def model_facts(table: ModelTable, request: pb.CompleteRequest) -> sc.ModelFacts | None:
    """The facts L1's scope holds of the request's model, None when there are none."""
    return _facts_of(table, request.model)


def accepted_models(table: ModelTable, request: pb.CompleteRequest) -> list[str]:
    """The rows whose L1 answers an ``auto`` request accepts: its tiers' rows now ([] for a
    named model, whose answers only its own row makes)."""
    return list(_accepted_of(table, request.model))


@dataclass(frozen=True, slots=True)
class _Scope:
    facts: sc.ModelFacts | None
    accepted: tuple[str, ...]


_NO_SCOPE = _Scope(None, ())


class ModelScopes:
    """``model_facts`` and ``accepted_models`` of every model string a table answers (each
    row's id and ``auto``), computed once as the router is built: they follow from the string
    and the table alone, which a router never changes while it runs (a new table is a restart).
    A Lookup, Store or Release reads them from this map instead of computing them again (2 to 7
    microseconds of CPU each, the table's ``auto`` tiers sorted by price each time). A string
    the table does not have has neither (as from ``model_facts``; validation refuses it before
    any Lookup)."""

    __slots__ = ("_scopes",)

    def __init__(self, table: ModelTable) -> None:
        self._scopes: Mapping[str, _Scope] = MappingProxyType(
            {
                model: _Scope(_facts_of(table, model), _accepted_of(table, model))
                for model in (*table.models, AUTO)
            }
        )

    def facts(self, model: str) -> sc.ModelFacts | None:
        """The facts L1's scope holds of ``model`` (None: none). One message shared by every
        call: a request built with it holds a copy (protobuf copies a message field it is
        given), and it is never changed in place."""
        return self._scopes.get(model, _NO_SCOPE).facts

    def accepted_models(self, model: str) -> tuple[str, ...]:
        """The rows whose L1 answers a request for ``model`` accepts (``auto``: its tiers'
        rows, cheapest first; () for a named model, whose answers only its own row makes)."""
        return self._scopes.get(model, _NO_SCOPE).accepted
