"""``python -m services.tools.evaluation.router {fit,calibrate,eval}``.

``make fit-router`` fits the heads on the fit half and writes the weights and their card;
``make calibrate-router`` picks the default threshold for a target (a share of large calls or
a share of the large model's quality) from out-of-fold scores of the fit half and prints the
cost and quality it expects; ``make eval-router`` writes the report half's figures for the
learned router, the rule of thumb and random.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from cachemesh._argv import Parser
from services.common.env import Env
from services.common.model_overrides import model_table_from_env
from services.common.tokens import tokenizer_error_exits
from services.router.routing.model import (
    CARD_PATH,
    FORMAT,
    UNCALIBRATED,
    WEIGHTS_PATH,
    RouterCard,
    RouterModelError,
    load_router_model,
)
from services.tools.evaluation.router.fitting import (
    FOLDS,
    L2,
    fit_model,
    out_of_fold_scores,
    scores,
)
from services.tools.evaluation.router.labels import DATA, SPLIT_SEED
from services.tools.evaluation.router.metrics import curve
from services.tools.evaluation.router.report import (
    at_share,
    at_threshold,
    set_facts,
    summary,
)
from services.tools.evaluation.router.session import OUTPUT_TOKENS, Session
from services.tools.evaluation.router.tiers import (
    TierShareError,
    calibrate_tiers,
    describe,
    parse_tier_shares,
)
from services.tools.out_path import refuse_unwritable

MEANING = (
    "P(large model right) - P(small model right) for this question, each a logistic head over "
    "the last user turn's all-MiniLM-L6-v2 embedding and its shape features; within [-1, 1]; "
    "higher = the large model is more needed. A request goes to the large tier when "
    "score >= threshold."
)
# the fit half's out-of-fold scores, in the --cache-dir beside the embeddings (fit writes
# them, calibrate reads them)
OOF_NAME = "oof-fit-scores.npy"
# what a card's calibration was made for: the weights, their fit, its out-of-fold figures (a
# refit that writes all of them as they were keeps it)
FIT_KEYS = ("format", "weights_sha256", "embedder", "fitted_on", "fit_half_out_of_fold")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m services.tools.evaluation.router")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/router-eval"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fit", help="fit the heads on the fit half; write weights and card")
    cal = sub.add_parser("calibrate", help="the threshold for a target, from out-of-fold scores")
    target = cal.add_mutually_exclusive_group()
    target.add_argument("--share", type=float, help="share of calls to the large model, 0-1")
    target.add_argument("--quality", type=float, help="share of the large model's quality, 0-1")
    cal.add_argument("--write", action="store_true", help="make it the card's default threshold")
    cal.add_argument(
        "--tier-share",
        help="tiers between small and large (the configured table): tier=share,... of calls "
        "sent to that tier or a dearer one; prints ROUTER_TIER_THRESHOLDS",
    )
    ev = sub.add_parser("eval", help="report-half figures to JSON")
    ev.add_argument("--out", type=Path, default=Path("bench-results/router-eval.json"))
    args = parser.parse_args(argv)
    refuse_unwritable(parser, getattr(args, "out", None))  # before the run, not after it
    if args.command == "calibrate" and (refused := _target_error(args.share, args.quality)):
        print(refused, file=sys.stderr)  # before minutes of embedding every prompt
        return 2
    session = Session(args.data, args.cache_dir)
    if args.command == "fit":
        return _fit(session)
    if args.command == "calibrate":
        status, threshold = _calibrate(session, args.share, args.quality, args.write)
        if threshold is not None and args.tier_share:
            return _calibrate_tiers(session, args.tier_share, threshold)
        return status
    return _eval(session, args.out)


def _fit(session: Session) -> int:
    """Everything is computed before anything is written, and the card that pins the weights
    goes last: the router refuses weights its card does not pin, and the weights written
    before the out-of-fold scores (minutes) were left unpinned by an interruption, or by a
    ``--cache-dir`` the scores could not be saved beside, until a refit."""
    fit = session.half("fit")
    model = fit_model(fit.vectors, fit.shapes, fit.weak, fit.strong, session.embedder)
    text = model.to_json()
    oof = out_of_fold_scores(
        fit.texts, fit.vectors, fit.shapes, fit.weak, fit.strong, session.embedder
    )
    session.cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(session.cache_dir / OOF_NAME, oof)
    card = {
        "format": FORMAT,
        "weights": WEIGHTS_PATH.name,
        "weights_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "score": MEANING,
        "embedder": session.embedder,
        "fitted_on": {
            "file": str(session.data),
            "file_sha256": session.data_sha256(),
            "half": "fit",
            "split": f"sha256({SPLIT_SEED!r} + NUL + prompt), even first byte = fit",
            "prompts": len(fit.rows),
            "l2": L2,
        },
        "fit_half_out_of_fold": {"folds": FOLDS, **set_facts(fit), **summary(fit, oof)},
        "default_threshold": 0.0,
        "calibration": {"target": UNCALIBRATED},  # the router refuses it until calibrated
        "cost_model": f"prompt tokens (cl100k) + {OUTPUT_TOKENS} output tokens, table prices",
    }
    kept = _kept_calibration(card)
    if kept is not None:
        card["default_threshold"], card["calibration"] = kept
    _replace(WEIGHTS_PATH, text)
    _replace(CARD_PATH, json.dumps(card, indent=1) + "\n")
    apgr = card["fit_half_out_of_fold"]["apgr"]  # type: ignore[index]
    print(f"weights written to {WEIGHTS_PATH} ({len(fit.rows)} prompts; out-of-fold APGR {apgr})")
    if kept is not None:
        print(f"the card pinned these weights, fitted so: its calibrated threshold {kept[0]} kept")
    else:
        print(
            "now pick the threshold: make calibrate-router (until then the router refuses to "
            "start unless ROUTER_THRESHOLD is set)"
        )
    return 0


def _kept_calibration(card: dict[str, object]) -> tuple[object, object] | None:
    """The calibrated threshold and calibration of the card at ``CARD_PATH``, when a refit
    wrote the very weights it pins from the same data with the same out-of-fold figures (the
    calibration is of those scores): a refit of the same data needs no recalibration. None
    when anything differs, or that card is unreadable or not calibrated."""
    try:
        before = RouterCard.load(CARD_PATH)
    except RouterModelError:
        return None
    same = all(before.body.get(key) == card[key] for key in FIT_KEYS)
    if not same or not before.calibrated:
        return None
    return before.body["default_threshold"], before.body["calibration"]


def _replace(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or is as it was (a write cut short is not left there)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def _target_error(share: float | None, quality: float | None) -> str | None:
    """Why ``--share`` or ``--quality`` is refused (None: neither is)."""
    if share is not None and not 0.0 <= share <= 1.0:  # NaN too
        return "--share must be within [0, 1]"
    if quality is not None and not 0.0 < quality <= 1.0:
        return "--quality must be within (0, 1]"
    return None


def _calibrate(
    session: Session, share: float | None, quality: float | None, write: bool
) -> tuple[int, float | None]:
    """The exit status, and the threshold picked (None: refused)."""
    fit = session.half("fit")
    oof_path = session.cache_dir / OOF_NAME
    if not oof_path.is_file():
        print(
            f"no out-of-fold scores at {oof_path}: run make fit-router first (with the same "
            "--cache-dir)",
            file=sys.stderr,
        )
        return 2, None
    oof = np.load(oof_path)
    c = curve(oof, fit.weak, fit.strong)
    if share is None and quality is None:
        quality = 0.95
    if refused := _target_error(share, quality):
        print(refused, file=sys.stderr)
        return 2, None
    if quality is not None:
        share = c.share_for_quality(quality * c.strong_quality)
        target = f"{quality:.0%} of the large model's quality"
    else:
        target = f"{share:.0%} of calls to the large model"
    assert share is not None
    point = at_share(fit, oof, c, share)
    print(f"target: {target} (out-of-fold scores of the fit half, {len(fit.rows)} prompts)")
    print(
        f"threshold {point['threshold']:.4f}: {point['large_share']:.1%} of calls to the large "
        f"model; expected quality {point['quality']:.4f} = {point['of_large_quality']:.1%} of "
        f"the large model's ({c.strong_quality:.4f}; small alone {c.weak_quality:.4f}), "
        f"{point['pgr']:.1%} of the gap; expected cost {point['cost_of_all_large']:.1%} of "
        f"sending every call to the large model"
    )
    if write:
        try:  # the card must pin these weights: the threshold is theirs
            load_router_model(WEIGHTS_PATH, RouterCard.load(CARD_PATH))
        except RouterModelError as exc:
            print(f"not written: {exc}", file=sys.stderr)
            return 2, None
        card = json.loads(CARD_PATH.read_text(encoding="utf-8"))
        card["default_threshold"] = point["threshold"]
        card["calibration"] = {"target": target, "expected": point}
        _replace(CARD_PATH, json.dumps(card, indent=1) + "\n")
        print(f"default threshold written to {CARD_PATH}")
    return 0, float(point["threshold"])


def _calibrate_tiers(session: Session, value: str, threshold: float) -> int:
    table = model_table_from_env(Env(os.environ))
    try:
        shares = parse_tier_shares(value, table)
    except TierShareError as exc:
        print(exc, file=sys.stderr)
        return 2
    fit = session.half("fit")
    result = calibrate_tiers(fit, np.load(session.cache_dir / OOF_NAME), table, threshold, shares)
    print(f"tiers {', '.join(table.tiers)}, large from the threshold above ({threshold:.4f}):")
    print(describe(result))
    return 0


def _eval(session: Session, out: Path) -> int:
    report = session.half("report")
    model = load_router_model()
    learned = scores(model, report.texts, report.vectors)
    shape_only = np.array([model.score(t, None) for t in report.texts])
    card = json.loads(CARD_PATH.read_text(encoding="utf-8"))
    threshold = float(card["default_threshold"])
    body = {
        "set": {"file": str(session.data), "half": "report", **set_facts(report)},
        "cost_model": card["cost_model"],
        "routers": {
            "learned": summary(report, learned),
            "learned_shape_only": summary(report, shape_only),
            "rule_of_thumb": summary(report, report.rule_scores()),
            "random": summary(report, np.zeros(len(report.rows))),
        },
        "default_threshold": at_threshold(
            report, learned, threshold, card["calibration"].get("target")
        ),
        "weights_sha256": card["weights_sha256"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    for name, figures in body["routers"].items():
        at95 = figures["at_95pct_of_large_quality"]
        print(
            f"{name:20s} APGR {figures['apgr']:.3f}  CPT50 {figures['cpt50']:.3f}  "
            f"CPT80 {figures['cpt80']:.3f}  at 95% quality: {at95['large_share']:.1%} large, "
            f"cost saved {at95['cost_saved_vs_all_large']:.1%}"
        )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    with tokenizer_error_exits("evaluation.router"):  # a vocabulary missing: what to do, exit 2
        sys.exit(main())
