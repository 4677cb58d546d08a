"""The OpenAI-compatible REST API (``pipeline=serve``): schemas, dynamic batcher, app, metrics."""
