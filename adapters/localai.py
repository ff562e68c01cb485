"""LocalAI.

- OpenAI routes under /v1 (no ``/v1/models/{id}``; list entries carry only ``id`` and
  ``object``), plus speech, images, moderations, rerank, transcriptions and ``/v1/tokenize``.
- ``/readyz`` answers 503 while models preload; requests for a loading model get 503 with
  ``Retry-After``.
- Errors are ``{"error": {"code", "message", "type"}}``, ``type`` often empty.
- Model management: ``/v1/models/load`` installs from its gallery (``/models/apply``, the
  model's name as ``id``, which answers a job to poll); ``/v1/models/unload`` stops the
  model's backend (``/backend/shutdown``). No runtime LoRA loading. ``url``, ``config_url``
  and ``files`` make ``/models/apply`` download from anywhere: refused unless allowed.
"""

from __future__ import annotations

from typing import Any

from adapters import base as r
from adapters.base import Adapter, Route


def apply_model(body: dict[str, Any]) -> dict[str, Any]:
    """``/models/apply`` installs a model from its gallery by ``id`` (other fields kept)."""
    rest = {name: value for name, value in body.items() if name != "model"}
    return {**rest, "id": body["model"]}


def shutdown_model(body: dict[str, Any]) -> dict[str, Any]:
    return {"model": body["model"]}


ADAPTER = Adapter(
    name="localai",
    routes=r.CORE_ROUTES - {Route.MODEL}
    | {
        Route.RESPONSES,
        Route.RERANK,
        Route.TRANSCRIPTIONS,
        Route.SPEECH,
        Route.IMAGES,
        Route.MODERATIONS,
        Route.TOKENIZE,
    }
    | {Route.MODEL_LOAD, Route.MODEL_UNLOAD},
    paths={Route.MODEL_LOAD: "/models/apply", Route.MODEL_UNLOAD: "/backend/shutdown"},
    rewrites={Route.MODEL_LOAD: apply_model, Route.MODEL_UNLOAD: shutdown_model},
    # /models/apply downloads a model's config and files from these, wherever they point.
    remote_sources={Route.MODEL_LOAD: ("url", "config_url", "files")},
    health_path="/readyz",
    metrics_path="/metrics",
)
