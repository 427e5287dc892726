"""The Gateway's bad-input rules: each names the field and the right status."""

from __future__ import annotations

import json

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.errors import Code, RequestError
from services.common.models import ModelTable, load_model_table
from services.router.validation import UnsupportedValue, validate_request

TABLE = load_model_table()
DEPLOYED = {"sim-small", "sim-large"}


def _request(**fields: object) -> pb.CompleteRequest:
    request = pb.CompleteRequest(
        model="sim-small",
        max_tokens=100,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="hello")])],
    )
    for name, value in fields.items():
        if isinstance(value, list):
            del getattr(request, name)[:]
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    return request


def _refusal(request: pb.CompleteRequest, deployed: set[str], allowed: bool) -> RequestError | None:
    """None once ``request`` validates, when ``allowed``; else its refusal, INVALID_ARGUMENT."""
    if allowed:
        validate_request(request, TABLE, deployed)
        return None
    with pytest.raises(RequestError) as info:
        validate_request(request, TABLE, deployed)
    assert info.value.code == Code.INVALID_ARGUMENT
    return info.value


def _error(request: pb.CompleteRequest) -> RequestError:
    with pytest.raises(RequestError) as info:
        validate_request(request, TABLE, DEPLOYED)
    return info.value


def _text(text: str, cache: bool = False, ttl: int = 0) -> pb.ContentBlock:
    block = pb.ContentBlock(text=text)
    if cache:
        block.cache_control.ttl = ttl  # type: ignore[assignment]
        block.cache_control.SetInParent()
    return block


def test_a_valid_request_passes() -> None:
    validate_request(_request(), TABLE, DEPLOYED)
    validate_request(_request(model="auto"), TABLE, DEPLOYED)


def test_no_messages() -> None:
    error = _error(_request(messages=[]))
    assert error.code == Code.INVALID_ARGUMENT
    assert error.message.startswith("messages:")


def test_first_message_must_be_the_users() -> None:
    request = _request(messages=[pb.Message(role=pb.ROLE_ASSISTANT, content=[_text("hi")])])
    assert "messages[0].role" in _error(request).message


def test_assistant_last_is_a_prefill_and_allowed() -> None:
    request = _request(
        messages=[
            pb.Message(role=pb.ROLE_USER, content=[_text("Say hi")]),
            pb.Message(role=pb.ROLE_ASSISTANT, content=[_text("Hi")]),
        ]
    )
    validate_request(request, TABLE, DEPLOYED)


def test_empty_text_block() -> None:
    request = _request(messages=[pb.Message(role=pb.ROLE_USER, content=[_text("  ")])])
    assert "messages[0].content[0].text" in _error(request).message


def test_tool_result_without_earlier_tool_use() -> None:
    result = pb.ContentBlock(tool_result=pb.ToolResult(tool_use_id="toolu_1", content="42"))
    request = _request(messages=[pb.Message(role=pb.ROLE_USER, content=[result])])
    assert "tool_use_id" in _error(request).message


def test_tool_result_after_its_tool_use_passes() -> None:
    use = pb.ContentBlock(tool_use=pb.ToolUse(id="toolu_1", name="calc", input_json="{}"))
    result = pb.ContentBlock(tool_result=pb.ToolResult(tool_use_id="toolu_1", content="42"))
    request = _request(
        messages=[
            pb.Message(role=pb.ROLE_USER, content=[_text("compute")]),
            pb.Message(role=pb.ROLE_ASSISTANT, content=[use]),
            pb.Message(role=pb.ROLE_USER, content=[result]),
        ],
        tools=[pb.Tool(name="calc")],
    )
    validate_request(request, TABLE, DEPLOYED)


@pytest.mark.parametrize("max_tokens", [0, -1, 64001])
def test_max_tokens_out_of_range(max_tokens: int) -> None:
    assert _error(_request(max_tokens=max_tokens)).message.startswith("max_tokens:")


def test_unknown_model_is_not_found() -> None:
    """NOT_FOUND, as the providers answer an unknown model (404): an application's fallback
    on the SDK's NotFoundError fires through the HTTP front too."""
    error = _error(_request(model="gpt-17"))
    assert error.code == Code.NOT_FOUND
    assert error.message.startswith("model:") and "sim-small" in error.message


def test_a_model_of_the_table_that_is_not_deployed_is_unknown() -> None:
    with pytest.raises(RequestError) as info:
        validate_request(_request(model="sim-large"), TABLE, {"sim-small"})
    assert info.value.code == Code.NOT_FOUND


def test_more_than_four_breakpoints() -> None:
    system = [_text(f"part {i}", cache=True) for i in range(5)]
    error = _error(_request(system=system))
    assert error.message.startswith("cache_control:") and "got 5" in error.message


