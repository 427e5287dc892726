"""How the Python client's calls wait for the Gateway, against fake Gateways (real gRPC servers
in this process, plaintext and TLS): a channel that has never reached the Gateway (a wrong CA,
plaintext to TLS, TLS to plaintext) fails at once naming gRPC's reason, where every call had
waited out its whole timeout for "DEADLINE_EXCEEDED: Deadline Exceeded"; a Gateway that has
answered is still waited for while it restarts."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachemesh import AsyncClient, Client, Tls, UnavailableError, build_request, channel_options
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from tests.certs import Authority

TIMEOUT_S = 60.0  # what a call that waits would wait out (the default is 120 s)


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        return pb.CompleteResponse(request_id=request.request_id, stop_reason="end_turn")

    def StreamComplete(
        self, request: pb.CompleteRequest, context: Any
    ) -> Iterator[pb.CompleteChunk]:
        yield pb.CompleteChunk(end=pb.CompleteResponse(stop_reason="end_turn"))


def _serve(
    address: str = "127.0.0.1:0", credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.Server, str]:
    """A fake Gateway on ``address`` (a free port by default) and the address it took."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    gateway_pb2_grpc.add_GatewayServicer_to_server(FakeGateway(), server)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


@dataclass(frozen=True)
class Gateways:
    tls: str  # serves TLS with a certificate ``good`` signed
    plaintext: str
    good: Path  # the CA that signed the TLS Gateway's certificate
    other: Path  # a valid CA that did not


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    directory = tmp_path_factory.mktemp("pki")
    good, other = Authority(directory, "good CA"), Authority(directory, "other CA")
    issued = good.issue("server", server=True)
    credentials = grpc.ssl_server_credentials([(issued.key.read_bytes(), issued.cert.read_bytes())])
    (tls_server, tls), (plaintext_server, plaintext) = _serve(credentials=credentials), _serve()
    servers = [tls_server, plaintext_server]
    yield Gateways(tls, plaintext, good.ca, other.ca)
    for server in servers:
        server.stop(None)


def _call(target: str, tls: Tls | None, kind: str, method: str, max_attempts: int) -> None:
    request = build_request("hi")
    options: dict[str, Any] = {"tls": tls, "timeout_s": TIMEOUT_S, "max_attempts": max_attempts}
    if kind == "sync":
        with Client(target, api_key="k", **options) as client:
            if method == "complete":
                client.complete(request)
            else:
                list(client.stream(request))
        return

    async def aio() -> None:
        async with AsyncClient(target, api_key="k", **options) as client:
            if method == "complete":
                await client.complete(request)
            else:
                _ = [chunk async for chunk in client.stream(request)]

    asyncio.run(aio())


def test_the_right_ca_is_answered(gateways: Gateways) -> None:
    """The fakes answer a right setting (so the tests below fail only on the wrong one)."""
    _call(gateways.tls, Tls(ca_file=gateways.good), "sync", "complete", 1)
    _call(gateways.plaintext, None, "aio", "stream", 1)


@pytest.mark.parametrize("kind", ["sync", "aio"])
@pytest.mark.parametrize("method", ["complete", "stream"])
@pytest.mark.parametrize(
    ("case", "said"),
    [
        # gRPC's own wording, which its timing varies: the verify failure, or (1 of 438 runs
        # with the process paused now and then) the handshake's read as the server closed
        (
            "a CA that did not sign the Gateway's certificate",
            ("CERTIFICATE_VERIFY_FAILED", "Handshake read failed"),
        ),
        ("plaintext to a TLS Gateway", ("failed to connect",)),
        ("TLS to a plaintext Gateway", ("handshake failed",)),
    ],
)
def test_a_wrong_tls_setting_fails_at_once_naming_why(
    gateways: Gateways, kind: str, method: str, case: str, said: tuple[str, ...]
) -> None:
    """A setting made once and for all is no restart to wait for: UNAVAILABLE with gRPC's
    reason, where the call had waited out its timeout for a bare DEADLINE_EXCEEDED."""
    target, tls = {
        "a CA that did not sign the Gateway's certificate": (
            gateways.tls,
            Tls(ca_file=gateways.other),
        ),
        "plaintext to a TLS Gateway": (gateways.tls, None),
        "TLS to a plaintext Gateway": (gateways.plaintext, Tls(ca_file=gateways.good)),
    }[case]
    with pytest.raises(UnavailableError) as raised:
        _call(target, tls, kind, method, max_attempts=1)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE, raised.value
    assert any(one.lower() in raised.value.message.lower() for one in said), raised.value


