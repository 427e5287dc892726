"""A TCP relay that reads the HTTP/2 frames passing through it (plaintext h2c): the client's
PINGs counted, the server's GOAWAYs recorded; and the frames of a hand-written HTTP/2 client."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7
ACK = 0x1
ENHANCE_YOUR_CALM = 0xB
# A bound on how long awaited pings may take to be seen, not a duration asserted on.
WAIT_S = 60.0


def frame(kind: int, flags: int, payload: bytes = b"") -> bytes:
    """A frame on stream 0."""
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + struct.pack(">I", 0) + payload


@dataclass
class Frames:
    """What the relay saw: the client's PINGs (not acks), the server's GOAWAYs (code, debug)."""

    pings: int = 0
    goaways: list[tuple[int, bytes]] = field(default_factory=list)
    watch: tuple[int, asyncio.Event] | None = None  # set once pings reach the count (or GOAWAY)

    def ping(self) -> None:
        self.pings += 1
        if self.watch is not None and self.pings >= self.watch[0]:
            self.watch[1].set()

    def goaway(self, code: int, debug: bytes) -> None:
        self.goaways.append((code, debug))
        if self.watch is not None:
            self.watch[1].set()  # no more pings on this connection: the test looks now

    async def pings_reach(self, count: int) -> None:
        event = asyncio.Event()
        self.watch = (count, event)
        if self.pings >= count:
            event.set()
        await asyncio.wait_for(event.wait(), WAIT_S)


async def frames(
    reader: asyncio.StreamReader, skip: int, on_frame: Callable[[int, int, bytes], None]
) -> AsyncIterator[bytes]:
    """The bytes read (to forward), calling ``on_frame(type, flags, payload)`` per frame."""
    buffer = b""
    while data := await reader.read(65536):
        yield data
        buffer += data
        if skip:
            taken = min(skip, len(buffer))
            buffer, skip = buffer[taken:], skip - taken
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            on_frame(buffer[3], buffer[4], buffer[9 : 9 + length])
            buffer = buffer[9 + length :]


class Relay:
    """A TCP relay to ``target`` reading the HTTP/2 frames both ways."""

    def __init__(self, target_port: int) -> None:
        self.frames = Frames()
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _client_frame(self, kind: int, flags: int, _payload: bytes) -> None:
        if kind == PING and not flags & ACK:
            self.frames.ping()

    def _server_frame(self, kind: int, _flags: int, payload: bytes) -> None:
        if kind == GOAWAY:
            self.frames.goaway(int.from_bytes(payload[4:8], "big"), payload[8:])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        for pipe in (
            self._pipe(frames(reader, len(PREFACE), self._client_frame), up_writer),
            self._pipe(frames(up_reader, 0, self._server_frame), writer),
        ):
            task = asyncio.create_task(pipe)
            self._tasks.add(task)

    @staticmethod
    async def _pipe(chunks: AsyncIterator[bytes], writer: asyncio.StreamWriter) -> None:
        try:
            async for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()
