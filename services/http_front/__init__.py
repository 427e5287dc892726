"""The HTTP front: the Anthropic Messages and OpenAI Chat Completions APIs over the Gateway."""
