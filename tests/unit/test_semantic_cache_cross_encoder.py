"""The shipped cross-encoder: pinned, read as a pair, batched like single calls; never torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from services.semantic_cache.cross_encoder import (
    MODEL_DIR,
    CrossEncoderInfo,
    CrossEncoderLoadError,
    OnnxCrossEncoder,
    load_cross_encoder,
)


@cache
def shipped() -> OnnxCrossEncoder:
    return load_cross_encoder()


def test_the_graph_is_the_pinned_one_and_small_enough_to_ship() -> None:
    info = CrossEncoderInfo.load()
    assert info.path.stat().st_size <= 25 * 1024 * 1024
    assert shipped().version == f"cross-encoder@{info.sha256[:12]}"
    card = (MODEL_DIR / "MODEL_CARD.md").read_text()
    assert info.sha256 in card and "Apache-2.0" in card


def test_a_graph_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    shutil.copytree(MODEL_DIR, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "cross_encoder.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "m" / "cross_encoder.json").write_text(json.dumps(meta))
    with pytest.raises(CrossEncoderLoadError, match="sha256"):
        load_cross_encoder(tmp_path / "m")


def test_missing_metadata_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CrossEncoderLoadError, match="make train-verifier"):
        load_cross_encoder(tmp_path)


def test_a_batch_gives_the_logits_of_single_calls_in_order() -> None:
    pairs = [
        ("how do i convert eur to usd?", "how do i convert usd to eur?"),
        ("how do i reset my password?", "i forgot my password, how can i change it?"),
        ("a", "a much longer question that needs many more tokens than the first one does"),
    ]
    batch = shipped().logits(pairs)
    single = np.array([shipped().logits([p])[0] for p in pairs])
    assert batch.shape == (3,) and np.allclose(batch, single, atol=1e-3)
    assert shipped().logits([]).shape == (0,)


def test_the_pair_is_read_in_order_with_two_token_types() -> None:
    tokenizer = shipped()._tokenizer
    encoding = tokenizer.encode("eur to usd", "usd to eur")
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens.count("[SEP]") == 2
    first_sep = encoding.tokens.index("[SEP]")
    assert encoding.type_ids == [0] * (first_sep + 1) + [1] * (len(encoding.ids) - first_sep - 1)
    assert (
        len(tokenizer.encode("word " * 200, "other " * 200).ids)
        == CrossEncoderInfo.load().max_tokens
    )


def test_the_service_never_imports_torch() -> None:
    code = (
        "import sys; from services.semantic_cache.wiring import build_verifier; "
        "from services.semantic_cache.app import serve; "
        "from services.semantic_cache.cross_encoder import load_cross_encoder; "
        "load_cross_encoder().logits([('a', 'b')]); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
