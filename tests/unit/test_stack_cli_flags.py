"""``python -m services.tools.stack up --run-dir X`` was refused ("unrecognized arguments"):
only ``--run-dir X up`` worked. ``--root`` and ``--run-dir`` now parse after the subcommand
too, and one given before it is kept when the subcommand's parser does not see it again."""

from __future__ import annotations

import pytest

from services.tools.stack.cli import _parser


@pytest.mark.parametrize(
    "command", [["up"], ["down"], ["status"], ["stop", "router"], ["keys"], ["reset-l2"]]
)
@pytest.mark.parametrize("flags", [["--run-dir", "/srv/run"], ["--root", "/srv/cachemesh"]])
def test_the_stack_flags_parse_before_or_after_the_subcommand(
    command: list[str], flags: list[str]
) -> None:
    bare = vars(_parser().parse_args(command))
    before = vars(_parser().parse_args([*flags, *command]))
    after = vars(_parser().parse_args([*command, *flags]))
    assert before == after != bare


def test_one_before_and_another_after_are_both_kept() -> None:
    args = _parser().parse_args(["--root", "/srv/cachemesh", "up", "--run-dir", "/srv/run"])
    assert str(args.root) == "/srv/cachemesh" and str(args.run_dir) == "/srv/run"


@pytest.mark.parametrize(
    "argv",
    [
        # a probe with no time said UNREACHABLE of a service that serves (exit 1)
        ["probe", "127.0.0.1:50051", "--timeout", "0"],
        ["probe", "127.0.0.1:50051", "--timeout", "-1"],
        ["probe", "127.0.0.1:50051", "--timeout", "nan"],
        # taken as no grace at all, unsaid: SIGKILL at once ("still running after nans")
        ["down", "--grace", "-1"],
        ["down", "--grace", "nan"],
        ["down", "--grace", "inf"],
    ],
)
def test_a_duration_of_no_time_is_refused_naming_the_flag(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        _parser().parse_args(argv)
    assert stopped.value.code == 2
    flag = argv[-2]
    assert f"argument {flag}:" in capsys.readouterr().err


def test_a_grace_of_zero_is_a_grace() -> None:  # 0 is a valid number: SIGKILL at once
    assert _parser().parse_args(["down", "--grace", "0"]).grace == 0.0
    assert _parser().parse_args(["down", "--grace", "2.5"]).grace == 2.5
    assert _parser().parse_args(["probe", "x:1", "--timeout", "0.5"]).timeout == 0.5
