"""``make bench-prefix``: offline replays through prefix-cache's own accounting (no servers)."""