def test_four_breakpoints_pass() -> None:
    validate_request(
        _request(system=[_text(f"p{i}", cache=True) for i in range(4)]), TABLE, DEPLOYED
    )


def test_one_hour_breakpoint_after_five_minute_one() -> None:
    system = [
        _text("a", cache=True, ttl=pb.CACHE_TTL_5M),
        _text("b", cache=True, ttl=pb.CACHE_TTL_1H),
    ]
    assert "system[1].cache_control.ttl" in _error(_request(system=system)).message


@pytest.mark.parametrize("threshold", [-0.01, 1.01, float("nan")])
def test_threshold_outside_unit_interval(threshold: float) -> None:
    request = _request()
    request.cache.threshold = threshold
    assert _error(request).message.startswith("cache.threshold:")


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_threshold_bounds_are_valid(threshold: float) -> None:
    request = _request()
    request.cache.threshold = threshold
    validate_request(request, TABLE, DEPLOYED)


@pytest.mark.parametrize(
    ("model", "temperature", "allowed"),
    [
        ("sim-small", 2.0, True),  # the simulator takes either API's range
        ("gpt-4o", 2.0, True),  # OpenAI's range is [0, 2]
        ("auto", 1.5, True),  # the stack's tiers are simulated
        ("claude-haiku-4-5", 1.0, True),
        ("claude-haiku-4-5", 1.5, False),  # Anthropic's is [0, 1]
        ("gpt-4o", 2.5, False),
        ("sim-small", -0.1, False),
        ("sim-small", float("nan"), False),
    ],
)
def test_temperature_is_within_the_target_providers_range(
    model: str, temperature: float, allowed: bool
) -> None:
    """OpenAI's temperature range is [0, 2], Anthropic's [0, 1]: a value above 1 is refused
    only for a model of Anthropic (never clamped)."""
    request = _request(model=model, temperature=temperature)
    refused = _refusal(request, DEPLOYED | {"gpt-4o", "claude-haiku-4-5"}, allowed)
    if refused is None:
        return
    assert refused.message.startswith("temperature: must be within [0, ")
    if model.startswith("claude"):
        assert "[0, 1] for claude-haiku-4-5 (Anthropic" in refused.message


@pytest.mark.parametrize(
    ("model", "temperature", "allowed"),
    [
        ("gpt-5", 1.0, True),  # its default: OpenAI takes it
        ("gpt-5-mini", 0.5, False),
        ("gpt-5-nano", 0.0, False),
        ("gpt-5", 1.5, False),
        ("gpt-5-4", 0.2, True),  # reasoning effort "none" by default: it samples as asked
        ("gpt-4o", 0.2, True),
        ("llama-3-1-8b-vllm", 0.2, True),  # a self-hosted engine samples as asked
        ("claude-sonnet-5", 0.5, False),
        ("claude-opus-5", 0.0, False),
        ("claude-sonnet-5", 1.0, True),  # its default: Anthropic takes it
        ("claude-opus-5", 1.0, True),
        ("claude-sonnet-4-5", 0.5, True),  # thinks only when asked: it samples as asked
        ("claude-opus-4-5", 0.0, True),
    ],
)
def test_a_model_that_thinks_by_default_takes_its_default_temperature_only(
    model: str, temperature: float, allowed: bool
) -> None:
    """OpenAI's reasoning models and Claude Sonnet 5 and Opus 5 (the hosted rows that think by
    default) refuse a temperature but 1 with a 400 (OpenAI's "Only the default (1) value is
    supported", Anthropic's "`temperature` is deprecated for this model."): the Gateway
    refuses it first, naming the model and what to send, in no one provider's words. Before,
    it went to the provider (a call spent) and came back as its 400: for the Claude rows, 6 of
    6 taken (0, 0.5, 0.7 to each)."""
    request = _request(model=model, temperature=temperature)
    refused = _refusal(request, DEPLOYED | {model}, allowed)
    if refused is None:
        return
    if temperature > 1 and model.startswith("claude"):
        return  # over Anthropic's range, said first
    assert isinstance(refused, UnsupportedValue)  # its status details say so
    assert refused.message == (
        f"temperature: {model} takes only its default, 1 (its provider refuses any other value "
        f"for it); omit temperature or send 1, got {temperature}"
    )


def test_a_self_hosted_model_that_thinks_by_default_samples_as_asked() -> None:
    """A self-hosted engine's reasoning model takes any temperature in its range: the rule is
    the hosted providers'."""
    row = TABLE.models["llama-3-1-8b-vllm"].model_copy(update={"thinks_by_default": True})
    assert not row.default_temperature_only
    table = ModelTable(models={**TABLE.models, row.id: row}, auto=TABLE.auto)
    validate_request(_request(model=row.id, temperature=0.2), table, DEPLOYED | {row.id})


