"""Drives the demo workload and prints what each layer served and what it cost."""

from __future__ import annotations

import os
import sys
import time

from cachemesh._client import DEFAULT_TARGET, Client
from cachemesh._errors import CachemeshError
from cachemesh._requests import answer_text, assistant_message, build_request, user_message
from cachemesh.demo import workload
from cachemesh.demo.table import LayerTable
from cachemesh.v1 import gateway_pb2 as pb


def _require(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        sys.exit(
            f"demo: {name} is not set: run `make keys`, then source .run/demo-keys.env (if it "
            f"says the demo keys are unavailable, set {name} to a key from `cachemesh admin "
            "keys create`)"
        )
    return value


def _agent(client: Client, table: LayerTable, model: str | None) -> None:
    agent_model = model or workload.AGENT_MODEL
    print(f"\n== agent conversation ({agent_model}, long system prompt + 8 tools, cache_control)")
    history: list[pb.Message] = []
    for turn, text in enumerate(workload.AGENT_TURNS, start=1):
        request = pb.CompleteRequest(
            model=agent_model,
            max_tokens=400,
            tools=workload.TOOLS,
            system=workload.agent_system(),
            messages=[*history, user_message(text, cache=True)],
        )
        response = client.complete(request)
        table.add(response)
        print(f"  turn {turn}: {table.describe(response)}")
        history += [user_message(text), assistant_message(answer_text(response))]


def _faq(clients: dict[str, Client], table: LayerTable, model: str | None) -> None:
    print(f"\n== FAQ bot ({model or 'auto tier'}; exact repeats, paraphrases, a second tenant)")
    for tenant, question in workload.FAQ:
        request = build_request(
            question, system=workload.FAQ_SYSTEM, max_tokens=200, model=model or "auto"
        )
        response = clients[tenant].complete(request)
        table.add(response)
        print(f"  [{tenant}] {question!r:58} {table.describe(response)}")


def _unrelated(client: Client, table: LayerTable, model: str | None) -> None:
    print(f"\n== unrelated questions ({model or 'auto tier'})")
    for question in workload.UNRELATED:
        response = client.complete(build_request(question, max_tokens=300, model=model or "auto"))
        table.add(response)
        print(f"  {question[:58]!r:60} {table.describe(response)}")


def main() -> int:
    target = os.environ.get("CACHEMESH_TARGET", DEFAULT_TARGET)
    # a Gateway that is not there fails the first request at once, not after its timeout
    clients = {
        "a": Client(target, api_key=_require("CACHEMESH_KEY_A"), wait_for_ready=False),
        "b": Client(target, api_key=_require("CACHEMESH_KEY_B"), wait_for_ready=False),
    }
    # CACHEMESH_DEMO_MODEL: one model for every request (make demo-local: local-small)
    model = os.environ.get("CACHEMESH_DEMO_MODEL") or None
    table = LayerTable()
    started = time.monotonic()
    try:
        _agent(clients["a"], table, model)
        _faq(clients, table, model)
        _unrelated(clients["a"], table, model)
    except CachemeshError as error:
        print(f"demo: the gateway at {target} refused a request: {error}", file=sys.stderr)
        if error.code.name == "UNAVAILABLE":
            print("demo: is the stack running? (make up, or make demo)", file=sys.stderr)
        return 1
    finally:
        for client in clients.values():
            client.close()
    print(f"\n{table.requests} requests in {time.monotonic() - started:.1f} s\n")
    print(table.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
