"""The offline savings estimator: a request log replayed through the stack's own logic."""
