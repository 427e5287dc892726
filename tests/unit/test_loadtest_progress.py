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


def _cut_run(out: io.StringIO, short: str) -> str:
    """A run of 200 cut at 57 answers, each 0.05 s after the last: a redraw is held back
    every other tick (the 0.1 s limit)."""
    clock = _Clock()
    bar = Progress("load", 200, out, clock=clock)
    for done in range(1, 57):
        clock.now += 0.05
        bar(done)
    bar(57)  # at the same moment: its redraw held back
    clock.now = 3.0
    bar.close(short)
    return out.getvalue()


def test_a_run_cut_short_ends_with_its_final_count_and_why() -> None:
    """A run cut by --duration left the bar at an earlier count (the last redraw held back)
    and the time of that redraw, not filled and saying nothing: read as a run that hung or
    crashed. Its last line now has the final count and time, and why it stopped short."""
    last = _cut_run(_Terminal(), "--duration 3 s reached").split("\r")[-1]
    assert last.startswith("load [" + "#" * 8 + "." * 22 + "] 57/200    3.0 s")
    assert last.endswith(" -- --duration 3 s reached\n")
    plain = _cut_run(io.StringIO(), "interrupted")
    assert plain == "load: 57/200    3.0 s    19.0 req/s -- interrupted\n"


def test_a_complete_run_says_no_reason() -> None:
    out = _Terminal()
    clock = _Clock()
    bar = Progress("load", 2, out, clock=clock)
    bar(1)
    bar(2)
    bar.close("--duration 1 s reached")  # done: not said
    assert out.getvalue().split("\r")[-1].endswith("] 2/2    0.0 s     0.0 req/s\n")
