"""``cachemesh ask``'s TLS settings against a fake plaintext Gateway (a real gRPC server in
this process): a setting that asks for TLS never sends the API key in cleartext, and a value
the CLI cannot read is an error naming the variable, never plaintext."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachemesh import Tls, admin_cli, cli
from cachemesh._errors import CachemeshError
from cachemesh.cli import main
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import gateway_pb2_grpc
from tests.certs import Authority

SETTINGS = (
    "CACHEMESH_TLS",
    "CACHEMESH_CA_FILE",
    "CACHEMESH_CERT_FILE",
    "CACHEMESH_KEY_FILE",
    "CACHEMESH_INSECURE",
)
KEY = "cm_live_not_for_cleartext"


class PlaintextGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self) -> None:
        self.keys: list[str] = []  # the authorization each call carried

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        self.keys += [v for k, v in context.invocation_metadata() if k == "authorization"]
        return pb.CompleteResponse(stop_reason="end_turn")

    def StreamComplete(
        self, request: pb.CompleteRequest, context: Any
    ) -> Iterator[pb.CompleteChunk]:
        raise NotImplementedError("the CLI does not stream")


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[PlaintextGateway, str]]:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    fake = PlaintextGateway()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


def _given(deadline_s: float) -> float:
    """The most time left a server may see of a call given ``deadline_s``: gRPC's timeout
    header rounds it up to a coarser unit (0.3 s was seen as 0.3005, 120 s as 120.998)."""
    return deadline_s * 1.01 + 0.01


def _ask(target: str) -> int:
    return main(["--target", target, "ask", "hi"])


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEMESH_API_KEY", KEY)


def test_the_plaintext_gateway_gets_the_key_when_tls_is_off(
    gateway: tuple[PlaintextGateway, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fake sees what a plaintext Gateway would (so the tests below can fail)."""
    fake, target = gateway
    monkeypatch.setenv("CACHEMESH_TLS", "off")
    assert _ask(target) == 0
    assert fake.keys == [f"Bearer {KEY}"]


