"""``python -m cachemesh.loadtest``: a bounded load on a running Gateway; results to JSON.

The workload mixes FAQ questions that repeat (exact and paraphrased), guaranteed L1 misses and an
agent conversation with a cached prefix. The run is bounded by ``--requests`` and never
targets anything but the address it is given (loopback by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

from cachemesh._client import DEFAULT_TARGET, AsyncClient
from cachemesh._errors import CachemeshError
from cachemesh._requests import build_request
from cachemesh.demo import workload
from cachemesh.loadtest.stats import Recorder
from cachemesh.v1 import gateway_pb2 as pb

_PARAPHRASES = [q for _, q in workload.FAQ]


def _next_request(rng: random.Random, i: int) -> tuple[str, pb.CompleteRequest]:
    roll = rng.random()
    if roll < 0.6:
        question = rng.choice(_PARAPHRASES)
        return "faq", build_request(question, system=workload.FAQ_SYSTEM, max_tokens=200)
    if roll < 0.8:
        # a namespace of its own: a guaranteed L1 miss, so the model path is measured too
        return "miss", build_request(rng.choice(workload.UNRELATED), namespace=f"load-{i}")
    turns = workload.AGENT_TURNS[: 1 + i % len(workload.AGENT_TURNS)]
    messages = [
        pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=t)]) for t in turns[:-1]
    ]
    request = pb.CompleteRequest(
        model=workload.AGENT_MODEL,
        max_tokens=200,
        tools=workload.TOOLS,
        system=workload.agent_system(),
        messages=[*_interleave(messages), _user(turns[-1])],
    )
    return "agent", request


def _user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=text)])


def _interleave(users: list[pb.Message]) -> list[pb.Message]:
    out: list[pb.Message] = []
    for message in users:
        out += [message, pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(text="OK.")])]
    return out


async def _run(args: argparse.Namespace, key: str) -> Recorder:
    rng = random.Random(args.seed)
    plan = [_next_request(rng, i) for i in range(args.requests)]
    recorder = Recorder()
    queue: asyncio.Queue[tuple[str, pb.CompleteRequest]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    async with AsyncClient(args.target, api_key=key, timeout_s=120) as client:

        async def worker() -> None:
            while not queue.empty():
                kind, request = queue.get_nowait()
                started = time.perf_counter()
                try:
                    response = await client.complete(request)
                except CachemeshError as error:
                    recorder.error(kind, error.code.name)
                    continue
                recorder.add(kind, response, time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        recorder.wall_s = time.perf_counter() - started
    return recorder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cachemesh.loadtest", description=__doc__)
    parser.add_argument("--target", default=os.environ.get("CACHEMESH_TARGET", DEFAULT_TARGET))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    key = os.environ.get("CACHEMESH_API_KEY") or os.environ.get("CACHEMESH_KEY_A")
    if not key:
        print("loadtest: set CACHEMESH_API_KEY (or source .run/demo-keys.env)", file=sys.stderr)
        return 2
    recorder = asyncio.run(_run(args, key))
    result = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "requests": args.requests,
        "concurrency": args.concurrency,
        **recorder.summary(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if not recorder.errors else 1


if __name__ == "__main__":
    sys.exit(main())
