"""The README's commands work as printed: every block marked ``<!-- test -->`` runs, in the
README's order, in a fresh copy of the repository against the running test stack.

The copy has this checkout's tracked files, its ``.venv`` (what ``make setup`` would make) and, as
``.run``, the test stack's run dir (what ``make up`` would have written: its keys, admin token and
key file); ``CACHEMESH_TARGET`` points the CLI at the stack, and the printed addresses
(127.0.0.1:50051, :8088) are replaced by the stack's, which runs on free ports. Shell blocks run
one after the other in one ``bash -euo pipefail`` session, as a person types them; a Python block
runs with ``.venv/bin/python`` in that session's environment (after ``source
.run/demo-keys.env``, which the README says to run first).

Blocks marked ``<!-- test: grpcurl -->`` run too when ``grpcurl`` is installed (Debian does not
package it); either way each request's JSON is parsed into the method's request message, so a
field that does not exist fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool, json_format, message_factory

import cachemesh.v1.admin_pb2
import cachemesh.v1.gateway_pb2
from tests.integration.harness import ROOT, RunningStack

pytestmark = pytest.mark.integration

README = ROOT / "README.md"
GATEWAY = "127.0.0.1:50051"
FRONT = "127.0.0.1:8088"
_BLOCK = re.compile(r"<!-- test(?P<kind>: grpcurl)? -->\n```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)
SOURCE_KEYS = "source .run/demo-keys.env\n"
_REQUEST = re.compile(r"-d '(.*?)'\s+\S+\s+(cachemesh\.v1\.\w+/\w+)", re.S)


@dataclass(frozen=True)
class Block:
    kind: str  # "run" or "grpcurl"
    lang: str  # "sh" or "python"
    body: str


def blocks() -> list[Block]:
    return [
        Block("grpcurl" if m["kind"] else "run", m["lang"], m["body"])
        for m in _BLOCK.finditer(README.read_text())
    ]


def test_the_readme_marks_the_blocks_this_test_runs() -> None:
    found = blocks()
    assert [(b.kind, b.lang) for b in found] == [
        ("run", "sh"),
        ("run", "python"),
        ("grpcurl", "sh"),
        ("run", "python"),
        ("run", "sh"),
        ("grpcurl", "sh"),
    ]
    assert "source .run/demo-keys.env" in found[0].body  # the first block sets the session up


def _fresh_copy(stack: RunningStack, into: Path) -> Path:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    (into / ".venv").symlink_to(ROOT / ".venv")
    (into / ".run").symlink_to(stack.stack.run_dir)
    return into


def _script(block: Block, stack: RunningStack, work: Path, number: int) -> str:
    body = block.body.replace(GATEWAY, stack.target)
    body = body.replace(FRONT, stack.addresses["http-front"])
    if block.lang == "python":
        path = work / f".readme-block-{number}.py"
        path.write_text(body)
        return f"{SOURCE_KEYS}.venv/bin/python {shlex.quote(str(path))}\n"
    return body


def test_readme_commands_run_as_printed(stack: RunningStack, tmp_path: Path) -> None:
    work = _fresh_copy(stack, tmp_path / "clone")
    env = {**os.environ, "CACHEMESH_TARGET": stack.target}
    for name in ("CACHEMESH_KEY_A", "CACHEMESH_KEY_B", "CACHEMESH_ADMIN_TOKEN_FILE"):
        env.pop(name, None)  # only what the README's commands set
    env.pop("CACHEMESH_ADMIN_TOKEN", None)
    has_grpcurl = shutil.which("grpcurl") is not None
    outputs: list[str] = []
    for number, block in enumerate(blocks()):
        if block.kind == "grpcurl" and not has_grpcurl:
            continue
        script = _script(block, stack, work, number)
        if number > 0 and SOURCE_KEYS not in script:
            script = SOURCE_KEYS + script  # a later block runs in the same shell session
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=work, env=env, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"README block {number}:\n{block.body}\n{done.stderr}"
        outputs.append(done.stdout)
    ask, client, front, admin = outputs[0], outputs[1], outputs[2], outputs[3]
    if has_grpcurl:
        ask, client, _, front, admin, _ = outputs
    assert "served_by:" in ask and "trace_id:" in ask
    assert re.match(r"^LAYER_[A-Z_]+ -?\d+ [0-9a-f]{32}$", client.strip())  # layer, saved, trace
    assert "simulated" in front.lower()
    assert "API key (shown this once" in admin and "hit rate" in admin
    assert "dropped " in admin and "default TTL" in admin
    assert "10 requests/min" in admin and "$5.00 a day" in admin  # a tenant's own limits


def test_each_grpcurl_request_is_a_valid_message() -> None:
    pool = descriptor_pool.Default()
    checked = 0
    for block in blocks():
        if block.kind != "grpcurl":
            continue
        joined = block.body.replace("\\\n", " ")
        for data, method in re.findall(
            r"-d '(.*?)'\s+\S+\s+(cachemesh\.v1\.\w+/\w+)", joined, re.S
        ):
            service, _, name = method.partition("/")
            descriptor = pool.FindServiceByName(service).FindMethodByName(name)
            request = message_factory.GetMessageClass(descriptor.input_type)()
            json_format.Parse(data, request)  # an unknown field or enum value raises
            checked += 1
    assert checked == 5
    assert cachemesh.v1.admin_pb2.DESCRIPTOR.services_by_name["Admin"]