def test_retries_do_not_turn_a_wrong_tls_setting_into_a_wait(gateways: Gateways) -> None:
    """gRPC's retries (5 attempts, the default) each fail the same way: UNAVAILABLE."""
    with pytest.raises(UnavailableError) as raised:
        _call(gateways.tls, Tls(ca_file=gateways.other), "sync", "complete", 5)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE, raised.value
    message = raised.value.message
    assert "CERTIFICATE_VERIFY_FAILED" in message or "Handshake read failed" in message, message


def _restart_later(address: str) -> tuple[threading.Timer, list[grpc.Server]]:
    """A Gateway on ``address`` again shortly, while the caller's next call waits for it."""
    started: list[grpc.Server] = []
    timer = threading.Timer(0.5, lambda: started.append(_serve(address)[0]))
    timer.start()
    return timer, started


def _until_not_ready(channel: grpc.Channel) -> None:
    """Until the channel has seen its Gateway go (so the next call finds it gone)."""
    gone = threading.Event()

    def watch(state: grpc.ChannelConnectivity) -> None:
        if state is not grpc.ChannelConnectivity.READY:
            gone.set()

    channel.subscribe(watch)
    try:
        assert gone.wait(10), "the channel never saw the Gateway stop"
    finally:
        channel.unsubscribe(watch)


@pytest.mark.parametrize("wait_for_ready", [True, False])
def test_a_gateway_that_answered_is_waited_for_while_it_restarts(wait_for_ready: bool) -> None:
    """Once it has answered on the channel, a call (one attempt: no retry to hide a failure)
    waits for the Gateway to come back, as before; ``wait_for_ready=False`` fails at once, on
    a channel the caller made too (its service config asks to wait: the client's word holds)."""
    server, address = _serve()
    channel = grpc.insecure_channel(address, options=channel_options(max_attempts=1))
    client = Client(
        address, api_key="k", channel=channel, timeout_s=TIMEOUT_S, wait_for_ready=wait_for_ready
    )
    started: list[grpc.Server] = []
    try:
        client.complete(build_request("hi"))
        server.stop(None).wait()
        _until_not_ready(channel)
        timer, started = _restart_later(address)
        if wait_for_ready:
            assert client.complete(build_request("hi again")).stop_reason == "end_turn"
        else:
            with pytest.raises(UnavailableError) as raised:
                client.complete(build_request("hi again"))
            assert raised.value.code == grpc.StatusCode.UNAVAILABLE, raised.value
        timer.join()
    finally:
        client.close()
        channel.close()  # the caller's: the client leaves it open
        for restarted in started:
            restarted.stop(None)


def test_an_async_client_that_was_answered_waits_for_a_restart() -> None:
    server, address = _serve()
    started: list[grpc.Server] = []

    async def aio() -> pb.CompleteResponse:
        nonlocal started
        channel = grpc.aio.insecure_channel(address, options=channel_options(max_attempts=1))
        async with (
            channel,  # the caller's: the client leaves it open
            AsyncClient(address, api_key="k", channel=channel, timeout_s=TIMEOUT_S) as c,
        ):
            await c.complete(build_request("hi"))
            await asyncio.to_thread(lambda: server.stop(None).wait())
            while channel.get_state() is grpc.ChannelConnectivity.READY:
                await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
            timer, started = _restart_later(address)
            answer = await c.complete(build_request("hi again"))
            await asyncio.to_thread(timer.join)
            return answer

    try:
        assert asyncio.run(aio()).stop_reason == "end_turn"
    finally:
        for restarted in started:
            restarted.stop(None)


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"tls": Tls(ca_file="/nonexistent/ca.pem")}, "tls"),
        ({"max_attempts": 1}, "max_attempts"),
        ({"max_attempts": 5}, "max_attempts"),
    ],
)
def test_a_channel_with_settings_only_a_made_channel_takes_is_refused(
    given: dict[str, Any], named: str
) -> None:
    """``tls`` and ``max_attempts`` shape the channel the client makes: with ``channel=`` they
    were accepted and ignored (plaintext sent where TLS was asked, 5 attempts where 1 was)."""
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ValueError) as raised:
        Client("127.0.0.1:1", api_key="k", channel=channel, **given)
    assert f"{named}=" in str(raised.value) and "channel=" in str(raised.value)

    async def aio() -> None:
        async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
            AsyncClient("127.0.0.1:1", api_key="k", channel=channel, **given)

    with pytest.raises(ValueError) as raised:
        asyncio.run(aio())
    assert f"{named}=" in str(raised.value) and "channel=" in str(raised.value)
