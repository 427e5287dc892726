"""prefix-cache: L2 prompt-prefix accounting (tokens, caching rules, prices) and L3 ranking."""
