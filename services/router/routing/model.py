"""The shipped router model: two logistic heads over the question's embedding and shape.

``router_weights.json`` holds the weights (plain numbers, no pickle); ``router_card.json``
their sha256, what the score means, how they were fitted and the calibrated default threshold.
A weights file whose sha256 differs from the card's is refused at start-up.

The score is the predicted gain in correctness from the large model: P(large right) -
P(small right), each head a logistic regression, within [-1, 1]; higher = the large model is
more needed. Without an embedding (none could be had) the shape-only heads score instead.

Each standardised shape feature is clipped to the range it took on the fit half
(``shape_bounds``): text unlike the fitted prompts (Chinese or Thai without spaces, a URL, a
long code token) would otherwise put a feature tens of standard deviations out, saturate both
heads and send the request small whatever it asks. Weights without the bounds are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from services.router.routing.features import SHAPE_FEATURES, shape_features

HERE = Path(__file__).parent
WEIGHTS_PATH = HERE / "router_weights.json"
CARD_PATH = HERE / "router_card.json"
# the decimals a head's weights and its bias are written with (the bias rounded moves a
# head's probability by 1.25e-8 at most)
DECIMALS = 7
FORMAT = "cachemesh.router.logistic-gain.v1"
# the card's calibration target ``make fit-router`` writes (with default_threshold 0.0) until
# ``make calibrate-router`` writes the calibrated one
UNCALIBRATED = "unset: run make calibrate-router"

Vector = npt.NDArray[np.float32]
Floats = npt.NDArray[np.float64]


class RouterModelError(ValueError):
    """The weights are missing, malformed, or not the ones the card names."""


@dataclass(frozen=True)
class Head:
    """One logistic regression: sigmoid(w . x + b)."""

    weights: Floats
    bias: float

    def probability(self, x: Floats) -> float:
        z = float(x @ self.weights) + self.bias
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))


@dataclass(frozen=True)
class RouterModel:
    embedder: str  # the embedder version the heads were fitted on
    dim: int
    shape_mean: Floats
    shape_scale: Floats
    shape_low: Floats  # each standardised shape feature's least and greatest on the fit half
    shape_high: Floats
    large: Head  # over [embedding, standardised shape]
    small: Head
    large_shape: Head  # over the standardised shape alone
    small_shape: Head
    sha256: str

    def standardised(self, text: str) -> Floats:
        """The text's shape features, standardised and clipped to the fit half's range."""
        shape = (shape_features(text).astype(np.float64) - self.shape_mean) / self.shape_scale
        out: Floats = np.clip(shape, self.shape_low, self.shape_high)
        return out

    def score(self, text: str, embedding: Vector | None) -> float:
        shape = self.standardised(text)
        if embedding is None:
            return self.large_shape.probability(shape) - self.small_shape.probability(shape)
        if embedding.shape != (self.dim,):
            raise RouterModelError(f"embedding has shape {embedding.shape}, expected ({self.dim},)")
        x = np.concatenate([embedding.astype(np.float64), shape])
        return self.large.probability(x) - self.small.probability(x)

    def to_json(self) -> str:
        def head(h: Head) -> dict[str, object]:
            # the bias rounded as the weights are: a refit of the same data on another
            # machine left it an ulp or two apart, which changed the file's sha256
            return {
                "weights": [round(float(v), DECIMALS) for v in h.weights],
                "bias": round(float(h.bias), DECIMALS),
            }

        body = {
            "format": FORMAT,
            "embedder": self.embedder,
            "dim": self.dim,
            "shape_features": list(SHAPE_FEATURES),
            "shape_mean": [float(v) for v in self.shape_mean],
            "shape_scale": [float(v) for v in self.shape_scale],
            "shape_bounds": {
                "low": [float(v) for v in self.shape_low],
                "high": [float(v) for v in self.shape_high],
            },
            "heads": {
                "large": head(self.large),
                "small": head(self.small),
                "large_shape": head(self.large_shape),
                "small_shape": head(self.small_shape),
            },
        }
        return json.dumps(body, separators=(",", ":")) + "\n"

    @classmethod
    def from_json(cls, text: str, sha256: str = "") -> RouterModel:
        try:
            body = json.loads(text)
            if body["format"] != FORMAT:
                raise RouterModelError(f"weights format {body['format']!r}, expected {FORMAT!r}")
            if body["shape_features"] != list(SHAPE_FEATURES):
                raise RouterModelError("the weights' shape features are not this code's")
            dim = int(body["dim"])
            n = len(SHAPE_FEATURES)
            heads = body["heads"]

            def head(name: str, width: int) -> Head:
                weights = np.asarray(heads[name]["weights"], dtype=np.float64)
                if weights.shape != (width,):
                    raise RouterModelError(f"head {name}: {weights.shape[0]} weights, not {width}")
                return Head(weights, float(heads[name]["bias"]))

            scale = np.asarray(body["shape_scale"], dtype=np.float64)
            if scale.shape != (n,) or np.any(scale <= 0):
                raise RouterModelError("shape_scale must hold one positive number a feature")
            if "shape_bounds" not in body:
                raise RouterModelError(
                    "the weights have no shape_bounds (an unclipped shape feature sends "
                    "unspaced text small): refit with `make fit-router`"
                )
            low = np.asarray(body["shape_bounds"]["low"], dtype=np.float64)
            high = np.asarray(body["shape_bounds"]["high"], dtype=np.float64)
            finite = bool(np.all(np.isfinite(low)) and np.all(np.isfinite(high)))
            if low.shape != (n,) or high.shape != (n,) or not finite or np.any(low > high):
                raise RouterModelError("shape_bounds must hold a finite low <= high a feature")
            return cls(
                embedder=str(body["embedder"]),
                dim=dim,
                shape_mean=np.asarray(body["shape_mean"], dtype=np.float64),
                shape_scale=scale,
                shape_low=low,
                shape_high=high,
                large=head("large", dim + n),
                small=head("small", dim + n),
                large_shape=head("large_shape", n),
                small_shape=head("small_shape", n),
                sha256=sha256,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, RouterModelError):
                raise
            raise RouterModelError(f"malformed router weights: {exc!r}") from exc


@dataclass(frozen=True)
class RouterCard:
    weights_sha256: str
    default_threshold: float
    body: dict[str, object]
    path: Path = CARD_PATH

    @property
    def calibrated(self) -> bool:
        """Whether ``make calibrate-router`` wrote the default threshold: a card ``make
        fit-router`` wrote holds 0.0 and the target ``UNCALIBRATED`` until then."""
        calibration = self.body.get("calibration")
        if not isinstance(calibration, dict):
            return False
        target = calibration.get("target")
        return isinstance(target, str) and bool(target) and target != UNCALIBRATED

    def threshold(self, explicit: float | None) -> float:
        """The threshold to route at: ``explicit`` (ROUTER_THRESHOLD) when set, else the
        card's calibrated default. A card not calibrated has none: refused, naming the card
        and the command (before, a router started between ``make fit-router`` and ``make
        calibrate-router`` ran at 0.0 without a word)."""
        if explicit is not None:
            return explicit
        if not self.calibrated:
            raise RouterModelError(
                f"router card {self.path} is not calibrated (make fit-router wrote its "
                f"default_threshold {self.default_threshold}): run `make calibrate-router`, or "
                "set ROUTER_THRESHOLD"
            )
        return self.default_threshold

    @classmethod
    def load(cls, path: Path = CARD_PATH) -> RouterCard:
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            threshold = float(body["default_threshold"])
            sha = str(body["weights_sha256"])
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise RouterModelError(f"router card {path}: {exc}") from exc
        if not -1.0 <= threshold <= 1.0:
            raise RouterModelError(f"router card {path}: default_threshold must be in [-1, 1]")
        return cls(sha, threshold, body, path)


def load_router_model(
    weights_path: Path = WEIGHTS_PATH, card: RouterCard | None = None
) -> RouterModel:
    """The weights, checked against the sha256 the card pins."""
    card = card if card is not None else RouterCard.load()
    try:
        raw = weights_path.read_bytes()
    except OSError as exc:
        raise RouterModelError(f"router weights {weights_path}: {exc}") from exc
    actual = hashlib.sha256(raw).hexdigest()
    if actual != card.weights_sha256:
        raise RouterModelError(
            f"router weights {weights_path} have sha256 {actual}, the card pins "
            f"{card.weights_sha256}: refit with `make fit-router` then `make calibrate-router` "
            "(calibrating alone cannot pin other weights), or restore both files as shipped"
        )
    return RouterModel.from_json(raw.decode("utf-8"), actual)
