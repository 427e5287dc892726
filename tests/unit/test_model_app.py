"""The model replica's configuration and its process wiring (serve on loopback, then stop)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2, model_pb2_grpc
from services.common.auth import internal_metadata
from services.common.env import ConfigError
from services.common.tokens import load_cl100k
from services.model.app import serve
from services.model.kv_cache import KvBlockCache
from services.model.settings import ModelSettings
from services.model.wiring import build_engine
from services.tools.stack.ports import free_port

TOKEN = "internal-token-for-tests-0123456789"


def test_defaults() -> None:
    settings = ModelSettings.from_env({"CACHEMESH_INTERNAL_TOKEN": TOKEN})
    assert settings.server.listen == "127.0.0.1:50054"
    assert settings.replica_id == "127.0.0.1:50054"
    assert list(settings.models) == ["sim-small", "sim-large"]
    assert settings.time_scale == 1.0
    assert settings.kv_capacity_blocks == 65536


def test_overrides() -> None:
    settings = ModelSettings.from_env(
        {
            "CACHEMESH_INTERNAL_TOKEN": TOKEN,
            "MODEL_LISTEN": "127.0.0.1:6000",
            "MODEL_IDS": " sim-large ",
            "MODEL_REPLICA_ID": "large-0",
            "SIM_TIME_SCALE": "0",
            "MODEL_KV_CAPACITY_BLOCKS": "8",
        }
    )
    assert (settings.replica_id, list(settings.models)) == ("large-0", ["sim-large"])
    assert (settings.time_scale, settings.kv_capacity_blocks) == (0.0, 8)


def test_a_zero_kv_capacity_is_an_engine_without_a_prefix_cache() -> None:
    # the README's ">= 0": 0 is a valid setting, not a bad one
    settings = ModelSettings.from_env(
        {"CACHEMESH_INTERNAL_TOKEN": TOKEN, "MODEL_KV_CAPACITY_BLOCKS": "0"}
    )
    assert settings.kv_capacity_blocks == 0
    assert KvBlockCache(settings.kv_capacity_blocks).capacity_blocks == 0


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"CACHEMESH_INTERNAL_TOKEN": ""}, "CACHEMESH_INTERNAL_TOKEN"),
        ({"MODEL_IDS": "sim-small,gpt-9"}, "MODEL_IDS"),
        ({"MODEL_IDS": "sim-small,,sim-large"}, "MODEL_IDS"),
        ({"SIM_TIME_SCALE": "-1"}, "SIM_TIME_SCALE"),
        ({"SIM_TIME_SCALE": "fast"}, "SIM_TIME_SCALE"),
        ({"MODEL_KV_CAPACITY_BLOCKS": "-1"}, "MODEL_KV_CAPACITY_BLOCKS"),
        ({"MODEL_LISTEN": "nowhere"}, "MODEL_LISTEN"),
        ({"MODEL_METRICS_LISTEN": "9104"}, "MODEL_METRICS_LISTEN"),
        ({"CACHEMESH_METRICS_MAX_TENANTS": "-1"}, "CACHEMESH_METRICS_MAX_TENANTS"),
        ({"CACHEMESH_MODELS_FILE": "/no/such/models.toml"}, "CACHEMESH_MODELS_FILE"),
        ({"CACHEMESH_MODELS_FILE": "/dev/null"}, "CACHEMESH_MODELS_FILE"),
    ],
)
def test_bad_configuration_fails_fast_naming_the_variable(
    overrides: dict[str, str], names: str
) -> None:
    with pytest.raises(ConfigError, match=names):
        ModelSettings.from_env({"CACHEMESH_INTERNAL_TOKEN": TOKEN, **overrides})


def test_a_bad_models_file_is_one_line_naming_the_variable() -> None:
    """A table that does not validate was pydantic's several lines (a URL each), and a
    missing one named the path but not the variable."""
    with pytest.raises(ConfigError) as err:
        ModelSettings.from_env(
            {"CACHEMESH_INTERNAL_TOKEN": TOKEN, "CACHEMESH_MODELS_FILE": "/dev/null"}
        )
    assert str(err.value) == (
        "CACHEMESH_MODELS_FILE: model table /dev/null: models: Field required; auto: Field required"
    )


def test_a_models_file_not_in_utf8_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    """It was a traceback (UnicodeDecodeError), not the one line a bad setting gets."""
    table = tmp_path / "models.toml"
    table.write_bytes("# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        ModelSettings.from_env(
            {"CACHEMESH_INTERNAL_TOKEN": TOKEN, "CACHEMESH_MODELS_FILE": str(table)}
        )
    assert str(err.value) == (
        f"CACHEMESH_MODELS_FILE: model table {table}: not UTF-8 (byte 5): save it as UTF-8"
    )


async def _wait_serving(channel: grpc.aio.Channel, server: asyncio.Task[None]) -> None:
    """Until SERVING; the server's own error as soon as it has stopped, and each check within
    its deadline (without one a check the server never answers waited for ever)."""
    health: Any = health_pb2_grpc.HealthStub(channel)  # grpc_health ships no stub types
    for _ in range(200):
        if server.done():
            server.result()  # its error, if it failed
            raise AssertionError("the model replica stopped before it was SERVING")
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the model replica never became SERVING")


async def test_serve_answers_then_stops() -> None:
    address = f"127.0.0.1:{free_port()}"
    environ = {
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "MODEL_LISTEN": address,
        "MODEL_METRICS_LISTEN": "127.0.0.1:0",  # any free port
        "MODEL_IDS": "sim-small",
        "SIM_TIME_SCALE": "0",
        "OTEL_TRACES_EXPORTER": "none",
        "CACHEMESH_GRACE_S": "0",
    }
    stop = asyncio.Event()
    server = asyncio.create_task(serve(environ, stop))
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await _wait_serving(channel, server)
            request = pb.CompleteRequest(
                messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hi")])],
                max_tokens=200,
            )
            call = model_pb2_grpc.ModelStub(channel).Generate(
                model_pb2.GenerateRequest(tenant="t", model="sim-small", request=request),
                metadata=internal_metadata(TOKEN),
                timeout=30,
            )
            chunks = [chunk async for chunk in call]
        assert chunks[0].start.replica == address
        # this process's run of its engine (its KV cache dies with it), for prefix-cache to
        # see a restart (``GenerateStart.engine_instance``): a uuid4 drawn at the start
        assert len(chunks[0].start.engine_instance) == 32, chunks[0].start
        assert chunks[-1].end.stop_reason == "end_turn"
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=10)


def test_the_engine_keeps_the_kv_cache_it_is_given() -> None:
    """An empty cache is falsy (it has a length): ``kv_cache or ...`` made another one, so the
    cache the service held was never the engine's."""
    settings = ModelSettings.from_env({"CACHEMESH_INTERNAL_TOKEN": TOKEN, "SIM_TIME_SCALE": "0"})
    given = KvBlockCache(settings.kv_capacity_blocks)
    engine = build_engine(settings, load_cl100k(), given)
    request = pb.CompleteRequest(max_tokens=4)
    request.messages.add(role=pb.ROLE_USER).content.add(text="word " * 40)

    async def prefill() -> None:
        async for _ in engine.run(engine.prepare("t", "sim-small", request)):
            pass

    asyncio.run(prefill())
    assert len(given) > 0  # the prompt's blocks went into the cache given