@pytest.mark.parametrize("tier", ["gpt-5", "claude-sonnet-5", "claude-opus-5"])
def test_auto_that_may_pick_a_model_that_thinks_by_default_takes_its_default_temperature_only(
    tier: str,
) -> None:
    """``auto`` whose tiers include a model that takes only its default temperature (an
    OpenAI reasoning model, Claude Sonnet 5 or Opus 5) answered a temperature of 0.5 or
    refused it (the provider's 400) by the tier it picked: it is refused whichever, as a
    value over 1 is when a tier is Anthropic's."""
    table = ModelTable(models=TABLE.models, auto={**TABLE.auto, "large": tier})
    with pytest.raises(UnsupportedValue) as info:
        validate_request(_request(model="auto", temperature=0.5), table, DEPLOYED)
    assert info.value.message.startswith(
        f"temperature: auto may pick {tier}, which takes only its default, 1 "
    )
    assert "or name a model that takes one, got 0.5" in info.value.message
    for fine in (1.0, None):
        request = _request(model="auto")
        if fine is not None:
            request.temperature = fine
        validate_request(request, table, DEPLOYED)


def _use(id_: str = "toolu_1", name: str = "calc", input_json: str = "{}") -> pb.ContentBlock:
    return pb.ContentBlock(tool_use=pb.ToolUse(id=id_, name=name, input_json=input_json))


def _result(id_: str = "toolu_1") -> pb.ContentBlock:
    return pb.ContentBlock(tool_result=pb.ToolResult(tool_use_id=id_, content="42"))


def _turns(*blocks: tuple[pb.Role.ValueType, pb.ContentBlock]) -> pb.CompleteRequest:
    messages = [pb.Message(role=pb.ROLE_USER, content=[_text("compute")])]
    messages += [pb.Message(role=role, content=[block]) for role, block in blocks]
    return _request(messages=messages, tools=[pb.Tool(name="calc")])


def test_a_tool_use_of_an_undeclared_tool_is_refused() -> None:
    request = _turns((pb.ROLE_ASSISTANT, _use(name="rm_rf")), (pb.ROLE_USER, _result()))
    error = _error(request)
    assert error.message.startswith("messages[1].content[0].tool_use.name: 'rm_rf' is not")


def test_a_tool_use_needs_its_result_in_the_next_user_message() -> None:
    request = _turns((pb.ROLE_ASSISTANT, _use()), (pb.ROLE_USER, _text("never mind")))
    error = _error(request)
    assert error.message.startswith(
        "messages[1].content[0].tool_use: 'toolu_1' has no tool_result in messages[2]"
    )


def test_a_request_ending_with_a_tool_use_is_refused() -> None:
    error = _error(_turns((pb.ROLE_ASSISTANT, _use())))
    assert "has no tool_result in the request (it ends with the call)" in error.message


def test_tool_use_only_in_assistant_messages() -> None:
    request = _turns((pb.ROLE_USER, _use()))
    assert "only assistant messages" in _error(request).message


def test_tool_result_only_in_user_messages() -> None:
    request = _turns((pb.ROLE_ASSISTANT, _use()), (pb.ROLE_ASSISTANT, _result()))
    assert "only user messages" in _error(request).message


def test_a_tool_use_answered_twice() -> None:
    request = _turns(
        (pb.ROLE_ASSISTANT, _use()), (pb.ROLE_USER, _result()), (pb.ROLE_USER, _result())
    )
    assert "already has a tool_result" in _error(request).message


def test_tool_use_input_must_be_a_json_object() -> None:
    request = _turns((pb.ROLE_ASSISTANT, _use(input_json="{not json")))
    assert "tool_use.input_json" in _error(request).message


def test_tool_schema_must_be_a_json_object_and_names_unique() -> None:
    bad_schema = _request(tools=[pb.Tool(name="a", input_schema_json="[1]")])
    assert "tools[0].input_schema_json" in _error(bad_schema).message
    twice = _request(tools=[pb.Tool(name="a"), pb.Tool(name="a")])
    assert "tools[1].name" in _error(twice).message


def test_unknown_semantic_mode() -> None:
    request = _request()
    request.cache.semantic = 99  # type: ignore[assignment]
    assert _error(request).message.startswith("cache.semantic:")


TOO_DEEP = "must be a JSON object nested at most 128 levels deep (objects and arrays), got one"


