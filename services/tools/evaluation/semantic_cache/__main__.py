"""``python -m services.tools.evaluation.semantic_cache {fit,calibrate,eval,align}``.

``make eval-cache``, ``make calibrate-cache``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from cachemesh._argv import Parser
from services.semantic_cache.operating_point import OPERATING_POINT_PATH, OperatingPoint
from services.tools.evaluation.semantic_cache.fit import DEFAULT_FEATURES
from services.tools.evaluation.semantic_cache.operating_point_env import write_env
from services.tools.evaluation.semantic_cache.session import Session
from services.tools.out_path import refuse_unwritable
from services.tools.verifier.near_misses import NAME as GENERATED

DATA = Path("../shared/data/paraphrase")
DEV_FILES = ("gptcache_mock_data.csv", "paws_wiki_dev.tsv", GENERATED, "qqp_dev.csv")
FIT_FILES = ("gptcache_mock_data.csv", "paws_wiki_dev.tsv", GENERATED)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m services.tools.evaluation.semantic_cache")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/semantic-eval"))
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit the verifier on the tune slices of the fit halves")
    fit.add_argument("--files", nargs="+", default=list(FIT_FILES))
    fit.add_argument("--features", nargs="+", default=list(DEFAULT_FEATURES))
    fit.add_argument("--vetoes", nargs="*", default=[])
    cal = sub.add_parser("calibrate", help="pick the operating point reaching --target")
    cal.add_argument("--files", nargs="+", default=list(FIT_FILES))
    cal.add_argument("--target", type=float, default=0.99, help="precision, every file")
    cal.add_argument(
        "--target-for",
        action="append",
        default=[],
        metavar="FILE=PRECISION",
        help="another precision for one file (files with hard negatives)",
    )
    cal.add_argument(
        "--min-threshold",
        type=float,
        default=0.85,
        help="lowest cosine threshold considered (below it the verifier alone would guard)",
    )
    cal.add_argument("--write", action="store_true", help="write it as the shipped default")
    cal.add_argument("--env", type=Path, default=Path(".env"))
    ev = sub.add_parser("eval", help="the harness: every file, both protocols, to JSON")
    ev.add_argument("--files", nargs="+", default=list(DEV_FILES))
    ev.add_argument("--out", type=Path, default=Path("bench-results/semantic-cache-eval.json"))
    al = sub.add_parser("align", help="token alignment against the pooled cosine (report half)")
    al.add_argument("--file", default="qqp_dev.csv")
    al.add_argument("--out", type=Path, default=Path("bench-results/semantic-cache-align.json"))
    args = parser.parse_args(argv)
    refuse_unwritable(parser, getattr(args, "out", None))  # before the run, not after it
    if args.command == "calibrate":  # before minutes of embedding, not after (or never)
        try:
            args.targets = _targets(args.files, args.target, args.target_for)
            _check_min_threshold(args.min_threshold)
        except ValueError as exc:
            print(f"calibrate: {exc}", file=sys.stderr)
            return 2
    session = Session(args.data, args.cache_dir)
    if args.command == "fit":
        path = session.fit_verifier(args.files, args.features, args.vetoes)
        print(f"verifier weights written to {path}")
        return 0
    if args.command == "calibrate":
        return _calibrate(session, args)
    if args.command == "align":
        return _write(session.align(args.file), args.out)
    report = session.evaluate(args.files)
    return _write(report, args.out, report["summary"])


def _write(report: dict[str, object], out: Path, shown: object = None) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(report if shown is None else shown, indent=1))
    print(f"written to {out}")
    return 0


def _precision(flag: str, value: float) -> float:
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{flag} must be a precision within (0, 1], got {value}")
    return value


def _targets(files: list[str], every: float, each: list[str]) -> dict[str, float]:
    """File -> the precision to reach: ``--target`` for every file, ``--target-for`` over it;
    a ValueError names the flag whose value is not a precision within (0, 1] (a NaN reaches
    nothing; 1.5 is unreachable; 0 or below would pass any operating point)."""
    target = {name: _precision("--target", every) for name in files}
    for item in each:
        name, _, value = item.partition("=")
        if name not in target or not value:
            raise ValueError(
                f"--target-for {item}: expected FILE=PRECISION with FILE one of {files}"
            )
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--target-for {item}: {value!r} is not a number") from None
        target[name] = _precision(f"--target-for {name}", number)
    return target


def _check_min_threshold(value: float) -> None:
    if not (math.isfinite(value) and -1.0 <= value <= 1.0):
        raise ValueError(f"--min-threshold must be a cosine within [-1, 1], got {value}")


def _calibrate(session: Session, args: argparse.Namespace) -> int:
    files = list(args.files)
    target: dict[str, float] = args.targets  # checked by main
    result, baseline = session.calibrate(files, target, args.min_threshold)
    if baseline.point is None:
        print(f"plain embedding: precision {target} unreachable on {files}")
    else:
        recall = {k: round(o.recall, 4) for k, o in baseline.outcomes.items()}
        print(f"plain embedding: {baseline.point.as_dict()} reaches it at recall {recall}")
    if result.point is None:
        print(f"precision {target} is unreachable on the fit halves of {files}; reachable:")
        for row in result.reachable:
            print(f"  {row}")
        return 1
    recall = {k: round(o.recall, 4) for k, o in result.outcomes.items()}
    precision = {k: round(o.precision or 0.0, 4) for k, o in result.outcomes.items()}
    print(f"operating point {result.point.as_dict()}: fit-half precision {precision}")
    print(f"recall it costs (fit halves): {recall}")
    if args.write:
        point = OperatingPoint(
            result.point.threshold,
            result.point.min_probability,
            result.point.margin,
            {
                "target_precision": target,
                "files": files,
                "parts": {name: session.calibration_part(name) for name in files},
                "fit_recall": recall,
                "fit_precision": precision,
                "min_threshold": args.min_threshold,
                "command": "python -m services.tools.evaluation.semantic_cache calibrate --write",
            },
        )
        OPERATING_POINT_PATH.write_text(point.to_json(), encoding="utf-8")
        write_env(args.env, point)
        print(f"written to {OPERATING_POINT_PATH} and {args.env}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
