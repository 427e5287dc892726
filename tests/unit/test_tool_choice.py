"""The Gateway's ``tool_choice`` end to end, piece by piece: the router's rule, both fronts'
forms, each provider's wire form, the simulator's forced call, the loopbacks' checks, L1's
scope (an answer made under one choice is never served under another) and the prompt cache's
digests (Anthropic: a change of tool_choice loses the messages' entries, keeps the tools' and
the system's). Before the field, both fronts refused every choice but ``auto``."""

from __future__ import annotations

from typing import Any

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.errors import Code, RequestError
from services.common.models import load_model_table
from services.common.prompt import canonical_blocks
from services.common.tokens import Tokenizer, load_cl100k
from services.http_front import anthropic_api, openai_api
from services.http_front.errors import ApiError
from services.model.api import _chunk
from services.model.engine import Call, Delta, Event, Finished, SimEngine
from services.model.kv_cache import KvBlockCache
from services.model.providers.anthropic_wire import messages_params
from services.model.providers.openai_wire import chat_params
from services.router.idempotency import fingerprint
from services.router.validation import validate_request
from tests.providers import anthropic_wire as anthropic_loopback
from tests.providers import openai_wire as openai_loopback
from tests.unit.model_support import RecordingSleep
from tests.unit.semantic_cache_support import make_request
from tests.unit.test_l1_model_scope import l1, router

TABLE = load_model_table()
DEPLOYED = {"sim-small", "sim-large"}
MODE = pb.ToolChoice
SCHEMA = '{"type": "object", "properties": {"city": {"type": "string"}}}'
TOOLS = (
    pb.Tool(name="get_weather", description="the weather", input_schema_json=SCHEMA),
    pb.Tool(name="get_time", description="the time", input_schema_json=SCHEMA),
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


def _request(
    mode: int = MODE.MODE_UNSPECIFIED,
    name: str = "",
    tools: tuple[pb.Tool, ...] = TOOLS,
    model: str = "sim-small",
) -> pb.CompleteRequest:
    request = make_request("what is the weather in paris", model=model, tools=tools)
    if mode or name:
        request.tool_choice.CopyFrom(pb.ToolChoice(mode=mode, name=name))  # type: ignore[arg-type]
    return request


# -- the router's rule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "name", "tools"),
    [
        (MODE.MODE_UNSPECIFIED, "", TOOLS),
        (MODE.MODE_AUTO, "", TOOLS),
        (MODE.MODE_NONE, "", TOOLS),
        (MODE.MODE_NONE, "", ()),
        (MODE.MODE_ANY, "", TOOLS),
        (MODE.MODE_TOOL, "get_time", TOOLS),
    ],
)
def test_the_router_takes_each_choice_the_providers_take(
    mode: int, name: str, tools: tuple[pb.Tool, ...]
) -> None:
    validate_request(_request(mode, name, tools), TABLE, DEPLOYED)


@pytest.mark.parametrize(
    ("mode", "name", "tools", "says"),
    [
        (MODE.MODE_TOOL, "get_news", TOOLS, "tool_choice.name: 'get_news' is not among"),
        (MODE.MODE_TOOL, "", TOOLS, "tool_choice.name: mode TOOL needs the name"),
        (MODE.MODE_TOOL, "get_time", (), "tool_choice.name: 'get_time' is not among"),
        (MODE.MODE_ANY, "", (), "tool_choice.mode: ANY needs tools"),
        (MODE.MODE_ANY, "get_time", TOOLS, "tool_choice.name: a name is taken only with mode"),
        (7, "", TOOLS, "tool_choice.mode: 7 is not a mode"),
    ],
)
def test_the_router_refuses_a_choice_no_provider_takes_naming_the_field(
    mode: int, name: str, tools: tuple[pb.Tool, ...], says: str
) -> None:
    with pytest.raises(RequestError) as refused:
        validate_request(_request(mode, name, tools), TABLE, DEPLOYED)
    assert refused.value.code == Code.INVALID_ARGUMENT
    assert says in refused.value.message


def _llama_server_row_taking_tools() -> Any:
    """``local-small`` (llama-server) as an operator's row of a model whose chat template takes
    tools: the engine still reads ``tool_choice`` as a string only."""
    table = load_model_table()
    table.models["local-small"] = table.models["local-small"].model_copy(
        update={"takes_tools": True}
    )
    return table


