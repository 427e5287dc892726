"""The shared bootstrap: health follows readiness, a failed warm-up closes the server."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import sys

import grpc
import pytest

from services.common.env import ConfigError, Env
from services.common.server import ServerSettings, ServiceSpec, run_every, run_service
from services.tools.stack.health import UNREACHABLE, probe
from services.tools.stack.ports import free_port
from services.tools.stack.service_table import SERVICES


def _spec(port: int, warmup: asyncio.Event | None, fail: bool = False) -> ServiceSpec:
    async def warm() -> None:
        if warmup is not None:
            await warmup.wait()
        if fail:
            raise RuntimeError("model file is corrupt")

    return ServiceSpec(
        name="test",
        settings=ServerSettings(f"127.0.0.1:{port}", grace_s=0.5, max_message_bytes=1 << 20),
        service_names=["test.v1.Nothing"],
        register=lambda server: None,
        warmup=warm,
    )


async def _status(port: int) -> str:
    return await asyncio.to_thread(probe, f"127.0.0.1:{port}", 2.0)


async def _settle(port: int, wanted: str) -> str:
    """The status once it is ``wanted`` (or whatever it is after 5 s)."""
    status = UNREACHABLE
    for _ in range(100):
        status = await _status(port)
        if status == wanted:
            break
        await asyncio.sleep(0.05)
    return status


async def test_not_serving_until_warm_then_serving_then_stops() -> None:
    port, ready, stop = free_port(), asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_service(_spec(port, ready), stop))
    assert await _settle(port, "NOT_SERVING") == "NOT_SERVING"
    ready.set()
    assert await _settle(port, "SERVING") == "SERVING"
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_a_failed_warmup_raises_and_leaves_no_server_listening() -> None:
    port = free_port()
    with pytest.raises(RuntimeError, match="corrupt"):
        await asyncio.wait_for(run_service(_spec(port, None, fail=True)), 10)
    assert await _status(port) == UNREACHABLE


def test_a_bad_configuration_is_one_line_naming_the_variable_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.router"],
        env={"PATH": "/usr/bin:/bin", "MODEL_REPLICAS": "not-a-pair"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "router: configuration error: MODEL_REPLICAS: expected model=host:port, got 'not-a-pair'"
    ]


@pytest.mark.parametrize("module", sorted({s.module for s in SERVICES}))
def test_every_services_main_makes_a_bad_setting_one_line_and_exit_2(module: str) -> None:
    # semantic-cache's main once ran serve bare: a 30-line traceback and exit 1
    result = subprocess.run(
        [sys.executable, "-m", module],
        env={"PATH": "/usr/bin:/bin", "CACHEMESH_LOG_LEVEL": "loud"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert ": configuration error: CACHEMESH_LOG_LEVEL must be one of " in lines[0], lines[0]


async def test_a_port_in_use_is_a_configuration_error_naming_the_variable() -> None:
    # grpcio raises RuntimeError where it once returned 0: a traceback, the variable unnamed
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        spec = _spec(port, None)
        named = dataclasses.replace(spec.settings, listen_name="ROUTER_LISTEN")
        with pytest.raises(ConfigError, match=f"ROUTER_LISTEN=127.0.0.1:{port}: test cannot"):
            await run_service(dataclasses.replace(spec, settings=named), asyncio.Event())


@pytest.mark.parametrize(
    ("listen", "why"),
    [("a b:80", "whitespace"), ("http://127.0.0.1:80", "no scheme"), ("::1:80", "brackets")],
)
async def test_a_malformed_listen_address_says_what_is_wrong_with_it(listen: str, why: str) -> None:
    # it was blamed on "the port is in use, or the address is not this machine's"
    spec = _spec(0, None)
    named = dataclasses.replace(spec.settings, listen=listen, listen_name="ROUTER_LISTEN")
    with pytest.raises(ConfigError) as caught:
        await run_service(dataclasses.replace(spec, settings=named), asyncio.Event())
    assert str(caught.value).startswith(f"ROUTER_LISTEN={listen!r}: test cannot listen there")
    assert why in str(caught.value) and "in use" not in str(caught.value)


async def test_a_port_another_grpc_server_holds_is_a_configuration_error() -> None:
    # grpcio sets SO_REUSEPORT by default: a second replica on the same MODEL_LISTEN (or a
    # typo giving two services one address) listened beside the first, the kernel splitting
    # new connections between them, and both reported SERVING
    holder = grpc.aio.server(options=[("grpc.so_reuseport", 1)])  # grpcio's default on Linux
    port = holder.add_insecure_port("127.0.0.1:0")
    await holder.start()
    try:
        spec = _spec(port, None)
        named = dataclasses.replace(spec.settings, listen_name="MODEL_LISTEN")
        stopped = asyncio.Event()
        stopped.set()  # a server that did start stops at once: the test fails, not hangs
        with pytest.raises(ConfigError, match=f"MODEL_LISTEN=127.0.0.1:{port}: test cannot"):
            await run_service(dataclasses.replace(spec, settings=named), stopped)
    finally:
        await holder.stop(0)


def test_a_message_size_over_grpcs_limit_is_refused_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="CACHEMESH_MAX_MESSAGE_BYTES"):
        ServerSettings.from_env(
            Env({"CACHEMESH_MAX_MESSAGE_BYTES": str(2**32)}), "ROUTER", "127.0.0.1:0"
        )
    settings = ServerSettings.from_env(Env({}), "ROUTER", "127.0.0.1:0")
    assert settings.listen_name == "ROUTER_LISTEN"


async def test_every_stop_step_runs_though_one_failed_and_the_first_failure_is_raised() -> None:
    # the router's shutdown: a Redis connection that fails to close must not skip the
    # billing outbox's last flush
    ran: list[str] = []

    async def close_redis() -> None:
        ran.append("redis")
        raise ConnectionError("Connection reset by peer")

    async def flush_outbox() -> None:
        ran.append("outbox")

    async def save() -> None:
        ran.append("save")
        raise OSError(28, "No space left on device")

    with pytest.raises(ConnectionError):
        await run_every([close_redis, flush_outbox, save], "router stop")
    assert ran == ["redis", "outbox", "save"]


async def test_the_metrics_port_answers_readyz_as_the_health_does() -> None:
    # plaintext whatever the service port speaks: compose's health check of a TLS Gateway
    from services.common.metrics import MetricsEndpoint, MetricsSettings, new_registry
    from services.tools.stack.health import probe_http

    port, metrics_port, ready, stop = free_port(), free_port(), asyncio.Event(), asyncio.Event()
    endpoint = MetricsEndpoint(
        MetricsSettings(f"127.0.0.1:{metrics_port}", "X_METRICS_LISTEN", 1), new_registry()
    )
    settings = ServerSettings(
        f"127.0.0.1:{port}", grace_s=5.0, max_message_bytes=1 << 20, refusal_s=2.0
    )
    spec = dataclasses.replace(_spec(port, ready), settings=settings, metrics=endpoint)
    task = asyncio.create_task(run_service(spec, stop))

    async def readyz(wanted: str) -> str:
        status = UNREACHABLE
        for _ in range(100):
            status = await asyncio.to_thread(probe_http, f"127.0.0.1:{metrics_port}", 2.0)
            if status == wanted:
                break
            await asyncio.sleep(0.05)
        return status

    assert await readyz("NOT_SERVING") == "NOT_SERVING"  # warming up
    ready.set()
    assert await _settle(port, "SERVING") == "SERVING"
    assert await readyz("SERVING") == "SERVING"
    stop.set()
    assert await readyz("NOT_SERVING") == "NOT_SERVING"  # draining (the refusal window)
    await asyncio.wait_for(task, 10)


def _big_answers(server: grpc.aio.Server) -> None:
    async def get(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"x" * (2 << 20)  # a 2 MiB answer to a small request

    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
        get
    )  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.v1.Big", {"Get": handler}),)
    )


async def test_answers_go_out_under_the_send_limit_requests_in_under_the_receive_limit() -> None:
    """The router receives less than it sends (twice ROUTER_MAX_REQUEST_BYTES; 1 MiB here)
    but must send answers up to CACHEMESH_MAX_MESSAGE_BYTES: one limit for both refused every
    L1 hit of an answer over 1 MiB (RESOURCE_EXHAUSTED, a 413 at the HTTP front), on every
    ask."""
    port, stop = free_port(), asyncio.Event()
    settings = ServerSettings(
        f"127.0.0.1:{port}", grace_s=0.5, max_message_bytes=1 << 20, max_send_bytes=4 << 20
    )
    spec = ServiceSpec("test", settings, ["test.v1.Big"], _big_answers)
    task = asyncio.create_task(run_service(spec, stop))
    try:
        await _settle(port, "SERVING")
        options = [
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20),
        ]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            get: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/test.v1.Big/Get"
            )
            assert len(await get(b"small", timeout=10)) == 2 << 20
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await get(b"y" * (2 << 20), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_the_router_sends_under_the_services_message_limit_not_its_request_limit() -> None:
    from services.common.models import load_model_table
    from services.router.settings import RouterSettings

    env = Env(
        {
            "MODEL_REPLICAS": "sim-small=127.0.0.1:50054,sim-large=127.0.0.1:50055",
            "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
            "CACHEMESH_API_KEYS_FILE": "/dev/null",
            "ROUTER_MAX_REQUEST_BYTES": str(1 << 20),
        }
    )
    router = RouterSettings.from_env(env, load_model_table())
    # gRPC reads up to twice the request limit (the router refuses those between itself)
    assert router.max_request_bytes == 1 << 20 and router.server.max_message_bytes == 2 << 20
    assert router.server.send_limit == 4 << 20
