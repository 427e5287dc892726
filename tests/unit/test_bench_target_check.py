"""``make bench``'s ``--target``: a remote address or one where no Gateway serves is refused
in one line before the set-up (the embedder, the paraphrase pairs: minutes), not a traceback
advising a flag the bench does not have, nor a 4.5-minute run of errors."""

from __future__ import annotations

from typing import Any

import pytest

from services.tools.bench.gateway import run


class _SetUp(Exception):
    """The bench went on to its set-up."""


def _no_set_up(*_: Any, **__: Any) -> None:
    raise _SetUp


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEMESH_KEY_A", "k")
    monkeypatch.delenv("CACHEMESH_API_KEY", raising=False)
    monkeypatch.setattr(run, "Stack", _no_set_up)
    monkeypatch.setattr(run, "load_minilm_embedder", _no_set_up)


def test_a_remote_target_is_refused_without_a_traceback() -> None:
    with pytest.raises(SystemExit) as exited:
        run.main(["--target", "10.1.2.3:50051"])
    said = str(exited.value.code)
    assert said.startswith("bench --target 10.1.2.3:50051: the bench measures a stack on this")
    assert "--allow-non-loopback" not in said  # not a flag of the bench


def test_a_target_where_no_gateway_serves_is_refused_before_the_set_up() -> None:
    """Before: 'bench --target 127.0.0.1:1' ran 274 s of set-up and UNAVAILABLE requests."""
    with pytest.raises(SystemExit) as exited:
        run.main(["--target", "127.0.0.1:1"])
    assert str(exited.value.code) == "bench --target: no Gateway at 127.0.0.1:1 (make up?)"


def test_a_serving_target_goes_on_to_the_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "check_gateway", lambda target: None)
    with pytest.raises(_SetUp):
        run.main(["--target", "127.0.0.1:1"])


@pytest.mark.parametrize("flag", ["--requests", "--mixed-requests"])
def test_a_count_below_one_is_a_usage_error_naming_the_flag(
    flag: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: sys.exit("bench: --requests and --mixed-requests must be >= 1"), exit 1 (a
    usage error of the other benches is exit 2 naming the one flag)."""
    with pytest.raises(SystemExit) as exited:
        run.main(["--out-dir", str(tmp_path), flag, "0"])
    assert exited.value.code == 2
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
