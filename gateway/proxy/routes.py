"""The routes the gateway forwards. Nothing else reaches a backend."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from adapters.base import Route


class Body(enum.Enum):
    NONE = "none"
    JSON = "json"
    """Must be a JSON object: read whole (up to the size limit) and checked before forwarding."""
    STREAM = "stream"
    """Streamed to the backend as it arrives (multipart uploads), never held whole."""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    name: Route
    path: str
    methods: tuple[str, ...]
    body: Body
    admin: bool = False
    """Served only when admin keys are configured, and only to them."""
    required: tuple[str, ...] = ()
    """String fields a JSON body must have (the gateway's own request shapes)."""


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(Route.MODELS, "/v1/models", ("GET",), Body.NONE),
    RouteSpec(Route.MODEL, "/v1/models/{model:path}", ("GET",), Body.NONE),
    RouteSpec(Route.CHAT_COMPLETIONS, "/v1/chat/completions", ("POST",), Body.JSON),
    RouteSpec(Route.COMPLETIONS, "/v1/completions", ("POST",), Body.JSON),
    RouteSpec(Route.EMBEDDINGS, "/v1/embeddings", ("POST",), Body.JSON),
    RouteSpec(Route.RESPONSES, "/v1/responses", ("POST",), Body.JSON),
    RouteSpec(Route.RESPONSE_CANCEL, "/v1/responses/{response_id}/cancel", ("POST",), Body.STREAM),
    RouteSpec(Route.RESPONSE, "/v1/responses/{response_id}", ("GET",), Body.NONE),
    RouteSpec(Route.MESSAGES, "/v1/messages", ("POST",), Body.JSON),
    RouteSpec(Route.COUNT_TOKENS, "/v1/messages/count_tokens", ("POST",), Body.JSON),
    RouteSpec(Route.RERANK, "/v1/rerank", ("POST",), Body.JSON),
    RouteSpec(Route.SCORE, "/v1/score", ("POST",), Body.JSON),
    RouteSpec(Route.TOKENIZE, "/v1/tokenize", ("POST",), Body.JSON),
    RouteSpec(Route.DETOKENIZE, "/v1/detokenize", ("POST",), Body.JSON),
    RouteSpec(Route.TRANSCRIPTIONS, "/v1/audio/transcriptions", ("POST",), Body.STREAM),
    RouteSpec(Route.TRANSLATIONS, "/v1/audio/translations", ("POST",), Body.STREAM),
    RouteSpec(Route.SPEECH, "/v1/audio/speech", ("POST",), Body.JSON),
    RouteSpec(Route.IMAGES, "/v1/images/generations", ("POST",), Body.JSON),
    RouteSpec(Route.MODERATIONS, "/v1/moderations", ("POST",), Body.JSON),
    RouteSpec(Route.LOAD_LORA, "/v1/load_lora_adapter", ("POST",), Body.JSON, admin=True),
    RouteSpec(Route.UNLOAD_LORA, "/v1/unload_lora_adapter", ("POST",), Body.JSON, admin=True),
    RouteSpec(Route.FILE_UPLOAD, "/v1/files", ("POST",), Body.STREAM),
    RouteSpec(Route.FILE_LIST, "/v1/files", ("GET",), Body.NONE),
    RouteSpec(Route.FILE_CONTENT, "/v1/files/{file_id}/content", ("GET",), Body.NONE),
    RouteSpec(Route.FILE, "/v1/files/{file_id}", ("GET",), Body.NONE),
    RouteSpec(Route.FILE_DELETE, "/v1/files/{file_id}", ("DELETE",), Body.NONE),
    RouteSpec(Route.BATCH_CREATE, "/v1/batches", ("POST",), Body.JSON),
    RouteSpec(Route.BATCH_LIST, "/v1/batches", ("GET",), Body.NONE),
    RouteSpec(Route.BATCH_CANCEL, "/v1/batches/{batch_id}/cancel", ("POST",), Body.STREAM),
    RouteSpec(Route.BATCH, "/v1/batches/{batch_id}", ("GET",), Body.NONE),
    RouteSpec(Route.MODEL_LOAD, "/v1/models/load", ("POST",), Body.JSON, admin=True, required=("model",)),
    RouteSpec(Route.MODEL_UNLOAD, "/v1/models/unload", ("POST",), Body.JSON, admin=True, required=("model",)),
    RouteSpec(Route.LORA_LOAD, "/v1/lora/load", ("POST",), Body.JSON, admin=True, required=("lora_name",)),
    RouteSpec(
        Route.LORA_UNLOAD, "/v1/lora/unload", ("POST",), Body.JSON, admin=True, required=("lora_name",)
    ),
    RouteSpec(Route.INTERNAL_ENCODE, "/v1/internal/encode", ("POST",), Body.JSON),
    RouteSpec(Route.INTERNAL_DECODE, "/v1/internal/decode", ("POST",), Body.JSON),
    RouteSpec(Route.INTERNAL_TOKEN_COUNT, "/v1/internal/token-count", ("POST",), Body.JSON),
    RouteSpec(Route.INTERNAL_LOGITS, "/v1/internal/logits", ("POST",), Body.JSON),
    RouteSpec(Route.INTERNAL_CHAT_PROMPT, "/v1/internal/chat-prompt", ("POST",), Body.JSON),
    # It stops every client's generation, not the caller's.
    RouteSpec(Route.INTERNAL_STOP, "/v1/internal/stop-generation", ("POST",), Body.STREAM, admin=True),
    RouteSpec(Route.INTERNAL_MODEL_INFO, "/v1/internal/model/info", ("GET",), Body.NONE),
    RouteSpec(Route.INTERNAL_MODEL_LIST, "/v1/internal/model/list", ("GET",), Body.NONE, admin=True),
    RouteSpec(Route.INTERNAL_MODEL_LOAD, "/v1/internal/model/load", ("POST",), Body.JSON, admin=True),
    RouteSpec(Route.INTERNAL_MODEL_UNLOAD, "/v1/internal/model/unload", ("POST",), Body.STREAM, admin=True),
    RouteSpec(Route.INTERNAL_LORA_LIST, "/v1/internal/lora/list", ("GET",), Body.NONE, admin=True),
    RouteSpec(Route.INTERNAL_LORA_LOAD, "/v1/internal/lora/load", ("POST",), Body.JSON, admin=True),
    RouteSpec(Route.INTERNAL_LORA_UNLOAD, "/v1/internal/lora/unload", ("POST",), Body.STREAM, admin=True),
)