async def _start_up_lines(openai_env: dict[str, str]) -> list[str]:
    """What an openai-backend model service logs as it starts, then stops at once."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("cachemesh.model")
    logger.addHandler(handler)
    stop = asyncio.Event()
    stop.set()  # start, log, stop at once
    environ = {
        "CACHEMESH_INTERNAL_TOKEN": TOKEN,
        "MODEL_BACKEND": "openai",
        "MODEL_IDS": "local-small",
        "MODEL_LISTEN": f"127.0.0.1:{free_port()}",
        "MODEL_METRICS_LISTEN": "127.0.0.1:0",
        "OTEL_TRACES_EXPORTER": "none",
        "CACHEMESH_GRACE_S": "0",
        **openai_env,
    }
    try:
        await asyncio.wait_for(serve(environ, stop), timeout=30)
    finally:
        logger.removeHandler(handler)
    return lines


async def test_the_start_up_line_never_shows_the_base_urls_password() -> None:
    """``OPENAI_BASE_URL=http://user:password@host/v1`` (an engine behind basic auth) was
    logged whole at start-up."""
    base = "http://vllm:S3cretPassw0rd@127.0.0.1:9/v1?token=Q"
    said = "\n".join(await _start_up_lines({"OPENAI_BASE_URL": base}))
    assert "http://vllm:***@127.0.0.1:9/v1" in said, said
    assert "S3cretPassw0rd" not in said and "token=Q" not in said


async def test_the_start_up_line_names_the_upstream_models_it_sends() -> None:
    """With ``MODEL_UPSTREAM_IDS=local-small=SmolLM2-135M-Instruct`` the line said
    ``serves local-small=local-small``: the override was applied only later, by the adapter."""
    lines = await _start_up_lines(
        {
            "MODEL_UPSTREAM_IDS": "local-small=SmolLM2-135M-Instruct",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        }
    )
    (line,) = [line for line in lines if "adapter: replica" in line]
    assert "serves local-small=SmolLM2-135M-Instruct through" in line, line
