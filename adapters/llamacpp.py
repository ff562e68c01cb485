"""llama.cpp's ``llama-server``: OpenAI routes under /v1; while the model loads every route,
``/health`` included, answers 503 ``unavailable_error`` "Loading model". Embeddings need
``--embeddings`` (else 501 ``not_supported_error``, passed through)."""

from __future__ import annotations

from adapters.base import ALL_ROUTES, Adapter

ADAPTER = Adapter(name="llamacpp", routes=ALL_ROUTES, health_path="/health")

# llama-cpp-python's own server (``python -m llama_cpp.server``), which the gateway runs as
# its embedded backend: the same OpenAI paths, but no /health; it listens only once loaded.
EMBEDDED = Adapter(name="llamacpp", routes=ALL_ROUTES, health_path="/v1/models", loading_statuses=frozenset())
