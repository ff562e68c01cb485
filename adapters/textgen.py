"""text-generation-webui's OpenAI-compatible API (``--api``, port 5000).

- OpenAI routes under /v1 (chat, completions, embeddings, models, moderations, images),
  plus its own under /v1/internal: ``encode``, ``decode``, ``token-count``, ``logits``,
  ``chat-prompt``, ``stop-generation`` and ``model/info`` for clients; ``model/list``,
  ``model/load``, ``model/unload`` and ``lora/list|load|unload`` need its admin key, and
  the gateway serves them to admin keys only.
- Model management: ``/v1/models/load`` becomes ``/v1/internal/model/load`` with
  ``model_name`` (``args`` and ``settings`` passed on); ``/v1/models/unload`` unloads the
  loaded model; ``/v1/lora/load`` loads LoRAs by name from its own folder;
  ``/v1/lora/unload`` unloads them all (it has no per-LoRA unload).
- ``/v1/internal/health`` answers ``{"status": "ok"}``; errors are FastAPI's
  ``{"detail": ...}``, which the gateway wraps.
"""

from __future__ import annotations

from typing import Any

from adapters import base as r
from adapters.base import Adapter, Route


def load_model(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_name": body["model"],
        "args": body.get("args") or {},
        "settings": body.get("settings") or {},
    }


def load_lora(body: dict[str, Any]) -> dict[str, Any]:
    return {"lora_names": [body["lora_name"]]}


def no_body(body: dict[str, Any]) -> None:
    return None


ADAPTER = Adapter(
    name="textgen",
    routes=r.CORE_ROUTES | r.TEXTGEN_ROUTES | r.MANAGEMENT_ROUTES | {Route.MODERATIONS, Route.IMAGES},
    paths={
        Route.MODEL_LOAD: "/v1/internal/model/load",
        Route.MODEL_UNLOAD: "/v1/internal/model/unload",
        Route.LORA_LOAD: "/v1/internal/lora/load",
        Route.LORA_UNLOAD: "/v1/internal/lora/unload",
    },
    rewrites={
        Route.MODEL_LOAD: load_model,
        Route.MODEL_UNLOAD: no_body,
        Route.LORA_LOAD: load_lora,
        Route.LORA_UNLOAD: no_body,
    },
    health_path="/v1/internal/health",
    health_fallback_path="/v1/models",
    loading_statuses=frozenset(),
    # auto_max_new_tokens: true fills the context, whatever max_tokens says.
    fills_context=("auto_max_new_tokens",),
)
