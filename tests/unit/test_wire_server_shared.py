"""The session's loopback provider server (tests/integration/provider_stack.py) is shared by
every test of a worker, in an order xdist's worksteal changes: a test that cleared its record
(test_provider_output_cut_stack did) erased the revoked key's one 401 made by an earlier test,
and the revoked-credentials test saw 0 calls where 1 was made. A shared server refuses reset."""

from __future__ import annotations

import pytest

from tests.providers import anthropic_wire, openai_wire
from tests.providers.wire_server import Reply, WireServer


def _server(*, shared: bool) -> WireServer:
    server = WireServer(
        {"anthropic": anthropic_wire.default, "openai": openai_wire.default},
        {"anthropic": anthropic_wire.REJECTED, "openai": openai_wire.rejected("x")},
        shared=shared,
    )
    server.script("openai", Reply(status=500))
    return server


def test_a_shared_server_refuses_to_forget_what_other_tests_recorded() -> None:
    server = _server(shared=True)
    with pytest.raises(RuntimeError, match="shared by the session's tests"):
        server.reset()
    assert server.pending("openai") == [Reply(status=500)]  # nothing cleared


def test_a_server_one_module_owns_is_reset() -> None:
    server = _server(shared=False)
    server.reset()
    assert server.pending("openai") == []
