"""Provider adapters: a model replica that answers through a real provider's API.

``MODEL_BACKEND=anthropic`` (Messages API, official ``anthropic`` SDK) or ``openai`` (Chat
Completions, official ``openai`` SDK; OpenAI itself or any OpenAI-compatible engine by
``OPENAI_BASE_URL``) serve the same ``cachemesh.v1.Model.Generate`` as the simulator.
"""
