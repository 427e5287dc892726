"""A refit of the same data writes the same weights file, byte for byte: its sha256, which the
card pins and a calibration is made for, changes only when the heads do. Before, each head's
bias was written unrounded (the weights at 7 decimals): a refit here of the shipped heads' data
left their biases 2-4e-16 from the shipped ones (sha256 67d6dba9... for d35fe229...), so the
card no longer pinned them and the same heads needed a recalibration."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from services.router.routing.model import WEIGHTS_PATH, Head, RouterCard, load_router_model


def test_heads_an_ulp_apart_write_the_same_bytes() -> None:
    model = load_router_model()

    def nudged(head: Head) -> Head:
        return Head(head.weights, float(np.nextafter(head.bias, np.inf)))

    refit = dataclasses.replace(
        model,
        large=nudged(model.large),
        small=nudged(model.small),
        large_shape=nudged(model.large_shape),
        small_shape=nudged(model.small_shape),
    )
    text = model.to_json()
    assert refit.to_json() == text
    assert hashlib.sha256(text.encode()).hexdigest() == model.sha256


def test_the_shipped_weights_are_as_the_fit_writes_them() -> None:
    """What ``make fit-router`` writes for these heads is the shipped file, which the shipped
    card pins: a refit that finds the same heads leaves both as they are."""
    model = load_router_model()
    assert model.to_json() == WEIGHTS_PATH.read_text(encoding="utf-8")
    for head in json.loads(model.to_json())["heads"].values():
        assert head["bias"] == round(head["bias"], 7)
    assert RouterCard.load().weights_sha256 == model.sha256
