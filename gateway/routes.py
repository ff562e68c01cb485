"""The routes the gateway forwards. Nothing else reaches a backend."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from adapters import base as r


class Body(enum.Enum):
    NONE = "none"
    JSON = "json"
    """Must be a JSON object: read whole (up to the size limit) and checked before forwarding."""
    STREAM = "stream"
    """Streamed to the backend as it arrives (multipart uploads), never held whole."""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    name: str
    path: str
    methods: tuple[str, ...]
    body: Body
    admin: bool = False
    """Served only when admin keys are configured, and only to them."""


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(r.MODELS, "/v1/models", ("GET",), Body.NONE),
    RouteSpec(r.MODEL, "/v1/models/{model:path}", ("GET",), Body.NONE),
    RouteSpec(r.CHAT_COMPLETIONS, "/v1/chat/completions", ("POST",), Body.JSON),
    RouteSpec(r.COMPLETIONS, "/v1/completions", ("POST",), Body.JSON),
    RouteSpec(r.EMBEDDINGS, "/v1/embeddings", ("POST",), Body.JSON),
    RouteSpec(r.RESPONSES, "/v1/responses", ("POST",), Body.JSON),
    RouteSpec(r.RESPONSE_CANCEL, "/v1/responses/{response_id}/cancel", ("POST",), Body.STREAM),
    RouteSpec(r.RESPONSE, "/v1/responses/{response_id}", ("GET",), Body.NONE),
    RouteSpec(r.RERANK, "/v1/rerank", ("POST",), Body.JSON),
    RouteSpec(r.SCORE, "/v1/score", ("POST",), Body.JSON),
    RouteSpec(r.TOKENIZE, "/v1/tokenize", ("POST",), Body.JSON),
    RouteSpec(r.DETOKENIZE, "/v1/detokenize", ("POST",), Body.JSON),
    RouteSpec(r.TRANSCRIPTIONS, "/v1/audio/transcriptions", ("POST",), Body.STREAM),
    RouteSpec(r.TRANSLATIONS, "/v1/audio/translations", ("POST",), Body.STREAM),
    RouteSpec(r.SPEECH, "/v1/audio/speech", ("POST",), Body.JSON),
    RouteSpec(r.IMAGES, "/v1/images/generations", ("POST",), Body.JSON),
    RouteSpec(r.MODERATIONS, "/v1/moderations", ("POST",), Body.JSON),
    RouteSpec(r.LOAD_LORA, "/v1/load_lora_adapter", ("POST",), Body.JSON, admin=True),
    RouteSpec(r.UNLOAD_LORA, "/v1/unload_lora_adapter", ("POST",), Body.JSON, admin=True),
)
