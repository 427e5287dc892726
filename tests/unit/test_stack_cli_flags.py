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
