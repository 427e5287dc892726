"""sites_of names each canonical block's request field, built only when read (a rule broken)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachemesh.v1 import gateway_pb2 as pb
from services.common.prompt import block_text
from services.prefix_cache import sites
from services.prefix_cache.rules import Site
from services.prefix_cache.sites import sites_of


def eager_sites(request: pb.CompleteRequest) -> list[Site]:
    """Every site built up front: the definition the lazy sites must equal."""
    built = [
        Site(f"request.tools[{i}]", not (t.name or t.description or t.input_schema_json))
        for i, t in enumerate(request.tools)
    ]
    built.extend(
        Site(f"request.system[{i}]", block_text(b) == "") for i, b in enumerate(request.system)
    )
    for m, message in enumerate(request.messages):
        built.extend(
            Site(f"request.messages[{m}].content[{k}]", block_text(b) == "")
            for k, b in enumerate(message.content)
        )
    return built


_text = st.sampled_from(["", "x", "hello"])
_block = st.one_of(
    _text.map(lambda t: pb.ContentBlock(text=t)),
    _text.map(lambda t: pb.ContentBlock(tool_result=pb.ToolResult(tool_use_id="a", content=t))),
    st.just(pb.ContentBlock()),
)
_tool = st.tuples(_text, _text).map(lambda p: pb.Tool(name=p[0], description=p[1]))
_message = st.lists(_block, max_size=4).map(
    lambda blocks: pb.Message(role=pb.ROLE_USER, content=blocks)
)


# 100 examples, not 300: the fields hold 0 to 6 messages of 0 to 4 blocks of three texts;
# the block of an empty message's shared start read from the wrong message (bisect_left) was
# found under each of 8 seeds at 100
@settings(max_examples=100, deadline=None)
@given(
    tools=st.lists(_tool, max_size=3),
    system=st.lists(_block, max_size=3),
    messages=st.lists(_message, max_size=6),
)
def test_lazy_sites_equal_the_eager_ones(
    tools: list[pb.Tool], system: list[pb.ContentBlock], messages: list[pb.Message]
) -> None:
    request = pb.CompleteRequest(tools=tools, system=system, messages=messages)
    expected = eager_sites(request)
    sites = sites_of(request)
    assert len(sites) == len(expected)
    assert list(sites) == expected
    assert [sites[i] for i in range(-len(expected), 0)] == expected
    assert list(sites[1::2]) == expected[1::2]


def test_reading_past_the_end_is_an_index_error() -> None:
    sites = sites_of(pb.CompleteRequest(messages=[pb.Message(content=[pb.ContentBlock()])]))
    assert len(sites) == 1
    for index in (1, -2):
        try:
            sites[index]
        except IndexError:
            continue
        raise AssertionError(f"sites[{index}] did not raise")


def test_a_long_prompt_builds_no_site_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent's 3,000-block prompt: the eager sites built a Site (an f-string) a block on
    every Plan, ~6.7 ms, 11% of prefix-cache's CPU in a long session; the lazy ones build one
    only when it is read (counted, not timed: speed is the bench's)."""
    built: list[str] = []
    real = Site

    def counted(field: str, empty: bool) -> Site:
        built.append(field)
        return real(field, empty)

    monkeypatch.setattr(sites, "Site", counted)
    request = pb.CompleteRequest(
        messages=[
            pb.Message(content=[pb.ContentBlock(text="words") for _ in range(3)])
            for _ in range(1000)
        ]
    )
    lazy = sites_of(request)
    assert len(lazy) == 3000 and built == []
    assert lazy[2999].field == "request.messages[999].content[2]" and len(built) == 1
