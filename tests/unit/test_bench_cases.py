"""The bench's miss cases: agent-shaped requests through every layer, each a sure L1 miss."""

from __future__ import annotations

from pathlib import Path

from services.bench import cases
from services.common.models import load_model_table
from services.common.prompt import last_user_text
from services.router.validation import validate_request

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
TABLE = load_model_table()


def test_agent_misses_are_auto_tau_turns_ending_in_user_text_each_in_its_namespace() -> None:
    items = cases.agent_misses(DATA, "run-c", 40, seed=8)
    assert len(items) == 40
    for item in items:
        request = item.request
        validate_request(request, TABLE, set(TABLE.models))
        assert request.model == "auto" and len(request.tools) == 14 and request.system
        assert last_user_text(request)  # the router looks L1 up and stores the answer
    namespaces = [i.request.cache.namespace for i in items]
    assert namespaces == [f"run-c/{i}" for i in range(40)]
    assert any(len(i.request.messages) > 1 for i in items)  # conversations so far, not openers


def test_the_same_seed_gives_the_same_requests_on_both_tracing_stacks() -> None:
    one = cases.agent_misses(DATA, "ns", 10, seed=1)
    two = cases.agent_misses(DATA, "ns", 10, seed=1)
    assert [i.request for i in one] == [i.request for i in two]


def test_unrelated_misses_get_their_own_namespaces_too() -> None:
    items = cases.misses(DATA, "run-c2", 30, seed=1)
    assert [i.request.cache.namespace for i in items] == [f"run-c2/{i}" for i in range(30)]
    assert all(i.request.model == "auto" and not i.request.tools for i in items)
