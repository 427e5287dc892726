"""The progress bar draws on a terminal only; logs get one plain line at the end."""

from __future__ import annotations

import io

from cachemesh.loadtest.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _drive(out: io.StringIO) -> str:
    clock = _Clock()
    bar = Progress("(a) exact x8", 4, out, clock=clock)
    for done in range(1, 5):
        clock.now += 0.5
        bar(done)
    bar.close()
    return out.getvalue()


def test_a_log_or_pipe_gets_no_carriage_return_and_one_plain_line() -> None:
    text = _drive(io.StringIO())  # StringIO.isatty() is False, as a file or a pipe
    assert "\r" not in text and "[" not in text
    assert text.splitlines() == ["(a) exact x8: 4/4    2.0 s     2.0 req/s"]


def test_a_terminal_gets_the_bar_redrawn_in_place() -> None:
    text = _drive(_Terminal())
    assert text.count("\r") == 4 and text.endswith("\n")
    assert "[" + "#" * 30 + "] 4/4" in text
