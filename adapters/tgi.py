"""Text Generation Inference.

- Chat and completions under /v1, one entry in /v1/models; no embeddings (TEI's job), no
  ``/v1/models/{id}``; ``/tokenize`` at the root, no detokenize.
- ``/health`` once the model is loaded; connections are refused before.
- Errors are its own shape, ``{"error": "...", "error_type": "..."}`` (422 validation,
  429 overloaded, 424 generation), and a 401 has an empty body: the gateway wraps both.
  Inside a 200 stream, errors arrive as events of that same shape.
"""

from __future__ import annotations

from adapters.base import Adapter, LoadSignals, Route

ADAPTER = Adapter(
    name="tgi",
    routes=frozenset({Route.MODELS, Route.CHAT_COMPLETIONS, Route.COMPLETIONS, Route.TOKENIZE}),
    paths={Route.TOKENIZE: "/tokenize"},
    health_path="/health",
    metrics_path="/metrics",
    load_signals=LoadSignals(waiting=("tgi_queue_size",), running=("tgi_batch_current_size",)),
    loading_statuses=frozenset(),
)
