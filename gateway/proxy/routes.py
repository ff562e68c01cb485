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
    required: tuple[str, ...] = ()
    """String fields a JSON body must have (the gateway's own request shapes)."""


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(r.MODELS, "/v1/models", ("GET",), Body.NONE),
    RouteSpec(r.MODEL, "/v1/models/{model:path}", ("GET",), Body.NONE),
    RouteSpec(r.CHAT_COMPLETIONS, "/v1/chat/completions", ("POST",), Body.JSON),
    RouteSpec(r.COMPLETIONS, "/v1/completions", ("POST",), Body.JSON),
    RouteSpec(r.EMBEDDINGS, "/v1/embeddings", ("POST",), Body.JSON),
    RouteSpec(r.RESPONSES, "/v1/responses", ("POST",), Body.JSON),
    RouteSpec(r.RESPONSE_CANCEL, "/v1/responses/{response_id}/cancel", ("POST",), Body.STREAM),
    RouteSpec(r.RESPONSE, "/v1/responses/{response_id}", ("GET",), Body.NONE),
    RouteSpec(r.MESSAGES, "/v1/messages", ("POST",), Body.JSON),
    RouteSpec(r.COUNT_TOKENS, "/v1/messages/count_tokens", ("POST",), Body.JSON),
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
    RouteSpec(r.FILE_UPLOAD, "/v1/files", ("POST",), Body.STREAM),
    RouteSpec(r.FILE_LIST, "/v1/files", ("GET",), Body.NONE),
    RouteSpec(r.FILE_CONTENT, "/v1/files/{file_id}/content", ("GET",), Body.NONE),
    RouteSpec(r.FILE, "/v1/files/{file_id}", ("GET",), Body.NONE),
    RouteSpec(r.FILE_DELETE, "/v1/files/{file_id}", ("DELETE",), Body.NONE),
    RouteSpec(r.BATCH_CREATE, "/v1/batches", ("POST",), Body.JSON),
    RouteSpec(r.BATCH_LIST, "/v1/batches", ("GET",), Body.NONE),
    RouteSpec(r.BATCH_CANCEL, "/v1/batches/{batch_id}/cancel", ("POST",), Body.STREAM),
    RouteSpec(r.BATCH, "/v1/batches/{batch_id}", ("GET",), Body.NONE),
    RouteSpec(r.MODEL_LOAD, "/v1/models/load", ("POST",), Body.JSON, admin=True, required=("model",)),
    RouteSpec(r.MODEL_UNLOAD, "/v1/models/unload", ("POST",), Body.JSON, admin=True, required=("model",)),
    RouteSpec(r.LORA_LOAD, "/v1/lora/load", ("POST",), Body.JSON, admin=True, required=("lora_name",)),
    RouteSpec(r.LORA_UNLOAD, "/v1/lora/unload", ("POST",), Body.JSON, admin=True, required=("lora_name",)),
    RouteSpec(r.INTERNAL_ENCODE, "/v1/internal/encode", ("POST",), Body.JSON),
    RouteSpec(r.INTERNAL_DECODE, "/v1/internal/decode", ("POST",), Body.JSON),
    RouteSpec(r.INTERNAL_TOKEN_COUNT, "/v1/internal/token-count", ("POST",), Body.JSON),
    RouteSpec(r.INTERNAL_LOGITS, "/v1/internal/logits", ("POST",), Body.JSON),
    RouteSpec(r.INTERNAL_CHAT_PROMPT, "/v1/internal/chat-prompt", ("POST",), Body.JSON),
    # It stops every client's generation, not the caller's.
    RouteSpec(r.INTERNAL_STOP, "/v1/internal/stop-generation", ("POST",), Body.STREAM, admin=True),
    RouteSpec(r.INTERNAL_MODEL_INFO, "/v1/internal/model/info", ("GET",), Body.NONE),
    RouteSpec(r.INTERNAL_MODEL_LIST, "/v1/internal/model/list", ("GET",), Body.NONE, admin=True),
    RouteSpec(r.INTERNAL_MODEL_LOAD, "/v1/internal/model/load", ("POST",), Body.JSON, admin=True),
    RouteSpec(r.INTERNAL_MODEL_UNLOAD, "/v1/internal/model/unload", ("POST",), Body.STREAM, admin=True),
    RouteSpec(r.INTERNAL_LORA_LIST, "/v1/internal/lora/list", ("GET",), Body.NONE, admin=True),
    RouteSpec(r.INTERNAL_LORA_LOAD, "/v1/internal/lora/load", ("POST",), Body.JSON, admin=True),
    RouteSpec(r.INTERNAL_LORA_UNLOAD, "/v1/internal/lora/unload", ("POST",), Body.STREAM, admin=True),
)
