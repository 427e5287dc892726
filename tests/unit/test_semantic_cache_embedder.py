"""The real embedder: all-MiniLM-L6-v2 int8 on onnxruntime, files checked by sha256."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from services.semantic_cache.embedder import (
    DIM,
    GROUP,
    MODEL_SHA256,
    PAD_BUDGET_TOKENS,
    EmbedderLoadError,
    MiniLMEmbedder,
    default_model_path,
    default_tokenizer_path,
    load_minilm_embedder,
    runs_of,
)


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return load_minilm_embedder()


def cosine(embedder: MiniLMEmbedder, first: str, second: str) -> float:
    a, b = embedder.embed([first, second])
    return float(a @ b)


def test_rows_are_normalised_float32_of_384(embedder: MiniLMEmbedder) -> None:
    vectors = embedder.embed(["hello", "a somewhat longer sentence about passwords"])
    assert vectors.shape == (2, DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, DIM)
    assert embedder.dim == DIM
    assert embedder.version == f"all-MiniLM-L6-v2-onnx-int8@{MODEL_SHA256[:12]}"


def test_a_paraphrase_is_close_and_an_unrelated_question_is_far(
    embedder: MiniLMEmbedder,
) -> None:
    question = "How do I reset my password?"
    paraphrase = cosine(embedder, question, "I forgot my password, how can I change it?")
    unrelated = cosine(embedder, question, "What is the capital of France?")
    assert paraphrase >= 0.88
    assert unrelated < 0.5
    assert cosine(embedder, question, question) == pytest.approx(1.0, abs=1e-5)


def test_padding_in_a_batch_does_not_change_a_vector(embedder: MiniLMEmbedder) -> None:
    short = "Reset password"
    alone = embedder.embed([short])[0]
    batched = embedder.embed([short, "a much longer sentence " * 20])[0]
    assert float(alone @ batched) == pytest.approx(1.0, abs=1e-4)


def test_a_second_session_on_more_threads_gives_the_same_vectors(
    embedder: MiniLMEmbedder,
) -> None:
    wide = embedder.with_threads(2)
    texts = ["How do I reset my password?", "Change my flight to Boston on Friday, please."]
    assert wide.version == embedder.version
    assert np.allclose(wide.embed(texts), embedder.embed(texts), atol=1e-5)


def test_long_text_is_truncated_not_rejected(embedder: MiniLMEmbedder) -> None:
    assert embedder.embed(["word " * 2000]).shape == (1, DIM)


def corrupt_copy(source: Path, target: Path) -> Path:
    shutil.copyfile(source, target)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_a_corrupted_model_file_is_refused(tmp_path: Path) -> None:
    bad = corrupt_copy(default_model_path(), tmp_path / "model.onnx")
    with pytest.raises(EmbedderLoadError, match="sha256"):
        load_minilm_embedder(model_path=bad)


def test_a_corrupted_tokenizer_is_refused(tmp_path: Path) -> None:
    bad = corrupt_copy(default_tokenizer_path(), tmp_path / "tokenizer.json")
    with pytest.raises(EmbedderLoadError, match=r"tokenizer\.json"):
        load_minilm_embedder(tokenizer_path=bad)


def test_a_missing_model_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EmbedderLoadError, match="not found"):
        load_minilm_embedder(model_path=tmp_path / "absent.onnx")


def test_runs_batch_similar_lengths_and_keep_long_texts_apart() -> None:
    assert runs_of([25, 26, 24, 27, 25]) == [[2, 0, 4, 1], [3]]  # at most GROUP a run
    assert runs_of([30, 256, 70, 50]) == [[0], [3], [2], [1]]  # padding costs, alone is cheaper
    assert runs_of([]) == []


def test_every_text_runs_once_within_the_padding_budget() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        lengths = [int(n) for n in rng.integers(3, 257, size=int(rng.integers(1, 40)))]
        runs = runs_of(lengths)
        assert sorted(i for run in runs for i in run) == list(range(len(lengths)))
        for run in runs:
            assert 1 <= len(run) <= GROUP
            width = max(lengths[i] for i in run)
            assert lengths[run[-1]] == width  # the run's width is its last text's
            assert width * len(run) - sum(lengths[i] for i in run) <= PAD_BUDGET_TOKENS


class RecordingTokenizer:
    """Passes through to the real tokenizer, keeping the texts it was given."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.texts: list[str] = []

    def encode_batch(self, texts: list[str]) -> object:
        self.texts.extend(texts)
        return self.tokenizer.encode_batch(texts)  # type: ignore[attr-defined]


def test_a_huge_question_is_cut_before_it_is_tokenised(
    embedder: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One 1 MB question took 2.7 s to tokenise in the batch loop every lookup waits on."""
    recording = RecordingTokenizer(embedder._tokenizer)
    monkeypatch.setattr(embedder, "_tokenizer", recording)
    huge = "please read this: " + "lorem ipsum dolor sit amet " * 38_000  # ~1 MB
    embedder.embed(["how do i reset my password", huge])
    assert max(len(text) for text in recording.texts) <= 26 * 1024  # EMBED_CHARS: 25,654
    assert "how do i reset my password" in recording.texts  # a short text is given whole


def uncut(embedder: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch, text: str) -> np.ndarray:
    """The embedding of ``text`` tokenised whole (as before the cut), truncated to 256 tokens."""
    from services.semantic_cache import embedder as module

    with monkeypatch.context() as patch:
        patch.setattr(module, "embedding_input", lambda whole: (whole, False))
        row: np.ndarray = embedder.embed([text])[0]
        return row


@pytest.mark.parametrize(
    "text",
    [
        "Read this carefully before you answer. " * 40 + " and more words" * 7_000,
        "Read this carefully. " * 80 + "\n\n" + " " * 100_000 + "the question after the spaces",
        "Read this carefully. " * 80 + "x" * 100_000,  # a word longer than the bound
        "\n".join("    " * 40 + "x = i" for _ in range(300)),  # indented code: 49 kB, 900 tokens
        "如何删除我的账户" * 5_000 + " 😀" * 1000,  # every character a token
    ],
)
def test_the_cut_keeps_every_token_the_model_reads(
    embedder: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    from services.semantic_cache.embedder import EMBED_CHARS, embedding_input

    given, _ = embedding_input(text)
    assert len(given) <= EMBED_CHARS < len(text)
    cut = embedder.embed([text])[0]
    np.testing.assert_allclose(cut, embedder.embed([given])[0], atol=1e-6)
    np.testing.assert_allclose(cut, uncut(embedder, monkeypatch, text), atol=1e-5)
    assert embedding_input("short question") == ("short question", False)
