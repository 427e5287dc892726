"""ONNX export and int8 quantisation of the trained cross-encoder (training venv only)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from services.common.files import sha256_of

if TYPE_CHECKING:
    from services.tools.verifier.bert import CrossEncoder
    from services.tools.verifier.train import Encoder, Row

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export(
    model: CrossEncoder,
    encoder: Encoder,
    sources: dict[str, dict[str, list[Row]]],
    out_dir: Path,
    max_tokens: int,
) -> dict[str, Any]:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from services.tools.verifier.train import auc, pad

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "cross_encoder.onnx"
    sample = pad(encoder.pairs([("How do I go there?", "How do I get there from here?")] * 2))
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        torch.onnx.export(
            model,
            sample,
            str(fp32),
            dynamo=False,
            input_names=list(INPUTS),
            output_names=["logit"],
            dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in INPUTS}, "logit": {0: "batch"}},
            opset_version=17,
        )
        quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    aucs: dict[str, float | None] = {}
    for name, parts in sources.items():
        rows = parts["tune"]
        scores = np.zeros(len(rows), dtype=np.float32)
        encoded = encoder.pairs([(a, b) for a, b, _ in rows])
        for start in range(0, len(rows), 64):
            ids, mask, types = (t.numpy() for t in pad(encoded[start : start + 64]))
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            scores[start : start + 64] = session.run(["logit"], feeds)[0]
        aucs[name] = auc(scores, np.array([r[2] for r in rows]))
    return {
        "sha256": sha256_of(target),
        "bytes": target.stat().st_size,
        "auc_int8_tune": aucs,
        "max_tokens": max_tokens,
    }