def test_a_deeply_nested_schema_is_invalid_not_an_internal_error() -> None:
    tool = pb.Tool(name="deep", input_schema_json="[" * 100_000)
    error = _error(_request(tools=[tool]))
    assert error.code == Code.INVALID_ARGUMENT
    assert error.message.startswith(f"tools[0].input_schema_json: {TOO_DEEP}")


def _nested(levels: int) -> str:
    """A JSON object ``levels`` deep (``{}`` is one), its innermost an array."""
    return '{"a": ' * (levels - 1) + "[1]" + "}" * (levels - 1)


def test_a_schema_or_tool_input_nested_deeper_than_any_sdk_encodes_is_refused() -> None:
    # ~970 levels parse here, but a provider SDK's encoder recursed deeper and failed: every
    # replica answered UNAVAILABLE "retry later" and logged a traceback
    assert json.loads(_nested(900))
    for deep in (_nested(129), _nested(900)):
        tools = _request(tools=[pb.Tool(name="t", input_schema_json=deep)])
        error = _error(tools)
        assert error.code == Code.INVALID_ARGUMENT
        assert error.message.startswith(f"tools[0].input_schema_json: {TOO_DEEP}")
        use = _turns((pb.ROLE_ASSISTANT, _use(input_json=deep)))
        assert TOO_DEEP in _error(use).message and "tool_use.input_json" in _error(use).message
    # 128 levels, and a shallow object with many brackets, pass
    validate_request(
        _request(tools=[pb.Tool(name="t", input_schema_json=_nested(128))]), TABLE, DEPLOYED
    )
    wide = json.dumps({"items": [[i] for i in range(500)], "text": "[[[[" * 100})
    validate_request(_request(tools=[pb.Tool(name="t", input_schema_json=wide)]), TABLE, DEPLOYED)


def test_a_schema_judged_once_is_judged_the_same_again() -> None:
    for _ in range(2):  # the second answer comes from the cache of parsed schemas
        error = _error(_request(tools=[pb.Tool(name="t", input_schema_json="[1]")]))
        assert error.message == "tools[0].input_schema_json: must be a JSON object, got list"


def test_a_huge_model_id_is_not_echoed_back() -> None:
    error = _error(_request(model="m" * 900_000))
    assert error.code == Code.NOT_FOUND
    assert error.message.startswith(
        "model: unknown model id '" + "m" * 64 + "'... (900,000 characters)"
    )
    assert len(error.message) < 300


def test_an_unknown_cache_ttl_is_refused_naming_the_field() -> None:
    block = _text("hi", cache=True, ttl=7)
    error = _error(_request(messages=[pb.Message(role=pb.ROLE_USER, content=[block])]))
    assert error.code == Code.INVALID_ARGUMENT
    assert error.message.startswith("messages[0].content[0].cache_control.ttl: unknown value 7")


def test_a_large_json_text_is_checked_but_never_held_by_the_verdict_cache() -> None:
    """The cache of JSON verdicts keeps small texts only: large ones would pin clients' text."""
    from services.router import validation

    cached = validation._cached_verdict
    cached.cache_clear()
    big = '{"a": "' + "x" * 40_000 + '"}'
    validate_request(_request(tools=[pb.Tool(name="t", input_schema_json=big)]), TABLE, DEPLOYED)
    assert cached.cache_info().currsize == 0
    small = '{"type": "object"}'
    validate_request(_request(tools=[pb.Tool(name="t", input_schema_json=small)]), TABLE, DEPLOYED)
    assert cached.cache_info().currsize == 1
    bad = "[" * 10 + "x" * 20_000
    request = _request(tools=[pb.Tool(name="t", input_schema_json=bad)])
    assert "must be a JSON object, got invalid JSON" in _error(request).message


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"maximum": NaN}', "NaN is not a JSON number"),
        ('{"maximum": Infinity}', "Infinity is not a JSON number"),
        ('{"minimum": -Infinity}', "-Infinity is not a JSON number"),
        ('{"maximum": 1e999}', "'1e999' is beyond the range of a double"),
        ('{"description": "cut \\ud83d"}', "lone UTF-16 surrogate escape"),
        ('{"description": "\\udc00 alone"}', "lone UTF-16 surrogate escape"),
    ],
)
def test_json_python_reads_but_the_providers_sdks_cannot_send_is_refused(
    text: str, why: str
) -> None:
    """Python's json reads these; the SDKs then refuse to encode the body (ValueError,
    UnicodeEncodeError), which the model replica took for its own failure."""
    standard = "must be standard JSON (no NaN/Infinity/lone surrogates): "
    for _ in range(2):  # the cached verdict is the same
        error = _error(_request(tools=[pb.Tool(name="t", input_schema_json=text)]))
        assert error.code == Code.INVALID_ARGUMENT
        assert error.message.startswith("tools[0].input_schema_json: " + standard), error.message
        assert why in error.message
    request = _turns((pb.ROLE_ASSISTANT, _use(input_json=text)), (pb.ROLE_USER, _result()))
    error = _error(request)
    assert error.message.startswith("messages[1].content[0].tool_use.input_json: " + standard)


