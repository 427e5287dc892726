"""A stack whose model replicas include provider adapters, each talking to the loopback
provider servers of ``tests.providers`` through the official SDKs.

Replicas (besides the stack's simulated ones):
- ``anthropic-1`` (claude-sonnet-4-5, claude-haiku-4-5, claude-sonnet-5: a model that takes
  only its default sampling), a good key from a key file;
- ``anthropic-bad`` (claude-haiku-4-5), a key the server rejects (401);
- ``openai-1`` (gpt-4-1, gpt-4o-mini, gpt-5: a reasoning model), a key from a key file;
  ``openai-2`` (gpt-4-1), a key from OPENAI_API_KEY.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from services.tools.keys import ensure_keys
from services.tools.stack import processes
from services.tools.stack.health import SERVING, probe
from services.tools.stack.otlp_sink import OtlpSink, Span
from services.tools.stack.ports import free_port
from services.tools.stack.processes import Running
from services.tools.stack.service_table import MODEL_ENV_KEYS, ServiceDef
from tests.integration.harness import ROOT, RunningStack, started_stack, test_settings
from tests.providers import anthropic_wire, openai_wire
from tests.providers.wire_server import WireServer

MODEL_TIMEOUT_S = 4.0  # the router's deadline for one model call (the hang test waits it)
TOOL_USE_NAMESPACE = "agent-tools"  # L1 caches answers holding a tool call there


@dataclass
class ProviderStack:
    stack: RunningStack
    server: WireServer
    replicas: dict[str, str]  # replica name -> address
    keys: dict[str, str]  # replica name -> its provider credential
    run_dir: Path
    log_dir: Path
    errors: list[str] = field(default_factory=list)  # every error message a client saw


def _replica(name: str, module_env: dict[str, str], log_dir: Path) -> tuple[Running, str]:
    address = f"127.0.0.1:{free_port()}"
    service = ServiceDef(
        name=name,
        module="services.model",
        listen_var="MODEL_LISTEN",
        default_port=0,
        own_env_keys=MODEL_ENV_KEYS,
    )
    env = {**module_env, "MODEL_LISTEN": address, "MODEL_REPLICA_ID": name}
    env["MODEL_METRICS_LISTEN"] = "127.0.0.1:0"  # any free port: one each
    env["OTEL_SERVICE_NAME"] = name
    return processes.spawn(service, env, ROOT, log_dir / f"{name}.log"), address


def _wait_serving(running: list[tuple[Running, str]], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    for item, address in running:
        while probe(address) != SERVING:
            code = item.exit_code()
            if code is not None:
                raise RuntimeError(f"{item.service.name} exited with code {code} (see its log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{item.service.name} not SERVING at {address}")
            time.sleep(0.1)


@contextmanager
def provider_stack(run_dir: Path) -> Iterator[ProviderStack]:
    keys = {
        "anthropic-1": "sk-ant-loopback-" + secrets.token_hex(16),
        "anthropic-bad": "sk-ant-revoked-" + secrets.token_hex(16),
        "openai-1": "sk-proj-loopback-" + secrets.token_hex(16),
        "openai-2": "sk-proj-second-" + secrets.token_hex(16),
    }
    bad = keys["anthropic-bad"]
    server = WireServer(
        {"anthropic": anthropic_wire.default, "openai": openai_wire.default},
        {
            "anthropic": anthropic_wire.REJECTED,
            "openai": openai_wire.rejected(bad[:8] + "*" * 20 + bad[-4:]),
        },
        {"anthropic": anthropic_wire.refusal, "openai": openai_wire.refusal},
        shared=True,  # the session's tests share it: none may reset what another recorded
    )
    server.rejected_keys.add(bad)
    server.start()
    secret_dir = run_dir / "provider-secrets"
    secret_dir.mkdir(parents=True, exist_ok=True)
    for name, key in keys.items():
        (secret_dir / f"{name}.key").write_text(key + "\n")
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sink = OtlpSink()
    stack_keys = ensure_keys(run_dir)
    common = {
        # PYTHONPATH: a worktree's run imports its own generated stubs (the venv's editable
        # install points at one checkout's), as the rest of the stack, started with os.environ
        **{
            k: v
            for k, v in os.environ.items()
            if k in ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH")
        },
        **test_settings(sink),
        "CACHEMESH_INTERNAL_TOKEN": stack_keys.internal_token,
        "CACHEMESH_LOG_LEVEL": "DEBUG",  # the key must stay out of the most verbose log too
        "PYTHONUNBUFFERED": "1",
        "PROVIDER_BACKOFF_S": "0.05",
        "PROVIDER_AUTH_RECHECK_S": "600",
    }
    anthropic = {
        **common,
        "MODEL_BACKEND": "anthropic",
        "ANTHROPIC_BASE_URL": server.base,
    }
    openai = {**common, "MODEL_BACKEND": "openai", "OPENAI_BASE_URL": server.base + "/v1"}
    spawned = [
        _replica(
            "anthropic-1",
            {
                **anthropic,
                "MODEL_IDS": "claude-sonnet-4-5,claude-haiku-4-5,claude-sonnet-5",
                "ANTHROPIC_API_KEY_FILE": str(secret_dir / "anthropic-1.key"),
            },
            log_dir,
        ),
        _replica(
            "anthropic-bad",
            {
                **anthropic,
                "MODEL_IDS": "claude-haiku-4-5",
                "ANTHROPIC_API_KEY_FILE": str(secret_dir / "anthropic-bad.key"),
            },
            log_dir,
        ),
        _replica(
            "openai-1",
            {
                **openai,
                "MODEL_IDS": "gpt-4-1,gpt-4o-mini,gpt-5",
                "OPENAI_API_KEY_FILE": str(secret_dir / "openai-1.key"),
            },
            log_dir,
        ),
        _replica(
            "openai-2",
            {**openai, "MODEL_IDS": "gpt-4-1", "OPENAI_API_KEY": keys["openai-2"]},
            log_dir,
        ),
    ]
    addresses = {item.service.name: address for item, address in spawned}
    try:
        # the stack starts while the replicas start (the router never calls a replica before
        # a request; each test's first request comes after both waits)
        dotenv = read_env_file(ROOT / ".env")
        extra_replicas = ",".join(
            f"{model}={addresses[name]}"
            for model, name in (
                ("claude-sonnet-4-5", "anthropic-1"),
                ("claude-haiku-4-5", "anthropic-bad"),
                ("claude-haiku-4-5", "anthropic-1"),
                ("claude-sonnet-5", "anthropic-1"),
                ("gpt-4-1", "openai-1"),
                ("gpt-4-1", "openai-2"),
                ("gpt-4o-mini", "openai-1"),
                ("gpt-5", "openai-1"),
            )
        )
        environ = {**os.environ, "MODEL_REPLICAS": dotenv["MODEL_REPLICAS"] + "," + extra_replicas}
        with started_stack(
            run_dir,
            # round robin: each replica of a model is tried in turn whatever its measured speed
            # (the failure tests need the revoked replica to be picked)
            {
                "ROUTER_MODEL_TIMEOUT_S": str(MODEL_TIMEOUT_S),
                "ROUTER_REPLICA_POLICY": "round_robin",
                # L1 caches the tool calls of this namespace (test_semantic_tool_use.py)
                "SEMANTIC_CACHE_TOOL_USE_NAMESPACES": TOOL_USE_NAMESPACE,
            },
            environ=environ,
            sink=sink,
        ) as (runner, sink):
            _wait_serving(spawned)
            demo = read_env_file(run_dir / "demo-keys.env")
            yield ProviderStack(
                stack=RunningStack(
                    target=runner.router_address,
                    addresses=runner.addresses,
                    keys={"tenant-a": demo["CACHEMESH_KEY_A"], "tenant-b": demo["CACHEMESH_KEY_B"]},
                    internal_token=stack_keys.internal_token,
                    sink=sink,
                    stack=runner,
                ),
                server=server,
                replicas=addresses,
                keys=keys,
                run_dir=run_dir,
                log_dir=log_dir,
            )
    finally:
        for item, _ in spawned:
            item.signal(signal.SIGTERM)
        for item, _ in spawned:
            if item.popen is not None:
                try:
                    item.popen.wait(10)
                except Exception:
                    item.signal(signal.SIGKILL)
        server.stop()


def user(*blocks: pb.ContentBlock) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=list(blocks))


def assistant(*blocks: pb.ContentBlock) -> pb.Message:
    return pb.Message(role=pb.ROLE_ASSISTANT, content=list(blocks))


def text(value: str, cache: pb.CacheControl | None = None) -> pb.ContentBlock:
    """A text block; ``cache`` makes it a breakpoint (an empty CacheControl = 5 minutes)."""
    return pb.ContentBlock(text=value, cache_control=cache)


def ask(model: str, question: str, *, max_tokens: int = 64) -> pb.CompleteRequest:
    """A one-turn request that always reaches the model (no L1)."""
    return pb.CompleteRequest(
        model=model,
        max_tokens=max_tokens,
        messages=[user(text(question))],
        cache=pb.CacheOptions(semantic=pb.SEMANTIC_MODE_BYPASS),
    )


def spans_of_request(stack: RunningStack, request_id: str, service: str) -> list[Span]:
    """The spans ``service`` exported for the request with this id (found by the router's
    root span, which names it: a failed call gives the client no trace id), once exported."""
    deadline = time.monotonic() + 20
    while True:
        roots = [
            s
            for s in stack.sink.all_spans()
            if s.service == "router" and s.attributes.get("cachemesh.request_id") == request_id
        ]
        if roots:
            found = [s for s in stack.sink.spans_of(roots[0].trace_id) if s.service == service]
            if found:
                return found
        assert time.monotonic() < deadline, f"no {service} span of request {request_id}"
        time.sleep(0.1)


def router_spans(stack: RunningStack, trace_id: str, calls: int = 1) -> tuple[Span, list[Span]]:
    """The router's root span and its model-call spans, once (at least ``calls`` of them)
    exported: a call billed without its answer ends its span once that bill is known."""
    deadline = time.monotonic() + 20
    while True:
        spans = [s for s in stack.sink.spans_of(trace_id) if s.service == "router"]
        roots = [s for s in spans if not s.parent_span_id]
        chats = [s for s in spans if s.name.startswith("chat ")]
        if roots and len(chats) >= calls:
            return roots[0], chats
        assert time.monotonic() < deadline, f"router spans not exported: {spans}"
        time.sleep(0.1)
