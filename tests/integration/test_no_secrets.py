"""No API key, internal token, admin token or Redis password in any log, error, span, metric,
report or anything the stack keeps (its data directory, its Redis's keys and values), after a
run that used them (the Admin API's tests create, rotate and revoke keys on this stack before
this one); and no question asked in any log at the default level.

The session's stack has served every integration test before this one, with tenant keys, the
internal token between services, refusals of wrong keys and tokens; this test adds its own
refusals (a key one character off, the internal token presented as an API key, a wrong token at
an internal service), a load-test report and a bench report written from the stack's real
settings, then greps all of it, every process's metrics and what the stack keeps, for the
secrets, whole, in parts and encoded (base64, hex), and the logs for the question it asked.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
import uuid

import grpc
import pytest
import redis

from cachemesh import CachemeshError, Client, build_request
from cachemesh.envfile import read_env_file
from cachemesh.v1 import semantic_cache_pb2, semantic_cache_pb2_grpc
from services.router.answer_ledger import is_ledger_key, stored_answer
from services.tools.bench.gateway import output
from services.tools.bench.gateway.redact import own_settings, setting_names
from tests.integration.harness import ROOT, RunningStack, settled_spans
from tests.redis_server import sync_client_of

pytestmark = pytest.mark.integration
QUESTION = "Which secrets leak?"


def _fragments(secret: str) -> list[str]:
    """The secret, a head and a tail long enough to identify it, and the secret in base64 (at
    each of its three alignments inside a longer encoded text) and hex."""
    raw = secret.encode()
    encoded = [base64.b64encode(b"x" * shift + raw)[4 if shift else 0 : -4] for shift in range(3)]
    return [secret, secret[:12], secret[-10:], raw.hex(), *(e.decode() for e in encoded)]


def _value(client: redis.Redis, key: bytes) -> object:
    """``key``'s value as stored, not DUMP's serialization (which may compress it)."""
    kind = client.type(key)
    if kind == b"string":
        value = client.get(key)
        if is_ledger_key(key) and isinstance(value, bytes):
            # a recorded answer is kept zlib-compressed, unreadable as stored: read as the
            # router reads it, its serialized bytes beside the stored ones
            answer = stored_answer(value)
            return value if answer is None else (value, answer.SerializeToString())
        return value
    if kind == b"hash":
        return client.hgetall(key)
    if kind == b"list":
        return client.lrange(key, 0, -1)
    if kind == b"set":
        return client.smembers(key)
    if kind == b"zset":
        return client.zrange(key, 0, -1, withscores=True)
    return f"({kind!r}: not read)"


def _at_rest(stack: RunningStack) -> dict[str, str]:
    """What the stack keeps: every file of its data directory (L1's snapshot and log, the
    router's billing outbox, Redis's append-only file) and each key and value in its Redis."""
    run_dir = stack.stack.run_dir
    texts = {
        str(path.relative_to(run_dir)): path.read_bytes().decode("latin-1")
        for path in (run_dir / "data").rglob("*")
        if path.is_file()
    }
    password = (run_dir / "redis-password").read_text().strip()
    dump: list[str] = []
    for db in range(16):  # redis-server's databases
        client = sync_client_of(f"redis://{stack.addresses['redis']}/{db}", password=password)
        dump += [repr((db, key, _value(client, key))) for key in client.scan_iter(count=1000)]
        client.close()
    texts["redis keys and values"] = "\n".join(dump)
    assert any("semantic-cache" in where for where in texts) and dump  # L1 and Redis kept data
    return texts


def _refusals(stack: RunningStack, direct: dict[str, str]) -> list[str]:
    """Three refusals: two by the router (a key one character off, the internal token as an
    API key), one by semantic-cache, called straight in a trace of the test's own (its id
    and the service added to ``direct``, to wait for its span)."""
    errors: list[str] = []
    key = stack.keys["tenant-a"]
    for presented in (key[:-1] + ("A" if key[-1] != "A" else "B"), stack.internal_token):
        with Client(stack.target, api_key=presented) as client:
            with pytest.raises(CachemeshError) as caught:
                client.complete(build_request(QUESTION))
            errors.append(str(caught.value))
    with grpc.insecure_channel(stack.addresses["semantic-cache"]) as channel:
        stub = semantic_cache_pb2_grpc.SemanticCacheStub(channel)
        wrong = stack.internal_token[:-1] + "x"
        trace_id = uuid.uuid4().hex
        direct[trace_id] = "semantic-cache"
        with pytest.raises(grpc.RpcError) as refused:
            stub.Lookup(
                semantic_cache_pb2.LookupRequest(tenant="tenant-a"),
                metadata=(
                    ("x-cachemesh-internal", wrong),
                    ("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"),
                ),
                timeout=10,
            )
        errors.append(f"{refused.value.code()} {refused.value.details()}")
    return errors


def test_no_secret_in_logs_errors_spans_or_reports(stack: RunningStack) -> None:
    before = {s.span_id for s in stack.sink.all_spans()}
    direct: dict[str, str] = {}  # the calls made straight to a service: trace id -> service
    errors = _refusals(stack, direct)
    asked = f"{QUESTION} Asked once, {uuid.uuid4().hex}."
    with Client(stack.target, api_key=stack.keys["tenant-a"]) as client:
        asked_trace = client.complete(build_request(asked)).trace_id  # through every service
    assert asked_trace
    run_dir = stack.stack.run_dir
    env = {
        **os.environ,
        "CACHEMESH_KEY_A": stack.keys["tenant-a"],
        "CACHEMESH_KEY_B": stack.keys["tenant-b"],
        "CACHEMESH_INTERNAL_TOKEN": stack.internal_token,
    }
    loadtest = run_dir / "secrets-loadtest.json"
    run = subprocess.run(
        [sys.executable, "-m", "cachemesh.loadtest", "--target", stack.target,
         "--workload", "synthetic", "--requests", "6", "--concurrency", "2",
         "--out", str(loadtest)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    names = setting_names(read_env_file(ROOT / ".env"))
    settings = own_settings({**stack.stack.settings(), **env}, names, list(stack.keys.values()))
    doc = output.document(
        run={"levels": [1]}, workload={}, stack=settings, stacks={}, results={"cases": {}},
        ratios={},
    )  # fmt: skip
    bench = output.write(doc, [], run_dir / "secrets-results", "2026-01-01")

    texts = {path.name: path.read_text(errors="replace") for path in (run_dir / "logs").iterdir()}
    texts["errors"] = "\n".join(errors) + run.stdout + run.stderr
    texts["spans"] = json.dumps(
        [
            (s.service, s.name, s.attributes, s.events, s.status_message)
            for s in settled_spans(stack.sink, before, 2 + 1 + 6, direct)
        ],
        default=str,
    )
    for report in (loadtest, bench, bench.with_suffix(".html")):
        texts[report.name] = report.read_text()
    for name, address in stack.stack.metrics_addresses.items():
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            texts[f"metrics of {name}"] = reply.read().decode()
    logs = [text for where, text in texts.items() if where.endswith(".log")]
    texts.update(_at_rest(stack))
    assert len(logs) >= 6 and not any(asked in text for text in logs)  # INFO: no prompt text
    assert len(errors) == 3 and all(errors) and texts["spans"] != "[]"
    crossed = {s.service for s in stack.sink.spans_of(asked_trace)}  # the wait checked calls
    assert {"router", "semantic-cache", "prefix-cache"} <= crossed, crossed
    assert any(service.startswith("model") for service in crossed), crossed
    admin_token = (run_dir / "admin-token").read_text().strip()
    secrets = {
        **stack.keys,
        "internal token": stack.internal_token,
        "admin token": admin_token,
        "Redis password": (run_dir / "redis-password").read_text().strip(),
    }
    for name, secret in secrets.items():
        for fragment in _fragments(secret):
            leaks = [where for where, text in texts.items() if fragment in text]
            assert not leaks, f"{name} ({len(fragment)} characters of it) in {leaks}"
