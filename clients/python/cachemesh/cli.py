"""``cachemesh ask "..."``: one question through the Gateway, with where it was served from.
``cachemesh admin ...``: the router's Admin API (keys, stats, purges, cache policy)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping

from cachemesh._argv import Parser, piped, secret_flag, subcommand_parsers
from cachemesh._auth import bearer_metadata
from cachemesh._channel import DEFAULT_TIMEOUT_S, TIMEOUT_MAX_S, never_connected
from cachemesh._client import DEFAULT_TARGET, Client
from cachemesh._errors import CachemeshError, DeadlineExceededError, UnavailableError
from cachemesh._requests import answer_text, build_request
from cachemesh._tls import INSECURE_ENV, check_plaintext, insecure_from_args
from cachemesh._tls import add_arguments as add_tls_arguments
from cachemesh._tls import env_bool as env_bool  # the CLI's, read as the services read it
from cachemesh._tls import from_args as tls_from_args
from cachemesh.admin_cli import add_parser as add_admin_parser
from cachemesh.admin_cli import run as run_admin
from cachemesh.v1 import gateway_pb2 as pb

NANOS_PER_DOLLAR = 1_000_000_000


def dollars(nanos: int) -> str:
    return f"${nanos / NANOS_PER_DOLLAR:,.6f}"


MAX_TOKENS_MAX = 2**31 - 1  # the request's int32 field


def _max_tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_TOKENS_MAX:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 1 to {MAX_TOKENS_MAX}, got {text!r}"
        )
    return value


TIMEOUT_ENV = "CACHEMESH_TIMEOUT_S"
TIMEOUT_DEFAULT_S = DEFAULT_TIMEOUT_S  # the Client's own default


def _seconds(text: str) -> float:
    """A deadline in seconds, over 0 and at most a day; a ValueError saying so."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= TIMEOUT_MAX_S:  # nan and inf fail too
        raise ValueError(f"must be a number of seconds over 0, at most {TIMEOUT_MAX_S:,.0f}")
    return value


def _timeout_arg(text: str) -> float:
    try:
        return _seconds(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error}, got {text!r}") from None


def timeout_s(given: float | None, environ: Mapping[str, str] | None = None) -> float:
    """The call's deadline: ``--timeout``, else CACHEMESH_TIMEOUT_S, else 120 s. A malformed
    CACHEMESH_TIMEOUT_S is a ValueError naming it."""
    if given is not None:
        return given
    text = (os.environ if environ is None else environ).get(TIMEOUT_ENV, "").strip()
    if not text:
        return TIMEOUT_DEFAULT_S
    try:
        return _seconds(text)
    except ValueError as error:
        raise ValueError(f"{TIMEOUT_ENV} {error}, got {text!r}") from None


def _check_utf8(args: argparse.Namespace) -> None:
    """Text gRPC cannot send (argv bytes that are not UTF-8 arrive as lone surrogates): a
    ValueError naming the argument, never its text (a question may be private)."""
    for what, value in (
        ("the question", args.question),
        ("--system", args.system),
        ("--model", args.model),
        ("--namespace", args.namespace),
        ("--request-id", args.request_id),
    ):
        try:
            (value or "").encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"{what} is not valid UTF-8 (check the terminal's or the file's encoding)"
            ) from None


_INSECURE_SENDS = (
    f"ask: the API key in cleartext on the network, as env {INSECURE_ENV}=1 (1/0, "
    "true/false, yes/no, on/off) allows too; admin: the admin token, with this flag only: "
    "the variable allows API keys only"
)