def test_standard_json_with_a_surrogate_pair_and_big_numbers_passes() -> None:
    text = '{"description": "smile \\ud83d\\ude00", "maximum": 1e308, "n": ' + "9" * 400 + "}"
    validate_request(
        _request(tools=[pb.Tool(name="calc", input_schema_json=text)]), TABLE, DEPLOYED
    )
    validate_request(
        _turns((pb.ROLE_ASSISTANT, _use(input_json=text)), (pb.ROLE_USER, _result())),
        TABLE,
        DEPLOYED,
    )


def test_a_prompt_cache_key_is_at_most_openais_64_characters() -> None:
    """It was unbounded: a 500 KB key was accepted, kept in prefix-cache's scope of the
    prompt, and sent to OpenAI, which refuses a key over 64 characters."""
    request = _request()
    request.cache.prompt_cache_key = "k" * 64
    validate_request(request, TABLE, DEPLOYED)
    request.cache.prompt_cache_key = "k" * 500_000
    error = _error(request)
    assert error.code == Code.INVALID_ARGUMENT
    assert error.message == (
        "cache.prompt_cache_key: at most 64 characters (OpenAI's limit), got 500,000"
    )


@pytest.mark.parametrize(
    ("model", "refused"),
    [
        ("gpt-4o", True),  # OpenAI's API has no prefill
        ("claude-haiku-4-5", False),  # Anthropic's continues it
        ("sim-small", False),
        ("auto", False),  # the stack's tiers are simulated
        # vLLM's chat API answers a trailing assistant message anew (without the
        # continue_final_message the adapter does not send); llama-server continues it
        ("llama-3-1-8b-vllm", True),
        ("local-small", False),
    ],
)
def test_a_prefill_to_a_model_that_does_not_continue_it_is_refused(
    model: str, refused: bool
) -> None:
    """A last assistant message is a prefill the answer continues; OpenAI's model (and vLLM's
    chat API) answers a new message after it instead: a prefill of "{" came back as an answer
    not continuing it. The row's ``takes_prefill`` says which (default by provider)."""
    request = _request(
        model=model,
        messages=[
            pb.Message(role=pb.ROLE_USER, content=[_text("JSON please")]),
            pb.Message(role=pb.ROLE_ASSISTANT, content=[_text("{")]),
        ],
    )
    deployed = DEPLOYED | {"gpt-4o", "claude-haiku-4-5", "llama-3-1-8b-vllm", "local-small"}
    refusal = _refusal(request, deployed, not refused)
    if refusal is None:
        return
    assert refusal.message.startswith("messages[1]: a last assistant message (a prefill")
    assert model in refusal.message
    if model == "gpt-4o":
        assert "its API has no prefill" in refusal.message
    else:  # an operator's engine: "its API has no prefill" was wrong for a llama-server row
        assert "its API has no prefill" not in refusal.message
        assert "sets `takes_prefill = true` in its row of the model table" in refusal.message


def test_a_prefill_to_auto_is_refused_when_a_tier_is_openais() -> None:
    table = load_model_table()
    table.auto["large"] = "gpt-4o"
    request = _request(
        model="auto",
        messages=[
            pb.Message(role=pb.ROLE_USER, content=[_text("JSON please")]),
            pb.Message(role=pb.ROLE_ASSISTANT, content=[_text("{")]),
        ],
    )
    with pytest.raises(RequestError) as info:
        validate_request(request, table, DEPLOYED | {"gpt-4o"})
    assert "auto, which may pick gpt-4o" in info.value.message


def test_a_rows_takes_prefill_overrides_its_providers_default() -> None:
    """An operator's models file says an engine continues a prefill (or does not): a vLLM row
    the adapter's deployment continues, a llama-server row that does not."""
    table = load_model_table()
    table.models["llama-3-1-8b-vllm"] = table.models["llama-3-1-8b-vllm"].model_copy(
        update={"takes_prefill": True}
    )
    table.models["sim-small"] = table.models["sim-small"].model_copy(
        update={"takes_prefill": False}
    )
    messages = [
        pb.Message(role=pb.ROLE_USER, content=[_text("JSON please")]),
        pb.Message(role=pb.ROLE_ASSISTANT, content=[_text("{")]),
    ]
    deployed = DEPLOYED | {"llama-3-1-8b-vllm"}
    validate_request(_request(model="llama-3-1-8b-vllm", messages=messages), table, deployed)
    with pytest.raises(RequestError) as info:
        validate_request(_request(model="auto", messages=messages), table, deployed)
    assert "auto, which may pick sim-small" in info.value.message


