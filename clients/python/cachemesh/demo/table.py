"""The per-layer table the demo prints, built only from the Gateway's responses."""

from __future__ import annotations

from dataclasses import dataclass

from cachemesh.v1 import gateway_pb2 as pb

_LAYERS = {
    pb.LAYER_SEMANTIC_CACHE: "semantic cache (L1)",
    pb.LAYER_PREFIX_CACHE: "model, prefix cache read (L2)",
    pb.LAYER_MODEL: "model, no cache read",  # a prefix write, a small tier: not full price
}


# under the table: what its baseline column is (DESIGN.md's baseline_nanos), in one line
BASELINE_NOTE = (
    "baseline: the same tokens at the requested model's base prices (auto: the large tier's), "
    "no cache; saved = baseline - cost"
)


def _usd(nanos: int) -> str:
    return f"${nanos / 1e9:.6f}"


@dataclass
class _Row:
    requests: int = 0
    exact: int = 0
    paraphrase: int = 0
    prompt_tokens: int = 0
    read_tokens: int = 0
    write_tokens: int = 0
    output_tokens: int = 0
    cost: int = 0
    baseline: int = 0
    estimated: int = 0


class LayerTable:
    def __init__(self) -> None:
        self._rows = {layer: _Row() for layer in _LAYERS}
        self.requests = 0

    def add(self, response: pb.CompleteResponse) -> None:
        row = self._rows.setdefault(response.served_by, _Row())
        usage = response.usage
        row.requests += 1
        if response.served_by == pb.LAYER_SEMANTIC_CACHE:
            row.exact += response.semantic.exact
            row.paraphrase += not response.semantic.exact
        row.prompt_tokens += (
            usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
        )
        row.read_tokens += usage.cache_read_input_tokens
        row.write_tokens += usage.cache_creation_input_tokens
        row.output_tokens += usage.output_tokens
        row.cost += response.cost.cost_nanos
        row.baseline += response.cost.baseline_nanos
        row.estimated += response.cost.estimated
        self.requests += 1

    @staticmethod
    def describe(response: pb.CompleteResponse) -> str:
        layer = pb.Layer.Name(response.served_by).removeprefix("LAYER_")
        if response.served_by == pb.LAYER_SEMANTIC_CACHE:
            kind = "exact" if response.semantic.exact else "paraphrase"
            layer += f" {kind} {response.semantic.similarity:.3f}"
        usage = response.usage
        return (
            f"{layer:32} {response.model:9} read={usage.cache_read_input_tokens:<5} "
            f"write={usage.cache_creation_input_tokens:<5} cost={_usd(response.cost.cost_nanos)}"
        )

    def render(self) -> str:
        header = (
            f"{'layer':32}{'requests':>9}{'exact/para':>11}{'prompt tok':>11}{'cache read':>11}"
            f"{'cache write':>12}{'cost':>12}{'baseline':>12}{'saved':>12}"
        )
        lines = [header, "-" * len(header)]
        total = _Row()
        for layer, name in _LAYERS.items():
            row = self._rows[layer]
            hits = f"{row.exact}/{row.paraphrase}" if layer == pb.LAYER_SEMANTIC_CACHE else ""
            lines.append(self._line(name, row, hits))
            for field in vars(total):
                setattr(total, field, getattr(total, field) + getattr(row, field))
        lines.append("-" * len(header))
        lines.append(self._line("total", total, ""))
        lines.append(BASELINE_NOTE)
        if total.estimated:
            lines.append(
                f"({total.estimated} costs estimated: prefix-cache had not billed them as the "
                "answer went: down, or slower than the request's deadline left; the exact bill "
                "follows)"
            )
        return "\n".join(lines)

    @staticmethod
    def _line(name: str, row: _Row, hits: str) -> str:
        return (
            f"{name:32}{row.requests:>9}{hits:>11}{row.prompt_tokens:>11}{row.read_tokens:>11}"
            f"{row.write_tokens:>12}{_usd(row.cost):>12}{_usd(row.baseline):>12}"
            f"{_usd(row.baseline - row.cost):>12}"
        )
