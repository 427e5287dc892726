"""The cross-encoder verifier: its training data generator and its trainer (make train-verifier)."""
