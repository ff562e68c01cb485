"""Ollama.

- OpenAI routes under /v1, ``/v1/models/{id}`` included; no tokenize, rerank or score.
  Anthropic's ``/v1/messages`` (and ``/count_tokens``) beside them.
  Its own API (``/api/pull``, ``/api/delete``, …) is never reachable through the gateway.
- ``GET /`` answers "Ollama is running"; models load lazily on their first request.
- Errors are nested OpenAI-style; 503 "server busy" when its queue is full.
- Model management: ``/v1/models/load`` is a generation with no prompt (the model is loaded
  and kept for ``keep_alive``), ``/v1/models/unload`` the same with ``keep_alive: 0``; a model
  not pulled yet answers 404 (pulling downloads, and stays out of reach). No LoRA loading.
"""

from __future__ import annotations

from typing import Any

from adapters import base as r
from adapters.base import Adapter, Route


def load_model(body: dict[str, Any]) -> dict[str, Any]:
    """A generation with no prompt loads the model and keeps it for ``keep_alive``."""
    loaded: dict[str, Any] = {"model": body["model"], "stream": False}
    if "keep_alive" in body:
        loaded["keep_alive"] = body["keep_alive"]
    return loaded


def unload_model(body: dict[str, Any]) -> dict[str, Any]:
    return {"model": body["model"], "keep_alive": 0, "stream": False}


ADAPTER = Adapter(
    name="ollama",
    routes=r.CORE_ROUTES
    | r.ANTHROPIC_ROUTES
    | {Route.RESPONSES, Route.TRANSCRIPTIONS, Route.MODEL_LOAD, Route.MODEL_UNLOAD},
    paths={Route.MODEL_LOAD: "/api/generate", Route.MODEL_UNLOAD: "/api/generate"},
    rewrites={Route.MODEL_LOAD: load_model, Route.MODEL_UNLOAD: unload_model},
    health_path="/",
    loading_statuses=frozenset(),
)
