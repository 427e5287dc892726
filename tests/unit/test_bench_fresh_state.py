"""Each `make bench` stack starts with none of the state an earlier bench left in its run dir:
the durable Redis kept the last run's warm prefixes (a 1-hour breakpoint outlives the minutes
between two runs), so a second run's L2 saving could ride on the first's."""

from __future__ import annotations

from pathlib import Path

from services.tools.bench.gateway.stacks import fresh_state
from services.tools.stack.lifecycle import Stack

ROOT = Path(__file__).resolve().parents[2]


def test_a_bench_stack_starts_without_an_earlier_runs_state(tmp_path: Path) -> None:
    run_dir = tmp_path / ".run" / "bench-x"
    for kept in ("redis/appendonly.aof", "semantic-cache/wal/0001.log", "router/journal"):
        (run_dir / "data" / kept).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / "data" / kept).write_text("an earlier run's")
    (run_dir / "internal-token").write_text("kept")
    fresh_state(Stack(ROOT, run_dir, environ={}), run_dir)
    assert not (run_dir / "data").exists()
    assert (run_dir / "internal-token").read_text() == "kept"  # its keys stay