def _add_global_arguments(parser: argparse.ArgumentParser, *, inherited: bool = False) -> None:
    """``--target``, the TLS flags and ``--insecure`` (and the refused ``--key``): on the
    command's own parser with their defaults; ``inherited``: on a subcommand's (users put
    flags after ``admin`` or ``ask`` as often as before them), with no default, so one not
    given there leaves what the command's parser took."""
    parser.add_argument(
        "--target",
        default=argparse.SUPPRESS
        if inherited
        else os.environ.get("CACHEMESH_TARGET", DEFAULT_TARGET),
        help="the Gateway's host:port (env CACHEMESH_TARGET)",
    )
    # refused when given (main): the API key comes from CACHEMESH_API_KEY only
    parser.add_argument(
        "--key", default=argparse.SUPPRESS if inherited else None, help=argparse.SUPPRESS
    )
    add_tls_arguments(parser, _INSECURE_SENDS, inherited=inherited)  # and --insecure


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cachemesh",
        description=__doc__,
        epilog="The API key comes from CACHEMESH_API_KEY (`source .run/demo-keys.env` sets "
        "CACHEMESH_KEY_A/B; `make keys` writes them), never from the command line. "
        "--target, --insecure and the TLS flags go before or after the subcommand.",
    )
    _add_global_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser("ask", help="ask one question")
    ask.add_argument("question")
    ask.add_argument("--model", default="auto", help='a model id or "auto" (default)')
    ask.add_argument("--max-tokens", type=_max_tokens, default=512, help="1 to 2147483647")
    ask.add_argument("--system", default=None, help="a system prompt")
    ask.add_argument("--namespace", default="", help="semantic-cache namespace")
    ask.add_argument("--request-id", default="", help="idempotency key")
    ask.add_argument(
        "--timeout",
        type=_timeout_arg,
        default=None,
        help=f"the call's deadline in seconds (env {TIMEOUT_ENV}; default "
        f"{TIMEOUT_DEFAULT_S:.0f}): an answer still running then is cut and billed for what "
        "was produced",
    )
    ask.add_argument("--json", action="store_true", help="print the whole response as JSON")
    add_admin_parser(commands)
    for sub in subcommand_parsers(parser):
        _add_global_arguments(sub, inherited=True)
    return parser


def _report(response: pb.CompleteResponse) -> str:
    lines = [
        answer_text(response),
        "",
        f"served_by: {pb.Layer.Name(response.served_by)}"
        + (
            f" (similarity {response.semantic.similarity:.3f}"
            f"{', exact' if response.semantic.exact else ''})"
            if response.served_by == pb.LAYER_SEMANTIC_CACHE
            else ""
        ),
        f"model:     {response.model} ({response.tier} tier), stop: {response.stop_reason}",
        f"tokens:    input {response.usage.input_tokens}, cache read "
        f"{response.usage.cache_read_input_tokens}, cache write "
        f"{response.usage.cache_creation_input_tokens}, output {response.usage.output_tokens}",
        f"cost:      {dollars(response.cost.cost_nanos)} (baseline "
        f"{dollars(response.cost.baseline_nanos)}, saved {dollars(response.cost.saved_nanos)}"
        f"{', estimated' if response.cost.estimated else ''})"
        + (" replayed: billed once, on the first call" if response.replayed else ""),
        f"trace_id:  {response.trace_id}",
        f"request:   {response.request_id}",
    ]
    return "\n".join(lines)