def _with_tool(model: str, name: str) -> pb.CompleteRequest:
    return _request(model=model, tools=[pb.Tool(name=name, input_schema_json='{"type": "object"}')])


@pytest.mark.parametrize(
    ("model", "name", "limit"),
    [
        ("claude-sonnet-4-5", "get.weather", 128),
        ("claude-sonnet-4-5", "get weather", 128),
        ("claude-sonnet-4-5", "x" * 129, 128),
        ("gpt-4o", "functions.calc", 64),
        ("gpt-4o", "x" * 65, 64),
        ("gpt-4o", "météo", 64),
    ],
)
def test_a_tool_name_the_rows_provider_refuses_is_refused_before_it_is_sent(
    model: str, name: str, limit: int
) -> None:
    """Anthropic's and OpenAI's APIs refuse such a name (their 400 came back late, after the
    cache lookup and the provider's round trip): refused here, naming the tool and the rule."""
    deployed = DEPLOYED | {model}
    refusal = _refusal(_with_tool(model, name), deployed, allowed=False)
    assert refusal is not None
    assert refusal.message.startswith("tools[0].name: ")
    assert f"{model}'s provider takes" in refusal.message
    assert f"^[a-zA-Z0-9_-]{{1,{limit}}}$" in refusal.message


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("claude-sonnet-4-5", "get_weather-2"),
        ("claude-sonnet-4-5", "x" * 128),  # the API's own pattern since mid-2025
        ("gpt-4o", "x" * 64),
        ("llama-3-1-8b-vllm", "functions.calc"),  # a self-hosted engine takes it
        ("llama-3-1-8b-vllm", "x" * 200),
        ("sim-small", "get weather"),
    ],
)
def test_a_tool_name_the_rows_provider_takes_passes(model: str, name: str) -> None:
    _refusal(_with_tool(model, name), DEPLOYED | {model}, allowed=True)


def test_a_tool_name_to_auto_is_refused_when_a_tier_refuses_it() -> None:
    table = load_model_table()
    table.auto["large"] = "claude-sonnet-4-5"
    deployed = DEPLOYED | {"claude-sonnet-4-5"}
    with pytest.raises(RequestError) as info:
        validate_request(_with_tool("auto", "mcp.search"), table, deployed)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert "auto may pick claude-sonnet-4-5" in info.value.message
    validate_request(_with_tool("auto", "mcp_search"), table, deployed)
    validate_request(_with_tool("auto", "mcp.search"), TABLE, DEPLOYED)  # simulated tiers


