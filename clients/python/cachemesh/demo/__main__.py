"""Drives the demo workload and prints what each layer served and what it cost.

Each run asks in a semantic-cache namespace of its own (``demo-<time>``, as cachemesh-load's
runs do), so a second run on the same stack shows the same L1 hits as the first, not the first
run's answers replayed. The namespace scopes L1 only: the prefix cache (L2) stays warm per
tenant and model (for 5 minutes after a prefix's last read), so a run soon after another reads
the agent's prompt from its first turn; the closing note says so, and how to start L2 cold.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time

from cachemesh._argv import Parser
from cachemesh._channel import never_connected
from cachemesh._client import DEFAULT_TARGET, Client
from cachemesh._errors import CachemeshError
from cachemesh._requests import answer_text, assistant_message, build_request, user_message
from cachemesh._tls import INSECURE_ENV, Tls, cleartext_off_host, env_bool, insecure_from_args
from cachemesh._tls import add_arguments as add_tls_arguments
from cachemesh._tls import from_args as tls_from_args
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


# printed under the table: what one run leaves warm for the next
WARM_NOTE = (
    "Each run asks in a semantic-cache (L1) namespace of its own: the L1 hits above are this "
    "run's repeats and paraphrases. The prefix cache (L2) stays warm between runs, per tenant "
    "and model, for 5 minutes after a prefix's last read (an hour for a 1h breakpoint), across "
    "make down too: a run soon after another reads the agent's prompt from its first turn "
    "(cache read instead of cache write)."
)
STOPS_STACK_ENV = "CACHEMESH_DEMO_STOPS_STACK"  # make demo sets it when it started the stack
# make demo-local sets it: the agent is sent no tools, as its model takes none (local-small's
# row says takes_tools = false: SmolLM2's chat template has no tools, and the Gateway refuses
# tools to it)
NO_TOOLS_ENV = "CACHEMESH_DEMO_NO_TOOLS"


def closing_note(stops_stack: bool) -> str:
    """WARM_NOTE and how to start L2 cold: ``make reset-l2`` needs the stack down, which a
    ``make demo`` that started its stack does itself right after this note."""
    cold = (
        "The stack this demo started is stopped next: make reset-l2 then starts L2 cold."
        if stops_stack
        else "To start L2 cold: make down; make reset-l2."
    )
    return f"{WARM_NOTE} {cold}"


def _agent(
    client: Client, table: LayerTable, model: str | None, namespace: str, tools: bool = True
) -> None:
    agent_model = model or workload.AGENT_MODEL
    given = f"+ {len(workload.TOOLS)} tools" if tools else f"and no tools ({NO_TOOLS_ENV})"
    print(f"\n== agent conversation ({agent_model}, long system prompt {given}, cache_control)")
    history: list[pb.Message] = []
    for turn, text in enumerate(workload.AGENT_TURNS, start=1):
        request = pb.CompleteRequest(
            model=agent_model,
            max_tokens=400,
            tools=workload.TOOLS if tools else [],
            system=workload.agent_system(),
            messages=[*history, user_message(text, cache=True)],
            cache=pb.CacheOptions(namespace=namespace),
        )
        response = client.complete(request)
        table.add(response)
        print(f"  turn {turn}: {table.describe(response)}")
        history += [user_message(text), assistant_message(answer_text(response))]


def _faq(clients: dict[str, Client], table: LayerTable, model: str | None, namespace: str) -> None:
    print(f"\n== FAQ bot ({model or 'auto tier'}; exact repeats, paraphrases, a second tenant)")
    for tenant, question in workload.FAQ:
        request = build_request(
            question,
            system=workload.FAQ_SYSTEM,
            max_tokens=200,
            model=model or "auto",
            namespace=namespace,
        )
        response = clients[tenant].complete(request)
        table.add(response)
        print(f"  [{tenant}] {question!r:58} {table.describe(response)}")


def _unrelated(client: Client, table: LayerTable, model: str | None, namespace: str) -> None:
    print(f"\n== unrelated questions ({model or 'auto tier'})")
    for question in workload.UNRELATED:
        request = build_request(
            question, max_tokens=300, model=model or "auto", namespace=namespace
        )
        response = client.complete(request)
        table.add(response)
        print(f"  {question[:58]!r:60} {table.describe(response)}")


def connection(target: str) -> tuple[Tls | None, bool]:
    """The demo's TLS and ``insecure`` from the settings ``cachemesh`` reads (CACHEMESH_TLS,
    CACHEMESH_CA_FILE, CACHEMESH_CERT_FILE, CACHEMESH_KEY_FILE) and CACHEMESH_INSECURE (theirs
    too; the demo takes no flags); a ValueError naming the setting to give when
    ``target`` is not loopback (nor a Unix socket) in plaintext, or a setting is malformed."""
    parser = Parser(add_help=False)
    add_tls_arguments(parser, "the demo keys in cleartext")  # their defaults: the settings
    args = parser.parse_args([])
    tls, insecure = tls_from_args(args), insecure_from_args(args)
    if cleartext_off_host(target, tls, insecure):
        raise ValueError(
            f"CACHEMESH_TARGET {target} is not loopback and TLS is off: the demo keys would "
            "cross the network in cleartext; set CACHEMESH_TLS=1 or CACHEMESH_CA_FILE, or "
            f"{INSECURE_ENV}=1 to allow it"
        )
    return tls, insecure


def main() -> int:
    target = os.environ.get("CACHEMESH_TARGET", DEFAULT_TARGET)
    keys = {"a": _require("CACHEMESH_KEY_A"), "b": _require("CACHEMESH_KEY_B")}
    try:
        stops_stack = env_bool(STOPS_STACK_ENV)
        tools = not env_bool(NO_TOOLS_ENV)
        tls, insecure = connection(target)
        # a Gateway that is not there fails the first request at once, not after its timeout
        clients = {
            tenant: Client(target, api_key=key, tls=tls, insecure=insecure, wait_for_ready=False)
            for tenant, key in keys.items()
        }
    except ValueError as error:  # a setting, a TLS file, a key gRPC cannot send
        print(f"demo: {error}", file=sys.stderr)
        return 2
    # CACHEMESH_DEMO_MODEL: one model for every request (make demo-local: local-small)
    model = os.environ.get("CACHEMESH_DEMO_MODEL") or None
    table = LayerTable()
    namespace = f"demo-{time.time_ns()}"  # L1 only: see WARM_NOTE
    print(f"semantic-cache namespace of this run: {namespace}")
    started = time.monotonic()
    try:
        _agent(clients["a"], table, model, namespace, tools)
        _faq(clients, table, model, namespace)
        _unrelated(clients["a"], table, model, namespace)
    except CachemeshError as error:
        if never_connected(error.code, error.message):  # nothing answered: no Gateway there
            print(
                f"demo: could not connect to the Gateway at {target} (is the stack running? "
                f"make up, or make demo; its TLS settings?): {error.message}",
                file=sys.stderr,
            )
            return 1
        print(f"demo: the gateway at {target} refused a request: {error}", file=sys.stderr)
        if error.code.name == "UNAVAILABLE":
            print("demo: is the stack running? (make up, or make demo)", file=sys.stderr)
        return 1
    finally:
        for client in clients.values():
            client.close()
    print(f"\n{table.requests} requests in {time.monotonic() - started:.1f} s\n")
    print(table.render())
    print("\n" + textwrap.fill(closing_note(stops_stack), width=100))
    return 0


if __name__ == "__main__":
    sys.exit(main())
