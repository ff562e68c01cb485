"""Ollama.

- OpenAI routes under /v1, ``/v1/models/{id}`` included; no tokenize, rerank or score.
  Its own API (``/api/pull``, ``/api/delete``, …) is never reachable through the gateway.
- ``GET /`` answers "Ollama is running"; models load lazily on their first request.
- Errors are nested OpenAI-style; 503 "server busy" when its queue is full.
"""

from __future__ import annotations

from adapters import base as r
from adapters.base import Adapter

ADAPTER = Adapter(
    name="ollama",
    routes=r.CORE_ROUTES | {r.RESPONSES, r.TRANSCRIPTIONS},
    health_path="/",
    loading_statuses=frozenset(),
)
