"""What the Python client sends, against a fake Gateway (a real gRPC server in this process):
the retry mark on a call with the caller's own request id (never on an id the client made); a
stream the caller stops reading is cancelled (the Gateway stops generating and billing)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cachemesh import AsyncClient, ChunkStream, Client, build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc

LONG = 4000  # max_tokens of an answer the fake keeps generating


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []  # each call's, in order
        self.stream_ended = threading.Event()  # a StreamComplete RPC has terminated

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        self.metadata.append(dict(context.invocation_metadata()))
        return pb.CompleteResponse(request_id=request.request_id, stop_reason="end_turn")

    def StreamComplete(
        self, request: pb.CompleteRequest, context: Any
    ) -> Iterator[pb.CompleteChunk]:
        self.metadata.append(dict(context.invocation_metadata()))
        context.add_callback(self.stream_ended.set)
        yield pb.CompleteChunk(start=pb.CompleteResponse(model="sim-small"))
        if request.max_tokens == LONG:  # still generating until the RPC ends
            yield pb.CompleteChunk(delta=pb.ContentBlock(text="the first token"))
            self.stream_ended.wait(timeout=60)
            return
        yield pb.CompleteChunk(end=pb.CompleteResponse(stop_reason="end_turn"))


@pytest.fixture
def gateway() -> Iterator[tuple[FakeGateway, str]]:
    fake = FakeGateway()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


def _every_call(target: str, request: pb.CompleteRequest) -> None:
    """``request`` through Client and AsyncClient, complete and stream."""
    with Client(target, api_key="k") as client:
        client.complete(request)
        list(client.stream(request))

    async def aio() -> None:
        async with AsyncClient(target, api_key="k") as client:
            await client.complete(request)
            _ = [chunk async for chunk in client.stream(request)]

    asyncio.run(aio())


def test_a_call_with_the_callers_own_request_id_is_marked_a_possible_retry(
    gateway: tuple[FakeGateway, str],
) -> None:
    """The router reads the answer ledger the routers share only for a marked call: a caller's
    retry that reaches another router is answered from it and billed once."""
    fake, target = gateway
    _every_call(target, build_request("hi", request_id="order-42"))
    assert [m.get("cachemesh-retry") for m in fake.metadata] == ["1"] * 4


def test_a_call_whose_request_id_the_client_made_is_not_marked(
    gateway: tuple[FakeGateway, str],
) -> None:
    """A new id is in no ledger: no Redis read for it (gRPC's own retries are marked by gRPC)."""
    fake, target = gateway
    _every_call(target, build_request("hi"))
    assert len(fake.metadata) == 4
    assert all("cachemesh-retry" not in m for m in fake.metadata)


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_stream_the_caller_stops_reading_is_cancelled(
    gateway: tuple[FakeGateway, str], kind: str
) -> None:
    """A caller that breaks out of ``stream`` (its client and channel still open, as in a
    long-lived app) ends the RPC, so the Gateway stops the model call and bills only what it
    produced, not the answer to ``max_tokens``."""
    fake, target = gateway
    request = build_request("Write a long essay.", max_tokens=LONG)
    if kind == "sync":
        with Client(target, api_key="k") as client:
            for chunk in client.stream(request):
                if chunk.WhichOneof("part") == "delta":
                    break  # the caller has what it wants
            ended = fake.stream_ended.wait(timeout=10)
    else:

        async def aio() -> bool:
            async with AsyncClient(target, api_key="k") as client:
                async for chunk in client.stream(request):
                    if chunk.WhichOneof("part") == "delta":
                        break
                return await asyncio.to_thread(fake.stream_ended.wait, 10)

        ended = asyncio.run(aio())
    assert ended, "the Gateway is still generating for a caller that stopped reading"


@pytest.mark.parametrize("kind", ["sync", "aio"])
@pytest.mark.parametrize("how", ["with", "close"])
def test_a_held_stream_is_cancelled_when_closed(
    gateway: tuple[FakeGateway, str], kind: str, how: str
) -> None:
    """A stream the caller keeps a reference to (a name, the ``with`` target) is not collected
    after a ``break``: leaving the ``with`` block, or ``close()``/``aclose()``, ends the RPC
    itself, while the stream is still held."""
    fake, target = gateway
    request = build_request("Write a long essay.", max_tokens=LONG)
    if kind == "sync":
        with Client(target, api_key="k") as client:
            if how == "with":
                with client.stream(request) as chunks:
                    for chunk in chunks:
                        if chunk.WhichOneof("part") == "delta":
                            break
            else:
                chunks = client.stream(request)
                for chunk in chunks:
                    if chunk.WhichOneof("part") == "delta":
                        break
                chunks.close()
            ended = fake.stream_ended.wait(timeout=10)
            assert list(chunks) == []  # a closed stream yields nothing more, and raises nothing
    else:

        async def aio() -> bool:
            async with AsyncClient(target, api_key="k") as client:
                if how == "with":
                    async with client.stream(request) as chunks:
                        async for chunk in chunks:
                            if chunk.WhichOneof("part") == "delta":
                                break
                else:
                    chunks = client.stream(request)
                    async for chunk in chunks:
                        if chunk.WhichOneof("part") == "delta":
                            break
                    await chunks.aclose()
                ended = await asyncio.to_thread(fake.stream_ended.wait, 10)
                assert [chunk async for chunk in chunks] == []
                return ended

        ended = asyncio.run(aio())
    assert ended, "the Gateway is still generating for a caller that closed its stream"


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_stream_closed_while_another_reader_waits_just_ends(
    gateway: tuple[FakeGateway, str], kind: str
) -> None:
    """A "stop generating" button or a watchdog closes the stream from another thread or task
    while the reader waits for the next chunk: the reader's loop ends, with no error. It had
    raised CANCELLED (sync) or "the answer is incomplete; retry" (async): a retry is a new
    model call, billed on top of the stopped one."""
    fake, target = gateway
    request = build_request("Write a long essay.", max_tokens=LONG)
    if kind == "sync":
        with Client(target, api_key="k") as client:
            chunks = client.stream(request)
            got: list[str | None] = [next(chunks).WhichOneof("part")]
            got.append(next(chunks).WhichOneof("part"))
            closer = threading.Timer(0.2, chunks.close)  # while the next read waits
            closer.start()
            got += [c.WhichOneof("part") for c in chunks]  # ends; raises nothing
            closer.join()
    else:

        async def aio() -> list[str | None]:
            async with AsyncClient(target, api_key="k") as client:
                chunks = client.stream(request)
                parts = [(await chunks.__anext__()).WhichOneof("part")]
                parts.append((await chunks.__anext__()).WhichOneof("part"))

                async def read_rest() -> list[str | None]:
                    return [c.WhichOneof("part") async for c in chunks]

                reader = asyncio.create_task(read_rest())
                await asyncio.sleep(0.2)  # the reader waits on the next chunk
                await chunks.aclose()
                return parts + await asyncio.wait_for(reader, 10)

        got = asyncio.run(aio())
    assert got == ["start", "delta"]
    assert fake.stream_ended.wait(timeout=10)  # and the Gateway stopped generating


def test_a_stream_left_unread_starts_no_call(gateway: tuple[FakeGateway, str]) -> None:
    """As before: the call starts on the first read, so a stream made and closed unread costs
    nothing."""
    fake, target = gateway
    with Client(target, api_key="k") as client, client.stream(build_request("hi")):
        pass
    assert fake.metadata == []


async def _both(client: AsyncClient, question: str) -> list[str]:
    """``question`` through ``client``'s complete and stream: the parts that came back."""
    answer = await client.complete(build_request(question))
    chunks = [chunk.WhichOneof("part") async for chunk in client.stream(build_request(question))]
    return [answer.stop_reason, *map(str, chunks)]


def test_an_async_client_made_outside_a_loop_serves_in_asyncio_run(
    gateway: tuple[FakeGateway, str],
) -> None:
    """Made at import time or in a sync ``main`` (no loop running), then used under
    ``asyncio.run``: every call had failed with gRPC's raw RuntimeError ("attached to a
    different loop"). Its channel now opens on first use, in the loop using it; a later
    ``asyncio.run`` (the first loop closed) gets a channel of its own."""
    fake, target = gateway
    client = AsyncClient(target, api_key="k")
    first = asyncio.run(_both(client, "hi"))
    second = asyncio.run(_both(client, "hi again"))

    async def close() -> None:
        await client.close()

    asyncio.run(close())
    assert first == second == ["end_turn", "start", "end"]
    assert len(fake.metadata) == 4


def test_an_async_client_used_from_a_second_live_loop_is_refused_clearly(
    gateway: tuple[FakeGateway, str],
) -> None:
    """Its channel belongs to the loop that opened it while that loop lives: another loop's
    call is a RuntimeError saying so (one client per loop), not gRPC's."""
    fake, target = gateway
    client = AsyncClient(target, api_key="k")
    first = asyncio.new_event_loop()
    try:
        assert first.run_until_complete(_both(client, "hi"))[0] == "end_turn"
        with pytest.raises(RuntimeError, match="another event loop") as raised:
            asyncio.run(client.complete(build_request("from another loop")))
        assert "one AsyncClient per event loop" in str(raised.value)
        first.run_until_complete(client.close())
    finally:
        first.close()
    assert len(fake.metadata) == 2  # nothing sent from the second loop


def test_async_with_opens_the_channel_in_its_loop(gateway: tuple[FakeGateway, str]) -> None:
    fake, target = gateway

    async def run() -> list[str]:
        async with AsyncClient(target, api_key="k") as client:
            return await _both(client, "hi")

    assert asyncio.run(run()) == ["end_turn", "start", "end"]
    assert len(fake.metadata) == 2


def test_a_closed_client_refuses_a_call_as_the_async_one_does(
    gateway: tuple[FakeGateway, str],
) -> None:
    """A call on a closed Client, or a stream it made read after it closed, is a RuntimeError
    saying so (AsyncClient's too): it was gRPC's ValueError ("Cannot invoke RPC on closed
    channel!"), neither a CachemeshError nor what AsyncClient raises."""
    fake, target = gateway
    client = Client(target, api_key="k")
    made_before = client.stream(build_request("hi"))
    client.close()
    for call in (
        lambda: client.complete(build_request("hi")),
        lambda: next(client.stream(build_request("hi"))),
        lambda: next(made_before),
    ):
        with pytest.raises(RuntimeError, match="this Client is closed"):
            call()
    client.close()  # twice is fine

    async def closed() -> None:
        async_client = AsyncClient(target, api_key="k")
        await async_client.close()
        with pytest.raises(RuntimeError, match="this AsyncClient is closed"):
            await async_client.complete(build_request("hi"))

    asyncio.run(closed())
    assert fake.metadata == []


def test_ask_retries_with_the_request_id_an_error_named(
    gateway: tuple[FakeGateway, str],
) -> None:
    """An error names the request_id to retry with; ``ask`` takes it (it was a TypeError:
    only a request built with ``build_request`` could), sent as the caller's own, marked."""
    fake, target = gateway
    with Client(target, api_key="k") as client:
        answer = client.ask("hi", request_id="the-failed-calls-id")

    async def ask() -> pb.CompleteResponse:
        async with AsyncClient(target, api_key="k") as async_client:
            return await async_client.ask("hi", request_id="the-failed-calls-id")

    again = asyncio.run(ask())
    assert answer.request_id == again.request_id == "the-failed-calls-id"
    assert [m.get("cachemesh-retry") for m in fake.metadata] == ["1", "1"]


def test_a_stream_closed_by_another_thread_as_its_call_starts_is_cancelled() -> None:
    """``close()`` from another thread while the first read is starting the call (it saw no
    call to cancel): the call went on unread, generated and billed to its end; it is
    cancelled as it starts, and the read ends."""

    class Call:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

        def __next__(self) -> pb.CompleteChunk:
            return pb.CompleteChunk(start=pb.CompleteResponse(model="sim-small"))

    call = Call()

    def start() -> Call:
        stream.close()  # the other thread's close(), as this one starts the call
        return call

    stream = ChunkStream(start, "r1")
    assert list(stream) == []
    assert call.cancelled


def test_a_close_racing_a_call_as_it_starts_is_the_closed_clients_error(
    gateway: tuple[FakeGateway, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close()`` in another thread after a call passed the closed check and before gRPC
    started it (the interleaving made certain here: the close comes right after the check),
    or an injected channel its owner closed: gRPC's ValueError "Cannot invoke RPC on closed
    channel!" (a stream's: "Cannot invoke RPC: Channel closed!") reached the caller; it is the
    closed Client's RuntimeError."""
    fake, target = gateway
    checked = Client._gateway

    def closed_after_the_check(self: Client) -> Any:
        stub = checked(self)
        self.close()  # as another thread would, now
        return stub

    monkeypatch.setattr(Client, "_gateway", closed_after_the_check)
    calls: tuple[Callable[[Client], object], ...] = (
        lambda client: client.complete(build_request("hi")),
        lambda client: next(client.stream(build_request("hi"))),
    )
    for call in calls:
        with pytest.raises(RuntimeError, match="this Client is closed") as raised:
            call(Client(target, api_key="k"))
        assert "Cannot invoke RPC" in str(raised.value.__cause__)
    monkeypatch.undo()
    channel = grpc.insecure_channel(target)
    client = Client(target, api_key="k", channel=channel)
    channel.close()
    with pytest.raises(RuntimeError, match="this Client is closed"):
        client.complete(build_request("hi"))
    with pytest.raises(RuntimeError, match="this Client is closed"):
        next(client.stream(build_request("hi")))
    assert fake.metadata == []