@pytest.mark.parametrize("model", ["local-small", "auto"])
def test_a_named_tool_to_an_engine_that_reads_only_a_string_is_refused(model: str) -> None:
    """llama-server reads tool_choice as "auto" / "none" / "required" only and answered a
    named tool as auto without a word: a row saying ``takes_named_tool_choice = false`` (or
    ``auto`` when it may pick one) refuses MODE_TOOL, naming the field; its other modes pass."""
    table = _llama_server_row_taking_tools()
    deployed = DEPLOYED | {"local-small"}
    if model == "auto":
        table.auto["small"] = "local-small"
    with pytest.raises(RequestError) as refused:
        validate_request(_request(MODE.MODE_TOOL, "get_time", model=model), table, deployed)
    assert refused.value.code == Code.INVALID_ARGUMENT
    message = refused.value.message
    assert message.startswith("tool_choice.name: a named tool is not supported by ")
    assert "local-small" in message and "`takes_named_tool_choice = false`" in message
    assert "only as none, required or auto" in message
    for mode in (MODE.MODE_UNSPECIFIED, MODE.MODE_AUTO, MODE.MODE_NONE, MODE.MODE_ANY):
        validate_request(_request(mode, model=model), table, deployed)


def test_the_packaged_llama_server_rows_say_they_take_no_named_tool() -> None:
    for row in ("local-small", "local-large"):
        assert not TABLE.models[row].takes_named_tool_choice
    for row in ("sim-small", "sim-large", "llama-3-1-8b-vllm", "gpt-4o", "claude-sonnet-5"):
        assert TABLE.models[row].takes_named_tool_choice


@pytest.mark.parametrize("row", ["gpt-4o", "claude-sonnet-5", "sim-small"])
def test_only_a_self_hosted_row_may_say_it_takes_no_named_tool(row: str) -> None:
    """A hosted API and the simulator take a named tool: the table is refused at start-up."""
    fields = TABLE.models[row].model_dump(exclude_unset=True)
    with pytest.raises(ValueError, match="takes_named_tool_choice = false is for a self-hosted"):
        type(TABLE.models[row]).model_validate({**fields, "takes_named_tool_choice": False})


# -- the fronts ----------------------------------------------------------------------------

ANTHROPIC_TOOLS = [
    {"name": "get_weather", "input_schema": {"type": "object"}},
    {"name": "get_time", "input_schema": {"type": "object"}},
]
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


def _anthropic(choice: Any, tools: list[Any] = ANTHROPIC_TOOLS) -> pb.CompleteRequest:
    body = {
        "model": "sim-small",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": tools,
        "tool_choice": choice,
    }
    if choice is None:
        del body["tool_choice"]
    return anthropic_api.parse_request(body)[0]


def _openai(choice: Any, tools: list[Any] = OPENAI_TOOLS) -> pb.CompleteRequest:
    body = {
        "model": "sim-small",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": tools,
        "tool_choice": choice,
    }
    if choice is None:
        del body["tool_choice"]
    return openai_api.parse_request(body, 50)[0]


@pytest.mark.parametrize(
    ("choice", "mode", "name"),
    [
        ({"type": "auto"}, None, ""),
        ({"type": "auto", "disable_parallel_tool_use": False}, None, ""),
        ({"type": "any"}, MODE.MODE_ANY, ""),
        ({"type": "tool", "name": "get_time"}, MODE.MODE_TOOL, "get_time"),
        ({"type": "none"}, MODE.MODE_NONE, ""),
    ],
)
def test_the_anthropic_front_maps_each_type(choice: Any, mode: int | None, name: str) -> None:
    """``auto`` leaves the field unset (``mode`` None), as an omitted choice does."""
    request = _anthropic(choice)
    if mode is None:
        assert not request.HasField("tool_choice")
    else:
        assert request.tool_choice == pb.ToolChoice(mode=mode, name=name)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("choice", "tools", "says"),
    [
        ({"type": "tool", "name": "get_news"}, ANTHROPIC_TOOLS, "tool_choice.name: 'get_news'"),
        ({"type": "tool"}, ANTHROPIC_TOOLS, "tool_choice.name: Field required"),
        ({"type": "none", "name": "get_time"}, ANTHROPIC_TOOLS, "tool_choice.name: Extra inputs"),
        ({"type": "any", "disable_parallel_tool_use": True}, ANTHROPIC_TOOLS,
         "tool_choice.disable_parallel_tool_use: not supported"),
        ({"type": "required"}, ANTHROPIC_TOOLS, "tool_choice.type: 'required' is not a tool"),
        ({"type": "any"}, [], "tool_choice.type: 'any' needs tools"),
        ("auto", ANTHROPIC_TOOLS, "tool_choice: expected an object"),
    ],
)  # fmt: skip
def test_the_anthropic_front_refuses_what_it_cannot_carry(
    choice: Any, tools: list[Any], says: str
) -> None:
    with pytest.raises(ApiError) as refused:
        _anthropic(choice, tools)
    assert says in refused.value.message


