"""``make fit-router`` (``python -m services.tools.evaluation.router fit``) writes the weights
and the card that pins them only once everything is computed, and the out-of-fold scores into
its ``--cache-dir``, where ``calibrate`` reads them. Before, the weights were written first:
the out-of-fold scores' save to a hard-coded ``.cache/router-eval`` failed (FileNotFoundError)
under another ``--cache-dir`` run from a directory without it, as did an interruption during
those scores, and left weights the card did not pin: the router refused to start until a
refit. Run on the first 80 labelled prompts, the files redirected to ``tmp_path``; their
vectors are embedded once for the module (``embedded``) and each test's ``--cache-dir`` starts
with them, as a second run of the tool's finds them: embedding them took 10-25 s a test."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from services.router.routing.model import RouterCard, RouterModelError, load_router_model
from services.semantic_cache.embedder import load_minilm_embedder
from services.tools.evaluation.router import __main__ as router_cli
from services.tools.evaluation.router.labels import DATA, load_rows
from services.tools.evaluation.semantic_cache.vectors import embed_cached

pytestmark = pytest.mark.skipif(not DATA.is_file(), reason="../shared/data is not here")


def _first_prompts(data: Path) -> None:
    """The header and the first 80 labelled prompts of ``DATA``, into ``data``."""
    with DATA.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    out = io.StringIO()
    csv.writer(out).writerows(rows[:81])
    data.write_text(out.getvalue(), encoding="utf-8")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding the vectors of the first 80 prompts, as the tool saves them (by
    the embedder's version and the texts: the tool embeds again whatever else it is given)."""
    where = tmp_path_factory.mktemp("vectors")
    _first_prompts(where / "labels.csv")
    prompts = [row.prompt for row in load_rows(where / "labels.csv")]
    embed_cached(load_minilm_embedder(threads=2), prompts, where / "cache")
    return where / "cache"


def _setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded: Path
) -> tuple[Path, Path, Path]:
    data = tmp_path / "labels.csv"
    _first_prompts(data)
    shutil.copytree(embedded, tmp_path / "cache")
    weights, card = tmp_path / "router_weights.json", tmp_path / "router_card.json"
    weights.write_text("the weights before\n")
    card.write_text("the card before\n")
    monkeypatch.setattr(router_cli, "WEIGHTS_PATH", weights)
    monkeypatch.setattr(router_cli, "CARD_PATH", card)
    work = tmp_path / "elsewhere"  # no .cache/router-eval here
    work.mkdir()
    monkeypatch.chdir(work)
    return data, weights, card


def test_fit_saves_its_scores_in_its_cache_dir_and_calibrate_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded: Path
) -> None:
    data, weights, card = _setup(tmp_path, monkeypatch, embedded)
    cache = tmp_path / "cache"
    assert router_cli.main(["--data", str(data), "--cache-dir", str(cache), "fit"]) == 0
    assert (cache / router_cli.OOF_NAME).is_file()
    pinned = json.loads(card.read_text())["weights_sha256"]
    assert pinned == hashlib.sha256(weights.read_bytes()).hexdigest()
    load_router_model(weights, RouterCard.load(card))
    assert not RouterCard.load(card).calibrated  # the router refuses it until calibrated
    argv = ["--data", str(data), "--cache-dir", str(cache), "calibrate", "--share", "0.5"]
    assert router_cli.main([*argv, "--write"]) == 0
    assert RouterCard.load(card).calibrated
    target = json.loads(card.read_text())["calibration"]["target"]
    assert target == "50% of calls to the large model"


def test_an_interrupted_fit_leaves_the_weights_and_card_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded: Path
) -> None:
    data, weights, card = _setup(tmp_path, monkeypatch, embedded)

    def interrupted(*args: object) -> np.ndarray:
        raise KeyboardInterrupt

    monkeypatch.setattr(router_cli, "out_of_fold_scores", interrupted)
    with pytest.raises(KeyboardInterrupt):
        router_cli.main(["--data", str(data), "--cache-dir", str(tmp_path / "cache"), "fit"])
    assert weights.read_text() == "the weights before\n"
    assert card.read_text() == "the card before\n"


def test_weights_the_card_does_not_pin_are_refused_with_advice_that_works(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    embedded: Path,
) -> None:
    """The router's refusal said "refit with `make calibrate-router`", which refused the same
    weights with a traceback repeating that advice."""
    data, weights, card = _setup(tmp_path, monkeypatch, embedded)
    cache = tmp_path / "cache"
    assert router_cli.main(["--data", str(data), "--cache-dir", str(cache), "fit"]) == 0
    weights.write_text(weights.read_text() + " ")  # no longer the weights the card pins
    with pytest.raises(RouterModelError) as refused:
        load_router_model(weights, RouterCard.load(card))
    assert "make fit-router" in str(refused.value)
    argv = ["--data", str(data), "--cache-dir", str(cache), "calibrate", "--share", "0.5"]
    before = card.read_text()
    assert router_cli.main([*argv, "--write"]) == 2
    assert "not written: " in capsys.readouterr().err
    assert card.read_text() == before


def test_a_refit_of_the_same_data_keeps_the_calibration_of_its_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded: Path
) -> None:
    """A refit writes the same weights byte for byte (their biases rounded as their weights
    are): the card keeps the threshold calibrated for them. Before, every refit wrote the
    calibration unset and default_threshold 0.0, which the router now refuses to start on
    (and before that, served auto at)."""
    data, weights, card = _setup(tmp_path, monkeypatch, embedded)
    cache = tmp_path / "cache"
    assert router_cli.main(["--data", str(data), "--cache-dir", str(cache), "fit"]) == 0
    argv = ["--data", str(data), "--cache-dir", str(cache), "calibrate", "--share", "0.5"]
    assert router_cli.main([*argv, "--write"]) == 0
    fitted, calibrated = weights.read_bytes(), json.loads(card.read_text())
    assert router_cli.main(["--data", str(data), "--cache-dir", str(cache), "fit"]) == 0
    assert weights.read_bytes() == fitted
    assert json.loads(card.read_text()) == calibrated
    assert RouterCard.load(card).calibrated

    # other data: other heads, and the calibration is theirs to make
    with data.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    out = io.StringIO()
    csv.writer(out).writerows(rows[:61])  # the header and the first 60 prompts
    data.write_text(out.getvalue(), encoding="utf-8")
    assert router_cli.main(["--data", str(data), "--cache-dir", str(cache), "fit"]) == 0
    assert weights.read_bytes() != fitted
    refit = RouterCard.load(card)
    assert not refit.calibrated and refit.default_threshold == 0.0
