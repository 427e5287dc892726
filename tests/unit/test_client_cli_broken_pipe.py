"""``cachemesh ask ... | head -1``: the reader of stdout goes away before the report is
printed. The CLI ended with a BrokenPipeError traceback (9 lines on stderr, exit 1) after an
answer it had received; it stops quietly with 141, a shell's status for a writer whose reader
went, as ``yes | head -1``'s. Against a fake Gateway (a real gRPC server in this process), the
command a real process with its stdout a pipe already closed for reading."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc

EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE's number: a shell's status of `yes | head -1`'s writer


class Gateway(gateway_pb2_grpc.GatewayServicer):
    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        return pb.CompleteResponse(
            content=[pb.ContentBlock(text="an answer")], stop_reason="end_turn"
        )

    def StreamComplete(
        self, request: pb.CompleteRequest, context: Any
    ) -> Iterator[pb.CompleteChunk]:
        raise NotImplementedError("the CLI does not stream")


@pytest.fixture
def target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    gateway_pb2_grpc.add_GatewayServicer_to_server(Gateway(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_a_reader_that_goes_away_ends_the_cli_quietly(target: str, extra: list[str]) -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("CACHEMESH_")  # no TLS or insecure setting of the caller's
    }
    env |= {"CACHEMESH_API_KEY": "cm_test_key", "CACHEMESH_TARGET": target}
    read, write = os.pipe()
    os.close(read)  # as `| head -1` once head has exited
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cachemesh.cli", "ask", *extra, "hi"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (EXIT_BROKEN_PIPE, ""), done.stderr