@pytest.mark.parametrize(
    ("choice", "mode", "name"),
    [
        ("auto", None, ""),
        ("none", MODE.MODE_NONE, ""),
        ("required", MODE.MODE_ANY, ""),
        ({"type": "function", "function": {"name": "get_time"}}, MODE.MODE_TOOL, "get_time"),
    ],
)
def test_the_openai_front_maps_each_form(choice: Any, mode: int | None, name: str) -> None:
    """``auto`` leaves the field unset (``mode`` None), as an omitted choice does."""
    request = _openai(choice)
    if mode is None:
        assert not request.HasField("tool_choice")
    else:
        assert request.tool_choice == pb.ToolChoice(mode=mode, name=name)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("parse", "auto"),
    [
        (_anthropic, {"type": "auto"}),
        (_anthropic, {"type": "auto", "disable_parallel_tool_use": False}),
        (_openai, "auto"),
    ],
)
def test_an_explicit_auto_is_the_same_request_as_an_omitted_choice(parse: Any, auto: Any) -> None:
    """The router's idempotency fingerprint (and the answer ledger's, which keys on it) is of
    the request's bytes: an explicit auto that set ``MODE_AUTO`` made a retry sending auto
    where the first attempt omitted it "already used for a different request"."""
    assert fingerprint(parse(auto)) == fingerprint(parse(None))


@pytest.mark.parametrize(
    ("choice", "tools", "says"),
    [
        ({"type": "function", "function": {"name": "get_news"}}, OPENAI_TOOLS,
         "tool_choice.function.name: 'get_news'"),
        ({"type": "function", "function": {}}, OPENAI_TOOLS,
         "tool_choice.function.name: Field required"),
        ({"type": "allowed_tools", "allowed_tools": {}}, OPENAI_TOOLS,
         "tool_choice.type: 'allowed_tools' is not supported"),
        ("any", OPENAI_TOOLS, "tool_choice: 'any' is not a tool choice"),
        ("required", [], "tool_choice: 'required' is only allowed when 'tools'"),
        (1, OPENAI_TOOLS, "tool_choice: expected a string or an object, got integer"),
        ([], OPENAI_TOOLS, "tool_choice: expected a string or an object, got array"),
    ],
)  # fmt: skip
def test_the_openai_front_refuses_what_it_cannot_carry(
    choice: Any, tools: list[Any], says: str
) -> None:
    with pytest.raises(ApiError) as refused:
        _openai(choice, tools)
    assert says in refused.value.message


def test_the_openai_front_names_a_refused_named_tool_by_the_callers_path() -> None:
    """The router's refusal of a named tool to a row that takes none names the Gateway's
    ``tool_choice.name``; a Chat Completions caller sent ``tool_choice.function.name``."""
    said = (
        "tool_choice.name: a named tool is not supported by local-small (its row of the model "
        "table says `takes_named_tool_choice = false`: ...)"
    )
    caller = openai_api.at_caller(said, openai_api.Origins())
    assert caller.startswith("tool_choice.function.name: a named tool is not supported by")
    assert caller.endswith("(the Gateway's tool_choice.name)")
    assert openai_api.param_of(caller, openai_api.Origins()) == "tool_choice.function.name"


# -- the providers' wire forms ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "name", "anthropic", "openai"),
    [
        (MODE.MODE_UNSPECIFIED, "", None, None),
        (MODE.MODE_AUTO, "", None, None),
        (MODE.MODE_NONE, "", {"type": "none"}, "none"),
        (MODE.MODE_ANY, "", {"type": "any"}, "required"),
        (MODE.MODE_TOOL, "get_time", {"type": "tool", "name": "get_time"},
         {"type": "function", "function": {"name": "get_time"}}),
    ],
)  # fmt: skip
def test_each_provider_is_sent_its_own_form(
    mode: int, name: str, anthropic: Any, openai: Any
) -> None:
    request = _request(mode, name)
    claude = messages_params(TABLE.models["claude-haiku-4-5"], request)
    gpt = chat_params(TABLE.models["gpt-4o"], request)
    engine = chat_params(TABLE.models["llama-3-1-8b-vllm"], request)
    assert claude.get("tool_choice") == anthropic
    assert gpt.get("tool_choice") == openai and engine.get("tool_choice") == openai
    # and the loopbacks, which check it as the APIs do, take each
    assert anthropic_loopback._tool_choice_refusal(claude) is None
    assert openai_loopback._tool_choice_refusal(gpt.get("tool_choice"), gpt["tools"]) is None


