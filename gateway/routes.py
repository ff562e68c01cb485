"""The routes the gateway forwards. Nothing else reaches a backend."""

from __future__ import annotations

from dataclasses import dataclass

from adapters.base import CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS, MODEL, MODELS


@dataclass(frozen=True, slots=True)
class RouteSpec:
    name: str
    path: str
    methods: tuple[str, ...]
    json_body: bool
    """The body must be a JSON object; it is read whole (up to the size limit) and checked."""


ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(MODELS, "/v1/models", ("GET",), json_body=False),
    RouteSpec(MODEL, "/v1/models/{model:path}", ("GET",), json_body=False),
    RouteSpec(CHAT_COMPLETIONS, "/v1/chat/completions", ("POST",), json_body=True),
    RouteSpec(COMPLETIONS, "/v1/completions", ("POST",), json_body=True),
    RouteSpec(EMBEDDINGS, "/v1/embeddings", ("POST",), json_body=True),
)
