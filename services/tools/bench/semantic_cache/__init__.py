"""``make bench-cache``: index scale, near-duplicate recall, embedder throughput (to JSON)."""