def test_none_without_tools_is_sent_no_choice_which_openai_would_refuse() -> None:
    request = _request(MODE.MODE_NONE, tools=())
    assert "tool_choice" not in chat_params(TABLE.models["gpt-4o"], request)
    assert "tool_choice" not in messages_params(TABLE.models["claude-haiku-4-5"], request)


def test_the_loopbacks_refuse_a_choice_the_apis_refuse() -> None:
    tools = [{"name": "get_time", "input_schema": {"type": "object"}}]
    refuse = anthropic_loopback._tool_choice_refusal
    assert refuse({"tool_choice": {"type": "tool", "name": "x"}, "tools": tools}) is not None
    assert refuse({"tool_choice": {"type": "any"}}) is not None
    assert refuse({"tool_choice": {"type": "none", "disable_parallel_tool_use": True}})
    assert refuse({"tool_choice": {"type": "required"}, "tools": tools}) is not None
    openai_tools = [{"type": "function", "function": {"name": "get_time"}}]
    named = {"type": "function", "function": {"name": "x"}}
    assert openai_loopback._tool_choice_refusal(named, openai_tools) is not None
    assert openai_loopback._tool_choice_refusal("any", openai_tools) is not None


def test_the_loopbacks_answer_a_forced_choice_with_a_call_of_that_tool() -> None:
    body: dict[str, Any] = {"model": "m", "tools": OPENAI_TOOLS, "tool_choice": "required"}
    assert openai_loopback.forced_tool(body) == "get_weather"
    body["tool_choice"] = {"type": "function", "function": {"name": "get_time"}}
    assert openai_loopback.forced_tool(body) == "get_time"
    body["tool_choice"] = "none"
    assert openai_loopback.forced_tool(body) is None
    claude = {"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "tool", "name": "get_time"}}
    assert anthropic_loopback.forced_tool(claude) == "get_time"
    assert anthropic_loopback.forced_tool({**claude, "tool_choice": {"type": "auto"}}) is None


# -- the simulator -----------------------------------------------------------------------------


def _engine(tokenizer: Tokenizer) -> SimEngine:
    table = load_model_table()
    return SimEngine(
        models={"sim-small": table.models["sim-small"]},
        replica_id="replica-1",
        tokenizer=tokenizer,
        kv_cache=KvBlockCache(1000),
        time_scale=0.0,
        sleep=RecordingSleep(),
    )


async def _events(tokenizer: Tokenizer, request: pb.CompleteRequest) -> list[Event]:
    engine = _engine(tokenizer)
    return [event async for event in engine.run(engine.prepare("t", "sim-small", request))]


async def test_the_simulator_answers_a_named_choice_with_a_call_of_that_tool(
    tokenizer: Tokenizer,
) -> None:
    events = await _events(tokenizer, _request(MODE.MODE_TOOL, "get_time"))
    calls = [event.call for event in events if isinstance(event, Call)]
    assert [call.name for call in calls] == ["get_time"] and calls[0].input_json == "{}"
    assert not [event for event in events if isinstance(event, Delta)]
    end = events[-1]
    assert isinstance(end, Finished) and end.stop_reason == "tool_use" and end.output_tokens > 0
    chunk = _chunk(Call(calls[0]))
    assert chunk.block.tool_use == calls[0]


async def test_the_simulator_answers_any_with_a_call_of_one_of_the_tools(
    tokenizer: Tokenizer,
) -> None:
    events = await _events(tokenizer, _request(MODE.MODE_ANY))
    calls = [event.call.name for event in events if isinstance(event, Call)]
    assert len(calls) == 1 and calls[0] in {tool.name for tool in TOOLS}


@pytest.mark.parametrize("mode", [MODE.MODE_UNSPECIFIED, MODE.MODE_AUTO, MODE.MODE_NONE])
async def test_the_simulator_answers_in_text_unless_forced(tokenizer: Tokenizer, mode: int) -> None:
    events = await _events(tokenizer, _request(mode))
    assert not [event for event in events if isinstance(event, Call)]
    assert [event for event in events if isinstance(event, Delta)]
    end = events[-1]
    assert isinstance(end, Finished) and end.stop_reason in ("end_turn", "max_tokens")


async def test_a_forced_call_longer_than_max_tokens_is_cut_unsent(tokenizer: Tokenizer) -> None:
    request = _request(MODE.MODE_TOOL, "get_time")
    request.max_tokens = 3
    events = await _events(tokenizer, request)
    assert not [event for event in events if isinstance(event, Call | Delta)]
    end = events[-1]
    assert isinstance(end, Finished) and (end.stop_reason, end.output_tokens) == ("max_tokens", 3)


# -- the caches -------------------------------------------------------------------------------

QUESTIONS = ("what is the weather in paris", "what time is it in tokyo", "is it raining")


async def _served(stored: pb.ToolChoice | None, asked: pb.ToolChoice | None) -> int:
    """Of ``QUESTIONS`` answered and stored under ``stored``, how many L1 serves under
    ``asked`` (the router's L1 calls to a real L1 in this process)."""
    from tests.unit.test_l1_model_scope import TABLE as SCOPE_TABLE
    from tests.unit.test_l1_model_scope import answer

    semantic = l1()
    calls = router(semantic, SCOPE_TABLE)
    for question in QUESTIONS:
        request = make_request(question, tools=TOOLS)
        if stored is not None:
            request.tool_choice.CopyFrom(stored)
        looked = await calls.lookup("tenant-a", request)
        assert looked is not None and not looked.hit
        reply = await calls.store(
            "tenant-a", request, answer(SCOPE_TABLE, "sim-small"), looked.lease_id
        )
        assert reply is not None and reply.stored, reply
    served = 0
    for question in QUESTIONS:
        request = make_request(question, tools=TOOLS)
        if asked is not None:
            request.tool_choice.CopyFrom(asked)
        looked = await calls.lookup("tenant-a", request)
        assert looked is not None
        served += looked.hit
    return served


NONE = pb.ToolChoice(mode=MODE.MODE_NONE)
ANY = pb.ToolChoice(mode=MODE.MODE_ANY)
AUTO = pb.ToolChoice(mode=MODE.MODE_AUTO)
GET_TIME = pb.ToolChoice(mode=MODE.MODE_TOOL, name="get_time")
GET_WEATHER = pb.ToolChoice(mode=MODE.MODE_TOOL, name="get_weather")


@pytest.mark.parametrize(
    ("stored", "asked"),
    [(None, NONE), (NONE, None), (NONE, ANY), (None, GET_TIME), (GET_WEATHER, GET_TIME)],
)
async def test_l1_serves_no_answer_made_under_another_choice(
    stored: pb.ToolChoice | None, asked: pb.ToolChoice | None
) -> None:
    assert await _served(stored, asked) == 0


@pytest.mark.parametrize(("stored", "asked"), [(None, None), (None, AUTO), (NONE, NONE)])
async def test_l1_serves_the_answers_of_the_same_choice(
    stored: pb.ToolChoice | None, asked: pb.ToolChoice | None
) -> None:
    """An explicit auto is the unset one (every scope from before the field is kept)."""
    assert await _served(stored, asked) == len(QUESTIONS)


def test_a_choice_but_auto_changes_the_messages_digests_not_the_tools_or_systems(
    tokenizer: Tokenizer,
) -> None:
    """Anthropic's cache across a change of tool_choice: the tools' and system's entries kept,
    the messages' lost; unset and explicit auto are the digests as they were."""
    before = canonical_blocks(_request(), tokenizer)
    assert canonical_blocks(_request(MODE.MODE_AUTO), tokenizer) == before
    for mode, name in ((MODE.MODE_NONE, ""), (MODE.MODE_ANY, ""), (MODE.MODE_TOOL, "get_time")):
        after = canonical_blocks(_request(mode, name), tokenizer)
        assert [b.text for b in after] == [b.text for b in before]  # the same tokens
        for old, new in zip(before, after, strict=True):
            same = old.section in ("tools", "system")
            assert (old.digest == new.digest) is same, (mode, old.section)
    named = canonical_blocks(_request(MODE.MODE_TOOL, "get_weather"), tokenizer)
    assert (
        named[-1].digest
        != canonical_blocks(_request(MODE.MODE_TOOL, "get_time"), tokenizer)[-1].digest
    )


def test_the_simulator_refuses_a_choice_the_router_would(tokenizer: Tokenizer) -> None:
    """Called by another than the router (the estimator, a test), it does not call a tool the
    request does not declare."""
    with pytest.raises(RequestError) as refused:
        _engine(tokenizer).prepare("t", "sim-small", _request(MODE.MODE_TOOL, "get_news"))
    assert refused.value.code == Code.INVALID_ARGUMENT
    assert "tool_choice.name: 'get_news' is not among" in refused.value.message
