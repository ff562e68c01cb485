"""LocalAI.

- OpenAI routes under /v1 (no ``/v1/models/{id}``; list entries carry only ``id`` and
  ``object``), plus speech, images, moderations, rerank, transcriptions and ``/v1/tokenize``.
- ``/readyz`` answers 503 while models preload; requests for a loading model get 503 with
  ``Retry-After``.
- Errors are ``{"error": {"code", "message", "type"}}``, ``type`` often empty.
"""

from __future__ import annotations

from adapters import base as r
from adapters.base import Adapter

ADAPTER = Adapter(
    name="localai",
    routes=r.CORE_ROUTES - {r.MODEL}
    | {r.RESPONSES, r.RERANK, r.TRANSCRIPTIONS, r.SPEECH, r.IMAGES, r.MODERATIONS, r.TOKENIZE},
    health_path="/readyz",
)