def _with_schema(model: str, schema: object) -> pb.CompleteRequest:
    tools = [
        pb.Tool(name="calc", input_schema_json='{"type": "object"}'),
        pb.Tool(name="plan", input_schema_json=json.dumps(schema)),
    ]
    return _request(model=model, tools=tools)


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "gpt-4o"])
@pytest.mark.parametrize(
    ("schema", "where", "hint"),
    [
        ({"type": "dict", "properties": {}}, "type: 'dict'", "(for 'dict', use object)"),
        ({"type": "object", "properties": {"x": {"type": "float"}}}, "properties['x'].type",
         "number"),
        ({"type": "object", "properties": {"x": {"type": "tuple", "items": {}}}}, "", "array"),
        ({"type": "object", "properties": {"x": {"type": "any"}}}, "", "leave type out"),
        ({"type": "object", "properties": {"x": {"type": "array", "items": {"type": "float"}}}},
         "properties['x'].items.type", "number"),
        ({"type": "object", "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "int"}]}}},
         "properties['x'].anyOf[1].type", "integer"),
        ({"type": "object", "properties": {"x": {"type": ["string", "string"]}}}, "", ""),
        ({"type": "object", "properties": {"x": {"type": []}}}, "", ""),
        ({"type": "object", "properties": {"x": {"type": 3}}}, "properties['x'].type: 3 ", ""),
    ],
)  # fmt: skip
def test_a_tool_schema_type_the_rows_provider_refuses_is_refused_before_it_is_sent(
    model: str, schema: object, where: str, hint: str
) -> None:
    """OpenAI's and Anthropic's APIs take a tool's schema as JSON Schema and refuse a type it
    has not (BFCL's ``dict``, ``float``, ``tuple``, ``any``: every hosted row passed them to the
    provider, 17 of 17): refused here, naming the tool, the field and the model."""
    refusal = _refusal(_with_schema(model, schema), DEPLOYED | {model}, allowed=False)
    assert refusal is not None
    assert refusal.message.startswith("tools[1].input_schema_json: tool 'plan': ")
    assert where in refusal.message and hint in refusal.message
    assert "is not a JSON Schema type" in refusal.message
    assert f"{model}'s provider takes a tool's schema as JSON Schema" in refusal.message


@pytest.mark.parametrize(
    ("model", "schema"),
    [
        ("gpt-4o", {"type": "object", "properties": {"x": {"type": ["string", "null"]}}}),
        ("gpt-4o", {"type": "object", "properties": {"x": {"description": "any value"}}}),
        # data, not a schema: a default's or an enum's keys are not looked at
        ("claude-sonnet-4-5", {"type": "object", "properties": {"x": {
            "type": "object", "default": {"type": "dict"}, "enum": [{"type": "float"}]}}}),
        ("claude-sonnet-4-5", {"type": "object", "properties": {"type": {"type": "string"}}}),
        ("llama-3-1-8b-vllm", {"type": "dict"}),  # a self-hosted engine is not held to it
        ("sim-small", {"type": "dict"}),
    ],
)  # fmt: skip
def test_a_tool_schema_the_rows_provider_takes_passes(model: str, schema: object) -> None:
    _refusal(_with_schema(model, schema), DEPLOYED | {model}, allowed=True)


def test_a_tool_schema_type_to_auto_is_refused_when_a_tier_refuses_it() -> None:
    table = load_model_table()
    table.auto["large"] = "gpt-4o"
    deployed = DEPLOYED | {"gpt-4o"}
    with pytest.raises(RequestError) as info:
        validate_request(_with_schema("auto", {"type": "dict"}), table, deployed)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert "auto may pick gpt-4o" in info.value.message
    validate_request(_with_schema("auto", {"type": "object"}), table, deployed)
    validate_request(_with_schema("auto", {"type": "dict"}), TABLE, DEPLOYED)  # simulated tiers


_WEATHER = pb.Tool(
    name="get_weather",
    input_schema_json='{"type": "object", "properties": {"city": {"type": "string"}}}',
)
_CALLED = [
    pb.Message(role=pb.ROLE_USER, content=[_text("Weather in Paris?")]),
    pb.Message(
        role=pb.ROLE_ASSISTANT,
        content=[
            pb.ContentBlock(
                tool_use=pb.ToolUse(id="call_1", name="get_weather", input_json='{"city": "P"}')
            )
        ],
    ),
    pb.Message(
        role=pb.ROLE_USER,
        content=[pb.ContentBlock(tool_result=pb.ToolResult(tool_use_id="call_1", content="21C"))],
    ),
]


@pytest.mark.parametrize(
    ("model", "refused"),
    [
        ("sim-small", False),
        ("llama-3-1-8b-vllm", False),  # an engine's row takes tools unless it says not
        # llama-server serving SmolLM2: its chat template has no tools (/props: supports_tools
        # false); the engine dropped them without a word, answering as if there were none
        ("local-small", True),
        ("local-large", True),
    ],
)
@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"tools": [_WEATHER]}, "tools"),
        # a conversation's tool call and result: the call was sent as an empty assistant turn
        ({"tools": [_WEATHER], "messages": _CALLED}, "tools"),
    ],
)
def test_tools_to_a_model_not_given_them_are_refused_naming_the_field(
    model: str, refused: bool, fields: dict[str, object], where: str
) -> None:
    request = _request(model=model, **fields)
    deployed = DEPLOYED | {"llama-3-1-8b-vllm", "local-small", "local-large"}
    refusal = _refusal(request, deployed, not refused)
    if refusal is None:
        return
    assert refusal.message.startswith(f"{where}: tools and tool calls are not supported by")
    assert model in refusal.message and "`takes_tools = true`" in refusal.message
    assert "without their tool_use / tool_result blocks too" in refusal.message


def test_tools_to_auto_are_refused_when_a_tier_does_not_take_them() -> None:
    """``up --local-engine`` puts both of auto's tiers on llama-server rows."""
    table = load_model_table()
    table.auto["large"] = "local-large"
    request = _request(model="auto", tools=[_WEATHER])
    with pytest.raises(RequestError) as info:
        validate_request(request, table, DEPLOYED | {"local-large"})
    assert info.value.code == Code.INVALID_ARGUMENT
    assert "auto, which may pick local-large" in info.value.message
    validate_request(request, TABLE, DEPLOYED)  # the simulated tiers take tools


