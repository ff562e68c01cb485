"""basert's ``serve``: an OpenAI-compatible server with files, batches and model management.

- OpenAI routes under /v1, ``/v1/models/{id}`` included, ``/v1/rerank`` and
  ``/v1/audio/transcriptions`` (multipart) among them, plus ``/v1/files`` (multipart
  uploads, ``/{id}``, ``/{id}/content``), ``/v1/batches`` (``/{id}``, ``/{id}/cancel``) and
  model management in the gateway's own shape: ``POST /v1/models/load`` and ``/unload``,
  ``/v1/lora/load`` and ``/unload``, forwarded as they are (admin keys only).
- Errors are OpenAI-shaped; ``/health`` answers 200 once it serves; Prometheus metrics at
  ``/v1/metrics``.
"""

from __future__ import annotations

from adapters import base as r
from adapters.base import Adapter, Route

ADAPTER = Adapter(
    name="basert",
    routes=r.CORE_ROUTES
    | r.FILE_ROUTES
    | r.BATCH_ROUTES
    | r.MANAGEMENT_ROUTES
    | {
        Route.RESPONSES,
        Route.EMBEDDINGS,
        Route.RERANK,
        Route.TRANSCRIPTIONS,
        Route.TOKENIZE,
        Route.DETOKENIZE,
    },
    health_path="/health",
    health_fallback_path="/v1/models",
    metrics_path="/v1/metrics",
)
