"""A base URL's credentials (``http://user:password@host/v1``, ``http://token@host/v1``) never
reach a log line: the replica is built as ``serve()`` builds it, logs as every service does
(INFO, json), and calls the loopback engine through the official SDK, whose HTTP stack writes
each request's URL."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.env import Env
from services.common.tokens import load_cl100k
from services.model.providers.redact import UrlFilter
from services.model.providers.wiring import build_provider_api
from services.model.settings import ModelSettings
from tests.providers.loopback import serving
from tests.providers.replica import service_log
from tests.providers.wire_server import WireServer

MODEL = "local-small"
PASSWORD = "engine-basic-auth-pw-93817"
TOKEN = "engine-token-as-user-50231"


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving()


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    """The service's log lines (INFO, json); the root handler, the levels and the filters
    of the libraries' loggers as they were afterwards."""
    yield from service_log(Env({}))


def _call(base_url: str) -> model_pb2.GenerateEnd:
    settings = ModelSettings.from_env(
        {
            "MODEL_BACKEND": "openai",
            "OPENAI_BASE_URL": base_url,
            "MODEL_IDS": MODEL,
            "CACHEMESH_INTERNAL_TOKEN": "internal-token-for-the-test",
        }
    )

    async def health(serving: bool) -> None:
        return None

    api = build_provider_api(settings, load_cl100k(), health)
    message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Capital?")])
    call = model_pb2.GenerateRequest(
        tenant="t",
        model=MODEL,
        request=pb.CompleteRequest(model=MODEL, max_tokens=8, messages=[message]),
    )

    async def run() -> list[model_pb2.GenerateChunk]:
        try:
            return [chunk async for chunk in api.generate(call, 5.0)]
        finally:
            await api.close()

    (end,) = [c.end for c in asyncio.run(run()) if c.WhichOneof("part") == "end"]
    return end


@pytest.mark.parametrize(
    ("credentials", "secret"),
    [(f"proxyuser:{PASSWORD}@", PASSWORD), (f"{TOKEN}@", TOKEN)],
)
def test_a_base_urls_credentials_are_never_logged(
    server: WireServer, logged: io.StringIO, credentials: str, secret: str
) -> None:
    end = _call(f"http://{credentials}127.0.0.1:{server.port}/v1")
    assert end.stop_reason == "end_turn" and not end.interrupted  # the engine was called
    assert secret not in logged.getvalue(), logged.getvalue()


def test_a_url_logged_at_any_level_shows_no_credentials() -> None:
    """Whatever the level a library logs a URL at, the filter shows it without them."""
    url_filter = UrlFilter()

    def filtered(msg: str, *args: object) -> str:
        record = logging.LogRecord("httpx2", logging.WARNING, __file__, 1, msg, args, None)
        assert url_filter.filter(record)
        return record.getMessage()

    line = 'HTTP Request: POST %s "HTTP/1.1 %d %s"'
    shown = filtered(line, f"http://u:{PASSWORD}@10.0.0.1:8000/v1/chat/completions", 503, "x")
    assert (
        shown
        == 'HTTP Request: POST http://u:***@10.0.0.1:8000/v1/chat/completions "HTTP/1.1 503 x"'
    )
    assert filtered("to %s", f"https://{TOKEN}@engine.example/v1?k=1") == (
        "to https://***@engine.example/v1"
    )
    plain = "POST http://10.0.0.1:8000/v1/chat/completions from ops@example.com"
    assert filtered(plain) == plain  # no credentials: untouched
    broken = logging.LogRecord("httpx2", logging.WARNING, __file__, 1, "%d", ("x",), None)
    assert url_filter.filter(broken) and broken.msg == "%d"  # left to logging to report