def test_a_rows_takes_tools_says_whether_its_engine_is_given_tools() -> None:
    """An operator serving a model whose chat template takes tools sets it true."""
    table = load_model_table()
    table.models["local-small"] = table.models["local-small"].model_copy(
        update={"takes_tools": True}
    )
    validate_request(_request(model="local-small", tools=[_WEATHER]), table, {"local-small"})


def _described(model: str, description: str) -> pb.CompleteRequest:
    tool = pb.Tool(name="get", description=description, input_schema_json='{"type": "object"}')
    return _request(model=model, tools=[tool])


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-5-mini"])
def test_a_tool_description_over_openais_limit_is_refused_before_it_is_sent(model: str) -> None:
    """OpenAI refuses a function description over 1,024 characters (its 400 came back after
    the cache lookup and a provider round trip): refused here, naming the tool and the limit."""
    deployed = DEPLOYED | {model}
    _refusal(_described(model, "d" * 1024), deployed, allowed=True)
    refusal = _refusal(_described(model, "d" * 1025), deployed, allowed=False)
    assert refusal is not None
    assert refusal.message.startswith("tools[0].description: 1,025 characters, over what ")
    assert f"{model}'s provider takes (1,024 characters at most)" in refusal.message


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "llama-3-1-8b-vllm", "sim-small"])
def test_a_long_tool_description_goes_where_the_provider_takes_it(model: str) -> None:
    _refusal(_described(model, "d" * 5000), DEPLOYED | {model}, allowed=True)


def test_a_long_tool_description_to_auto_is_refused_when_a_tier_refuses_it() -> None:
    table = load_model_table()
    table.auto["large"] = "gpt-4o"
    deployed = DEPLOYED | {"gpt-4o"}
    with pytest.raises(RequestError) as info:
        validate_request(_described("auto", "d" * 2000), table, deployed)
    assert "auto may pick gpt-4o" in info.value.message
    validate_request(_described("auto", "d" * 1024), table, deployed)
    validate_request(_described("auto", "d" * 2000), TABLE, DEPLOYED)  # simulated tiers


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "object", "propertyNames": {"type": "str"}}, "propertyNames.type"),
        ({"type": "object", "dependentSchemas": {"a": {"type": "dict"}}},
         "dependentSchemas['a'].type"),
        ({"type": "object", "unevaluatedProperties": {"type": "float"}},
         "unevaluatedProperties.type"),
        ({"type": "array", "prefixItems": [{"type": "string"}], "unevaluatedItems": {
            "type": "int"}}, "unevaluatedItems.type"),
        ({"type": "array", "items": [{"type": "string"}], "additionalItems": {"type": "int"}},
         "additionalItems.type"),
    ],
)  # fmt: skip
def test_every_keyword_holding_a_schema_is_walked_as_the_loopback_servers_walk_it(
    schema: object, where: str
) -> None:
    """``propertyNames`` and ``dependentSchemas`` passed the router and were refused by the
    loopback servers (their walker had them); ``unevaluated*`` neither walked. One keyword list
    (``cachemesh.json_schema``) for both: each is refused here, and there."""
    from tests.providers.schema_types import bad_type

    refusal = _refusal(_with_schema("gpt-4o", schema), DEPLOYED | {"gpt-4o"}, allowed=False)
    assert refusal is not None
    assert f"tool 'plan': {where}: " in refusal.message
    assert bad_type(schema) is not None


def test_a_tool_schema_is_read_once_per_request_for_both_its_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A schema over the verdict cache's size was parsed twice per request to an OpenAI or
    Anthropic row (once for "a JSON object", again for its types); a small one went through
    two caches (its text hashed and held twice). Now read once, one cache."""
    from services.common import strict_json
    from services.router import validation

    reads: list[str] = []
    loads = strict_json.loads

    def counted(text: str) -> object:
        reads.append(text)
        return loads(text)

    monkeypatch.setattr(strict_json, "loads", counted)
    big = json.dumps({"type": "object", "description": "x" * 40_000})
    request = _with_schema("gpt-4o", {"type": "object"})
    request.tools[1].input_schema_json = big
    validate_request(request, TABLE, DEPLOYED | {"gpt-4o"})
    assert reads.count(big) == 1
    cache = validation._cached_verdict
    cache.cache_clear()
    small = _with_schema("gpt-4o", {"type": "object", "properties": {}})
    validate_request(small, TABLE, DEPLOYED | {"gpt-4o"})
    assert cache.cache_info().currsize == 2  # the two tools' schemas, once each
    assert cache.cache_info().hits == 0
    assert [name for name in dir(validation) if name.startswith("_cached")] == ["_cached_verdict"]