def test_cachemesh_tls_on_means_tls(
    gateway: tuple[PlaintextGateway, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``on``, which every service reads as true, is TLS: the handshake with a plaintext
    Gateway fails and the key is never sent."""
    fake, target = gateway
    monkeypatch.setenv("CACHEMESH_TLS", "on")
    assert _ask(target) == 1
    assert fake.keys == []


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("CACHEMESH_TLS", "y", "CACHEMESH_TLS must be true or false"),
        ("CACHEMESH_TLS", "enabled", "CACHEMESH_TLS must be true or false"),
        ("CACHEMESH_CA_FILE", "", "--ca-file (env CACHEMESH_CA_FILE) is empty"),
        ("CACHEMESH_CA_FILE", " ", "--ca-file (env CACHEMESH_CA_FILE) is empty"),
    ],
)
def test_a_tls_setting_the_cli_cannot_read_is_an_error_naming_it(
    gateway: tuple[PlaintextGateway, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    said: str,
) -> None:
    fake, target = gateway
    monkeypatch.setenv(name, value)
    assert _ask(target) == 2
    assert said in capsys.readouterr().err
    assert fake.keys == []


def test_an_empty_ca_file_flag_is_an_error_too(
    gateway: tuple[PlaintextGateway, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, target = gateway
    assert main(["--target", target, "--ca-file", "", "ask", "hi"]) == 2
    assert "--ca-file (env CACHEMESH_CA_FILE) is empty" in capsys.readouterr().err
    assert fake.keys == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *((v, True) for v in ("1", "true", "TRUE", "yes", "on", " On ")),
        *((v, False) for v in ("", " ", "0", "false", "no", "off", "OFF")),
    ],
)
def test_cachemesh_tls_reads_what_the_services_read(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    """services/common/env.py's ``Env.bool``: unset or empty is the default (false here)."""
    monkeypatch.setenv("CACHEMESH_TLS", value)
    assert cli.env_bool("CACHEMESH_TLS") is expected


NOT_PEM = "pasted-by-mistake-0123456789"  # what a file that is not PEM holds


@pytest.mark.parametrize(
    ("flag", "lacks"),
    [("--ca-file", "CERTIFICATE"), ("--cert-file", "CERTIFICATE"), ("--key-file", "PRIVATE KEY")],
)
@pytest.mark.parametrize("command", [["ask", "hi"], ["admin", "stats"]])
def test_a_tls_file_that_is_not_pem_is_an_error_naming_it(
    gateway: tuple[PlaintextGateway, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    flag: str,
    lacks: str,
    command: list[str],
) -> None:
    """gRPC takes any bytes and then every call waits out its deadline (DEADLINE_EXCEEDED,
    TLS never named): the file is checked before a channel is made, one line, exit 2, and
    never its contents."""
    fake, target = gateway
    authority = Authority(tmp_path)
    issued = authority.issue("client", server=False)
    files = {"--ca-file": authority.ca, "--cert-file": issued.cert, "--key-file": issued.key}
    files[flag] = tmp_path / "not-pem.pem"
    files[flag].write_text(NOT_PEM + "\n")
    monkeypatch.setenv("CACHEMESH_ADMIN_TOKEN", "admin-token-for-the-cli-tests")
    tls = [arg for pair in files.items() for arg in (pair[0], str(pair[1]))]
    assert main(["--target", target, *tls, *command]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert str(files[flag]) in err and lacks in err
    assert NOT_PEM not in err
    assert fake.keys == []


def test_pem_tls_files_make_credentials(tmp_path: Path) -> None:
    """The check lets real PEM files through (so the test above can fail only on the check)."""
    authority = Authority(tmp_path)
    issued = authority.issue("client", server=False)
    Tls(ca_file=authority.ca, cert_file=issued.cert, key_file=issued.key).credentials()


@pytest.mark.parametrize("value", ["99999999999", "-3000000000", "0", "-1", "2147483648", "many"])
def test_max_tokens_out_of_range_is_a_usage_error(
    gateway: tuple[PlaintextGateway, str], capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """Not a traceback from protobuf's int32 field: argparse's error, exit 2, nothing sent."""
    fake, target = gateway
    with pytest.raises(SystemExit) as exited:
        main(["--target", target, "ask", "--max-tokens", value, "hi"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--max-tokens" in err and "from 1 to 2147483647" in err
    assert fake.keys == []


def test_the_largest_max_tokens_is_sent(gateway: tuple[PlaintextGateway, str]) -> None:
    fake, target = gateway
    assert main(["--target", target, "ask", "--max-tokens", "2147483647", "hi"]) == 0
    assert fake.keys == [f"Bearer {KEY}"]


SECRET = "caf\udce9 my password is hunter2"  # a Latin-1 byte in argv: a lone surrogate


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["ask", SECRET], "the question is not valid UTF-8"),
        (["ask", "--system", SECRET, "hi"], "--system is not valid UTF-8"),
        (["ask", "--namespace", SECRET, "hi"], "--namespace is not valid UTF-8"),
    ],
)
def test_text_that_is_not_utf8_is_an_error_that_never_echoes_it(
    gateway: tuple[PlaintextGateway, str],
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    said: str,
) -> None:
    fake, target = gateway
    assert main(["--target", target, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err, err
    assert "hunter2" not in err
    assert fake.keys == []


@pytest.mark.parametrize("command", [["ask", "hi"], ["admin", "stats"]])
@pytest.mark.parametrize("where", ["before", "after", "after="])
def test_an_api_key_on_the_command_line_is_refused(
    gateway: tuple[PlaintextGateway, str],
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    where: str,
) -> None:
    """As the admin token: other users' ``ps`` shows the command line, so ``--key`` is
    refused (never used, never echoed) and CACHEMESH_API_KEY named; after the subcommand too,
    where argparse echoed the key as an unrecognized argument."""
    fake, target = gateway
    key = "cm_live_on_the_command_line"
    argv = {
        "before": ["--target", target, "--key", key, *command],
        "after": ["--target", target, *command, "--key", key],
        "after=": ["--target", target, *command, f"--key={key}"],
    }[where]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CACHEMESH_API_KEY" in err, err
    assert "cm_live_on_the_command_line" not in err
    assert fake.keys == []


def test_a_replayed_answer_says_its_cost_was_billed_on_the_first_call() -> None:
    """``ask --request-id`` again is served the first answer: the same cost, billed once."""
    cost = pb.Cost(cost_nanos=474_000, baseline_nanos=474_000)
    first = pb.CompleteResponse(served_by=pb.LAYER_MODEL, cost=cost)
    again = pb.CompleteResponse(served_by=pb.LAYER_MODEL, cost=cost, replayed=True)
    assert "replayed" not in cli._report(first)
    assert "replayed: billed once, on the first call" in cli._report(again)


REMOTE = "192.0.2.1:50051"  # TEST-NET-1: not loopback (never dialled here)


class Dialled:
    """Stands for ``Client`` and ``AdminClient``: records the target and TLS each was made
    with (and its ``insecure``), then fails as an unreachable Gateway would (nothing is sent
    anywhere)."""

    def __init__(self) -> None:
        self.made: list[tuple[str, Tls | None]] = []
        self.insecure: list[bool] = []

    def __call__(
        self, target: str, *, tls: Tls | None = None, insecure: bool = False, **_: object
    ) -> None:
        self.made.append((target, tls))
        self.insecure.append(insecure)
        raise CachemeshError(grpc.StatusCode.UNAVAILABLE, "not dialled in this test")


@pytest.fixture
def dialled(monkeypatch: pytest.MonkeyPatch) -> Dialled:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CACHEMESH_ADMIN_TOKEN", "admin-token-for-the-cli-tests")
    recorder = Dialled()
    monkeypatch.setattr(cli, "Client", recorder)
    monkeypatch.setattr(admin_cli, "AdminClient", recorder)
    return recorder


@pytest.mark.parametrize("command", [["ask", "hi"], ["admin", "stats"]])
def test_a_remote_target_in_plaintext_is_refused_before_any_key_is_sent(
    dialled: Dialled, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """As ``cachemesh-load``: the API key (``ask``) or the admin token (``admin``) would cross
    the network in cleartext to a target that is not loopback and no TLS setting is given;
    one line naming the target, TLS and ``--insecure``, exit 2, no channel opened."""
    assert main(["--target", REMOTE, *command]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"--target {REMOTE} is not loopback" in err and "--insecure" in err
    assert "--tls" in err and "cleartext" in err
    assert dialled.made == []


@pytest.mark.parametrize("command", [["ask", "hi"], ["admin", "stats"]])
@pytest.mark.parametrize(
    ("flags", "tls"),
    [(["--insecure"], False), (["--tls"], True)],
)
def test_insecure_or_tls_lets_a_remote_target_through(
    dialled: Dialled, command: list[str], flags: list[str], tls: bool
) -> None:
    assert main(["--target", REMOTE, *flags, *command]) == 1  # the recorder's UNAVAILABLE
    ((target, made_tls),) = dialled.made
    assert target == REMOTE and (made_tls is not None) is tls
    assert dialled.insecure == [not tls]  # --insecure reaches the client, which refuses too


def test_cachemesh_insecure_lets_a_remote_target_through_as_insecure_does(
    dialled: Dialled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One setting for the three command lines: ``make demo`` read CACHEMESH_INSECURE, and
    ``cachemesh`` refused the same target in the same shell (exit 2) until ``--insecure``."""
    monkeypatch.setenv("CACHEMESH_INSECURE", "1")
    assert main(["--target", REMOTE, "ask", "hi"]) == 1  # the recorder's UNAVAILABLE
    assert dialled.made == [(REMOTE, None)] and dialled.insecure == [True]


def test_cachemesh_insecure_never_sends_the_admin_token_in_cleartext(
    dialled: Dialled, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """CACHEMESH_INSECURE allows the API keys only (``ask``, ``cachemesh-load``, the demo), as
    ``cachemesh-load`` never sends the admin token in cleartext: with it set for a demo run,
    ``cachemesh admin`` sent the admin token to a remote target in cleartext (a sniffing
    server saw ``authorization: Bearer adm-...``). The admin token needs ``--insecure``
    itself, and the refusal does not offer the variable."""
    monkeypatch.setenv("CACHEMESH_INSECURE", "1")
    assert main(["--target", REMOTE, "admin", "stats"]) == 2
    err = capsys.readouterr().err
    assert dialled.made == [] and err.count("\n") == 1, err
    assert "the admin token" in err and "--insecure" in err
    assert "CACHEMESH_INSECURE=1" not in err  # the variable does not allow it
    assert main(["--target", REMOTE, "--insecure", "admin", "stats"]) == 1  # UNAVAILABLE
    assert dialled.made == [(REMOTE, None)] and dialled.insecure == [True]


def test_the_insecure_help_says_what_each_tool_sends() -> None:
    """``--insecure``'s help said "the API key or admin token in cleartext" for each tool:
    ``cachemesh-load`` never sends its admin token so, and for ``cachemesh admin`` only the
    flag allows it."""
    from cachemesh.loadtest import cli as load_cli

    mine = " ".join(cli._parser().format_help().split())
    assert "CACHEMESH_INSECURE" in mine and "admin token" in mine, mine
    assert "API key or admin token" not in mine, mine
    load = " ".join(load_cli.parser().format_help().split())
    assert "admin token is never sent" in load and "API key or admin token" not in load, load


@pytest.mark.parametrize("value", ["0", "maybe"])
def test_cachemesh_insecure_off_or_malformed_refuses_a_remote_target(
    dialled: Dialled, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    value: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("CACHEMESH_INSECURE", value)
    assert main(["--target", REMOTE, "ask", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and dialled.made == [], err
    if value == "maybe":  # named, even where --insecure is given (as CACHEMESH_TLS is)
        assert "CACHEMESH_INSECURE must be true or false" in err
        assert main(["--target", REMOTE, "--insecure", "ask", "hi"]) == 2
        assert dialled.made == []


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "localhost:50051", "[::1]:50051"])
def test_a_loopback_target_in_plaintext_needs_no_flag(dialled: Dialled, target: str) -> None:
    assert main(["--target", target, "ask", "hi"]) == 1
    assert dialled.made == [(target, None)]


class FailingGateway(gateway_pb2_grpc.GatewayServicer):
    """Fails every call with ``code`` (as a Gateway whose model call failed or was cut at the
    deadline, after it may have made and billed the answer); records the ids it was sent."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.ids: list[str] = []

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        self.ids.append(request.request_id)
        context.abort(self.code, f"fake {self.code.name}")
        raise AssertionError("abort raises")

    def StreamComplete(
        self, request: pb.CompleteRequest, context: Any
    ) -> Iterator[pb.CompleteChunk]:
        raise NotImplementedError("the CLI does not stream")


@pytest.fixture
def failing(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[grpc.StatusCode], tuple[FailingGateway, str]]]:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    servers: list[tuple[grpc.Server, FailingGateway]] = []

    def serve(code: grpc.StatusCode) -> tuple[FailingGateway, str]:
        fake = FailingGateway(code)
        server = grpc.server(futures.ThreadPoolExecutor(2))
        gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append((server, fake))
        return fake, f"127.0.0.1:{port}"

    yield serve
    for server, _ in servers:
        server.stop(None)


@pytest.mark.parametrize("given", ["", "order-42"])
def test_a_call_that_may_have_been_answered_names_its_request_id_to_retry_with(
    failing: Callable[[grpc.StatusCode], tuple[FailingGateway, str]],
    capsys: pytest.CaptureFixture[str],
    given: str,
) -> None:
    """The README's idempotent retry (``--request-id``) needs the id the failed call was sent
    with: the CLI made one (or took ``--request-id``) and never printed it."""
    code = grpc.StatusCode.UNAVAILABLE
    fake, target = failing(code)
    argv = ["--target", target, "ask", "hi", *(["--request-id", given] if given else [])]
    assert main(argv) == 1
    err = capsys.readouterr().err
    (sent,) = set(fake.ids)  # gRPC's retries resend the same id
    assert given in ("", sent)
    assert f"request_id: {sent} (retry with --request-id {sent})" in err.splitlines(), err
    assert err.splitlines()[0] == f"cachemesh: {code.name}: fake {code.name}"


def test_a_call_cut_at_its_deadline_advises_a_longer_timeout_not_a_retry(
    failing: Callable[[grpc.StatusCode], tuple[FailingGateway, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A call cut at its deadline made no answer and was billed for what it produced: a retry
    with its id is a new model call, billed again, cut the same way (the README's "Errors").
    It said "retry with --request-id"."""
    _, target = failing(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert main(["--target", target, "ask", "hi"]) == 1
    err = capsys.readouterr().err
    assert "retry with" not in err, err
    assert "--timeout" in err and "--max-tokens" in err, err
    assert err.splitlines()[0] == "cachemesh: DEADLINE_EXCEEDED: fake DEADLINE_EXCEEDED"


def test_a_deadline_with_no_status_from_the_gateway_says_both_and_names_the_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """gRPC's own "Deadline Exceeded" (no status from the Gateway in time: stalled, never
    reached, or its cut's status came too late): the CLI cannot tell which, so it says both
    (cut and billed, or never received), and names the id to retry with (replayed if an answer
    was made, else a new model call, billed again). It said the Gateway "may not have received
    the call" only: 5 of 64 calls the router cut and billed at 0.2 s were told so."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    fake = SlowGateway(2.0)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        assert main(["--target", target, "ask", "hi", "--timeout", "0.3"]) == 1
    finally:
        server.stop(None)
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "cachemesh: DEADLINE_EXCEEDED: Deadline Exceeded", err
    assert "no status from the Gateway" in err and "never received it" in err
    assert "billed what the model produced" in err and "else a new model call, billed again" in err
    assert "retry with --request-id " in err and "--timeout" in err


class SlowGateway(FailingGateway):
    """Answers after ``delay_s`` (a model still answering); records each call's deadline."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(grpc.StatusCode.OK)
        self.delay_s = delay_s
        self.remaining: list[float] = []

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        self.remaining.append(context.time_remaining())
        time.sleep(self.delay_s)
        return pb.CompleteResponse(stop_reason="end_turn")


@pytest.fixture
def slow(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SlowGateway, str]]:
    for name in (*SETTINGS, "CACHEMESH_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    fake = SlowGateway(1.0)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize("where", ["flag", "env"])
def test_the_deadline_of_ask_is_set_by_timeout_or_cachemesh_timeout_s(
    slow: tuple[SlowGateway, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    """``cachemesh ask`` had a fixed 120 s deadline (the router allows 300 s) and no option."""
    fake, target = slow
    if where == "env":
        monkeypatch.setenv("CACHEMESH_TIMEOUT_S", "0.3")
        argv = ["--target", target, "ask", "hi"]
    else:
        monkeypatch.setenv("CACHEMESH_TIMEOUT_S", "600")  # the flag wins
        argv = ["--target", target, "ask", "hi", "--timeout", "0.3"]
    assert main(argv) == 1
    # the deadline the Gateway got, not the 120 s default nor the 600 s of the environment
    assert fake.remaining and fake.remaining[0] <= _given(0.3)
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err


def test_the_default_deadline_of_ask_is_120_s(
    slow: tuple[SlowGateway, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, target = slow
    fake.delay_s = 0.0
    assert main(["--target", target, "ask", "hi"]) == 0
    # (a loaded machine takes seconds to send it)
    assert 100 < fake.remaining[0] <= _given(120)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", "1e9"])
def test_a_timeout_that_is_not_a_number_of_seconds_is_refused_naming_it(
    slow: tuple[SlowGateway, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: str,
) -> None:
    fake, target = slow
    monkeypatch.setenv("CACHEMESH_TIMEOUT_S", value)
    assert main(["--target", target, "ask", "hi"]) == 2
    assert "CACHEMESH_TIMEOUT_S" in capsys.readouterr().err
    monkeypatch.delenv("CACHEMESH_TIMEOUT_S")
    with pytest.raises(SystemExit) as exited:
        main(["--target", target, "ask", "hi", "--timeout", value])
    assert exited.value.code == 2
    assert "--timeout" in capsys.readouterr().err
    assert fake.remaining == []  # nothing was sent


def test_a_refused_request_names_no_retry(
    failing: Callable[[grpc.StatusCode], tuple[FailingGateway, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A request the Gateway refused was not answered: retrying it as it is gets the same."""
    _, target = failing(grpc.StatusCode.INVALID_ARGUMENT)
    assert main(["--target", target, "ask", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["cachemesh: INVALID_ARGUMENT: fake INVALID_ARGUMENT"]


class HitGateway(PlaintextGateway):
    """Answers as an L1 hit does: cost 0, nothing estimated, no usage."""

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        return pb.CompleteResponse(
            served_by=pb.LAYER_SEMANTIC_CACHE,
            stop_reason="end_turn",
            cost=pb.Cost(cost_nanos=0, baseline_nanos=1500, saved_nanos=1500),
            usage=pb.Usage(),
        )


def test_json_prints_zero_and_false_fields_an_l1_hit_costs_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--json`` dropped every zero or false field: an L1 hit's cost had no costNanos (0 is
    an answer, not a missing one, as ``cachemesh admin --json`` prints it)."""
    import json

    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    gateway_pb2_grpc.add_GatewayServicer_to_server(HitGateway(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert main(["--target", f"127.0.0.1:{port}", "ask", "hi", "--json"]) == 0
    finally:
        server.stop(None)
    printed = json.loads(capsys.readouterr().out)
    assert printed["cost"] == {
        "costNanos": "0",
        "baselineNanos": "1500",
        "savedNanos": "1500",
        "estimated": False,
    }
    assert printed["replayed"] is False and printed["usage"]["outputTokens"] == "0"


def test_no_api_key_after_sourcing_the_demo_keys_says_how_to_use_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``source .run/demo-keys.env`` sets CACHEMESH_KEY_A/B, not CACHEMESH_API_KEY: the refusal
    said only "set CACHEMESH_API_KEY"; it says how to use a demo key, never showing one."""
    monkeypatch.delenv("CACHEMESH_API_KEY", raising=False)
    monkeypatch.setenv("CACHEMESH_KEY_A", "cm_demo-key-never-shown")
    assert main(["ask", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "never-shown" not in err, err
    assert "CACHEMESH_API_KEY=$CACHEMESH_KEY_A" in err


GLOBAL_FLAGS = (
    ["--target", REMOTE],
    ["--insecure"],
    ["--tls"],
    ["--ca-file", "/etc/cachemesh/ca.pem"],
    ["--cert-file", "/etc/cachemesh/client.pem"],
    ["--key-file", "/etc/cachemesh/client.key"],
)


@pytest.mark.parametrize(
    "command",
    [["ask", "hi"], ["admin", "stats"], ["admin", "keys", "list"], ["admin", "policy", "get", "t"]],
)
@pytest.mark.parametrize("flags", GLOBAL_FLAGS, ids=lambda flags: flags[0])
def test_each_global_flag_is_taken_before_or_after_the_subcommand(
    dialled: Dialled, command: list[str], flags: list[str]
) -> None:
    """``cachemesh admin --insecure stats`` was refused ("unrecognized arguments:
    --insecure"): only ``cachemesh --insecure admin stats`` worked. Every global flag now
    parses the same before the subcommand, right after it, and at the end of the line."""
    parser = cli._parser()
    bare = vars(parser.parse_args(command))
    before = vars(parser.parse_args([*flags, *command]))
    after = vars(parser.parse_args([command[0], *flags, *command[1:]]))
    at_end = vars(parser.parse_args([*command, *flags]))
    assert before == after == at_end != bare


@pytest.mark.parametrize(
    "flags", [["--json"], ["--admin-token-file", "/run/admin-token"]], ids=lambda f: f[0]
)
@pytest.mark.parametrize("command", [["stats"], ["keys", "list"], ["limits", "get", "t"]])
def test_admins_own_flags_are_taken_before_or_after_its_subcommand(
    dialled: Dialled, command: list[str], flags: list[str]
) -> None:
    """``admin``'s options as the command's: ``admin stats --json`` as ``admin --json stats``
    (the README said "--json before the subcommand": after it, it was refused)."""
    parser = cli._parser()
    bare = vars(parser.parse_args(["admin", *command]))
    before = vars(parser.parse_args(["admin", *flags, *command]))
    at_end = vars(parser.parse_args(["admin", *command, *flags]))
    assert before == at_end != bare


def test_global_flags_on_both_sides_of_the_subcommand_are_all_kept(dialled: Dialled) -> None:
    """One flag before the subcommand and another after it: the subcommand's parser leaves the
    first as it was (no default of its own overwrites it)."""
    args = cli._parser().parse_args(["--target", REMOTE, "admin", "--insecure", "stats"])
    assert args.target == REMOTE and args.insecure is True and args.tls is False
    args = cli._parser().parse_args(["--insecure", "ask", "hi", "--target", REMOTE])
    assert args.target == REMOTE and args.insecure is True


def test_insecure_after_admin_reaches_the_admin_client(dialled: Dialled) -> None:
    """The whole command: ``--insecure`` and ``--target`` after ``admin`` are used, the
    remote target in plaintext allowed for the admin token by the flag as before it."""
    assert main(["admin", "--insecure", "stats", "--target", REMOTE]) == 1  # UNAVAILABLE
    assert dialled.made == [(REMOTE, None)] and dialled.insecure == [True]
    assert main(["ask", "hi", "--target", REMOTE]) == 2  # read: refused in plaintext
    assert len(dialled.made) == 1


def test_an_api_key_gRPC_cannot_send_is_named_as_the_variable_it_came_from(
    gateway: tuple[PlaintextGateway, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It said "api_key must be printable ASCII", a parameter the CLI's user never gave."""
    fake, target = gateway
    monkeypatch.setenv("CACHEMESH_API_KEY", "cm_live_ké y")
    assert main(["--target", target, "ask", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cachemesh: CACHEMESH_API_KEY must be printable ASCII"), err
    assert "ké" not in err and fake.keys == []