def _key_given(argv: list[str]) -> bool:
    """``--key`` anywhere on the command line: before or after the subcommand, with ``=`` or
    not (argparse would echo a value after the subcommand as an unrecognized argument)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--key" or arg.startswith("--key="):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    return piped(_main, argv)  # a reader of stdout that goes away: quiet, 141


def _main(argv: list[str] | None) -> int:
    given, parser = sys.argv[1:] if argv is None else argv, _parser()
    if (flag := secret_flag(given, parser)) is not None:  # its value never echoed
        print(
            f"cachemesh: {flag} is not an option (its value is not shown): the API key comes "
            "from CACHEMESH_API_KEY, the admin token from CACHEMESH_ADMIN_TOKEN_FILE",
            file=sys.stderr,
        )
        return 2
    args = None if _key_given(given) else parser.parse_args(argv)
    if args is None or args.key is not None:  # never echoed: it is in the history and ps
        print(
            "cachemesh: --key is refused: other users' ps would see the API key; "
            "set CACHEMESH_API_KEY instead",
            file=sys.stderr,
        )
        return 2
    admin = args.command == "admin"
    secret = "the admin token" if admin else "the API key"
    try:
        tls = tls_from_args(args)
        keys_insecure = insecure_from_args(args)  # CACHEMESH_INSECURE read (and checked) too
        # the admin token in cleartext: an explicit --insecure only, never the keys' variable
        args.insecure = bool(args.insecure) if admin else keys_insecure
        check_plaintext(args.target, tls, args.insecure, secret, env_allows=not admin)
    except ValueError as error:
        print(f"cachemesh: {error}", file=sys.stderr)
        return 2
    if args.command == "admin":
        return run_admin(args, args.target, tls)
    key = os.environ.get("CACHEMESH_API_KEY", "")
    if not key.strip():
        demo = [name for name in ("CACHEMESH_KEY_A", "CACHEMESH_KEY_B") if os.environ.get(name)]
        hint = (  # source .run/demo-keys.env sets these, not CACHEMESH_API_KEY
            f" (a demo key: CACHEMESH_API_KEY=${demo[0]} cachemesh ask ...)" if demo else ""
        )
        print(f"cachemesh: no API key: set CACHEMESH_API_KEY{hint}", file=sys.stderr)
        return 2
    try:
        timeout = timeout_s(args.timeout)
        bearer_metadata(key, "CACHEMESH_API_KEY")  # a bad one named as the user set it
        _check_utf8(args)
        request = build_request(
            args.question,
            model=args.model,
            max_tokens=args.max_tokens,
            system=args.system,
            namespace=args.namespace,
            request_id=args.request_id,
        )
        # a person at a terminal: a Gateway that is down is said after gRPC's retries (about
        # 4 s), not waited for within the timeout
        with Client(
            args.target,
            api_key=key,
            tls=tls,
            wait_for_ready=False,
            timeout_s=timeout,
            insecure=args.insecure,
        ) as client:
            response = client.complete(request)
    except DeadlineExceededError as error:  # no answer made, billed: a retry is billed again
        print(f"cachemesh: {error.code.name}: {error.message}", file=sys.stderr)
        rid = error.request_id
        if not error.cut_by_gateway:  # no status from the Gateway in time: cut, or not seen
            print(
                f"request_id: {rid} (no status from the Gateway within its deadline: it may "
                "have cut the call and billed what the model produced, its status arriving too "
                f"late, or never received it; retry with --request-id {rid}: replayed if an "
                "answer was made, else a new model call, billed again; or give a longer "
                "--timeout)",
                file=sys.stderr,
            )
            return 1
        advice = "a longer --timeout"
        if error.smaller_max_tokens_helps:
            advice += " or a smaller --max-tokens"
        print(
            f"request_id: {error.request_id} (not answered within its deadline and billed "
            f"for what the model produced: a retry would be billed again; give {advice})",
            file=sys.stderr,
        )
        return 1
    except UnavailableError as error:  # its answer may have been made (and billed): retry
        if never_connected(error.code, error.message):  # the last attempt connected nowhere
            print(
                f"cachemesh: could not connect to {args.target} (is the Gateway up: make status? "
                f"its TLS settings?): {error.message}",
                file=sys.stderr,
            )
            rid = error.request_id  # an earlier attempt may have reached it: billed once
            print(f"request_id: {rid} (once it is up: --request-id {rid})", file=sys.stderr)
            return 1
        print(f"cachemesh: {error.code.name}: {error.message}", file=sys.stderr)
        rid = error.request_id
        print(f"request_id: {rid} (retry with --request-id {rid})", file=sys.stderr)
        return 1
    except CachemeshError as error:
        print(f"cachemesh: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # bad text, an unreadable TLS file, an unsendable key
        print(f"cachemesh: {error}", file=sys.stderr)
        return 2
    if args.json:
        from google.protobuf.json_format import MessageToDict

        # every field, a zero or false one too (an L1 hit's costNanos: 0 is an answer)
        whole = MessageToDict(response, always_print_fields_with_no_presence=True)
        print(json.dumps(whole, indent=2))
    else:
        print(_report(response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
