"""``/openapi.json`` (OpenAPI 3.1) from the route table as configured, and ``/docs``.

The document lists only the routes the configured backends serve (and the admin routes
only where admin keys exist), both key schemes, the error envelope with the gateway's own
error types, and which answers may stream. ``/docs`` is Swagger UI from the assets the
``swagger-ui-py`` package ships: nothing is fetched from a CDN, so it works offline.
``/redoc`` leads there too.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from adapters import base as r
from adapters.base import Route
from gateway import __version__
from gateway.core.errors import GatewayError, NotFound
from gateway.proxy.routes import Body, RouteSpec

# What a route does, for the document: a summary and whether its answer may be an SSE stream.
SUMMARIES: dict[str, tuple[str, bool]] = {
    Route.MODELS: ("List the models", False),
    Route.MODEL: ("One model", False),
    Route.CHAT_COMPLETIONS: ("Create a chat completion (streams with `stream: true`)", True),
    Route.COMPLETIONS: ("Create a completion (streams with `stream: true`)", True),
    Route.EMBEDDINGS: ("Create embeddings", False),
    Route.RESPONSES: ("Create a response (streams with `stream: true`)", True),
    Route.RESPONSE: ("A stored response", False),
    Route.RESPONSE_CANCEL: ("Cancel a background response", False),
    Route.MESSAGES: ("Create a message, Anthropic's Messages API (streams with `stream: true`)", True),
    Route.COUNT_TOKENS: ("Count a message's tokens, Anthropic's Messages API", False),
    Route.RERANK: ("Rerank documents", False),
    Route.SCORE: ("Score text pairs", False),
    Route.TOKENIZE: ("Tokenize (the runtime's body format)", False),
    Route.DETOKENIZE: ("Detokenize (the runtime's body format)", False),
    Route.TRANSCRIPTIONS: ("Transcribe audio (multipart, streamed to the runtime)", True),
    Route.TRANSLATIONS: ("Translate audio (multipart, streamed to the runtime)", False),
    Route.SPEECH: ("Generate speech", False),
    Route.IMAGES: ("Generate images", False),
    Route.MODERATIONS: ("Classify text", False),
    Route.LOAD_LORA: ("Load a LoRA adapter (vLLM's route; admin keys)", False),
    Route.UNLOAD_LORA: ("Unload a LoRA adapter (vLLM's route; admin keys)", False),
    Route.FILE_UPLOAD: ("Upload a file (multipart, streamed to the runtime)", False),
    Route.FILE_LIST: ("List files", False),
    Route.FILE: ("One file", False),
    Route.FILE_DELETE: ("Delete a file", False),
    Route.FILE_CONTENT: ("A file's content", False),
    Route.BATCH_CREATE: ("Create a batch", False),
    Route.BATCH_LIST: ("List batches", False),
    Route.BATCH: ("One batch", False),
    Route.BATCH_CANCEL: ("Cancel a batch", False),
    Route.MODEL_LOAD: ("Load a model on the runtime (admin keys)", False),
    Route.MODEL_UNLOAD: ("Unload a model from the runtime (admin keys)", False),
    Route.LORA_LOAD: ("Load a LoRA adapter on the runtime (admin keys)", False),
    Route.LORA_UNLOAD: ("Unload a LoRA adapter from the runtime (admin keys)", False),
}
TEXTGEN_SUMMARY = "text-generation-webui's own route"
# The gateway's own answers before a backend is called, by route kind.
GATEWAY_ERRORS = {
    "400": "The request is malformed (not a JSON object, a missing field, bad HTTP)",
    "401": "No key, or an unknown one",
    "404": "Unknown model or route",
    "408": "The request's head or body came too slowly",
    "413": "The request body is larger than the gateway accepts",
    "431": "The request's head is larger than the gateway accepts",
    "429": "A rate or token limit was reached (Retry-After says when to try again)",
    "501": "The configured runtime does not serve this route",
    "502": "The backend could not be reached or answered with something that is not HTTP",
    "503": "No ready replica, or the backend is loading",
    "504": "The backend did not answer in time",
}
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Inference gateway API</title>
<link rel="icon" type="image/png" href="docs/favicon-32x32.png">
<link rel="stylesheet" href="docs/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true});
</script>
</body>
</html>
"""


def document(
    routes: Iterable[RouteSpec],
    *,
    auth: bool,
    admin: bool,
    metrics: bool,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``routes``, those the configured backends serve;
    ``auth``/``admin`` say whether client/admin keys exist."""
    error_types = _error_types()
    paths: dict[str, dict[str, Any]] = {}
    for spec in routes:
        path, parameters = _path(spec.path)
        for method in spec.methods:
            paths.setdefault(path, {})[method.lower()] = _operation(spec, parameters, auth)
    _gateway_routes(paths, admin=admin, metrics=metrics)
    keys: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}] if auth else []
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Inference gateway",
            "version": __version__,
            "description": (
                "An OpenAI-compatible gateway in front of self-hosted runtimes. Requests and answers "
                "pass through unchanged (streams included, as server-sent events); the gateway's own "
                "errors and every runtime's use one envelope "
                '`{"error": {"type", "message", "code", "param"}}` (Anthropic\'s on its Messages '
                "routes). A runtime's own errors keep its status."
            ),
        },
        "paths": paths,
        "security": keys,
        "components": _components(error_types),
    }


def _components(error_types: list[str]) -> dict[str, Any]:
    """The security schemes, the error envelopes and the gateway's error answers."""
    return {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["type", "message"],
                        "properties": {
                            "type": {
                                "type": "string",
                                "description": "By status, for the gateway's own errors and a "
                                "runtime's alike: " + ", ".join(error_types) + ".",
                                "examples": error_types,
                            },
                            "message": {"type": "string"},
                            "code": {"type": ["string", "null"]},
                            "param": {"type": ["string", "null"]},
                            "backend_type": {"type": "string", "description": "The runtime's own type."},
                        },
                    }
                },
            },
            "AnthropicError": {
                "type": "object",
                "required": ["type", "error"],
                "properties": {
                    "type": {"const": "error"},
                    "error": {
                        "type": "object",
                        "required": ["type", "message"],
                        "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
            },
            "JsonObject": {"type": "object", "additionalProperties": True},
        },
        "responses": {
            status: {
                "description": text,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
            for status, text in GATEWAY_ERRORS.items()
        },
    }


def _error_types() -> list[str]:
    """The ``type`` of every error the gateway answers with itself."""
    found: set[str] = set()
    pending: list[type[GatewayError]] = [GatewayError]
    while pending:
        error = pending.pop()
        found.add(error.type)
        pending += error.__subclasses__()
    return sorted(found)


def _path(template: str) -> tuple[str, list[dict[str, Any]]]:
    """Starlette's ``{name:path}`` as OpenAPI's ``{name}``, with its parameters."""
    names = re.findall(r"{(\w+)(?::\w+)?}", template)
    path = re.sub(r"{(\w+)(?::\w+)?}", r"{\1}", template)
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in names
    ]
    return path, parameters


def _operation(spec: RouteSpec, parameters: list[dict[str, Any]], auth: bool) -> dict[str, Any]:
    summary, streams = SUMMARIES.get(spec.name, (TEXTGEN_SUMMARY, False))
    success: dict[str, Any] = {"application/json": {"schema": {}}}
    if streams:
        success["text/event-stream"] = {"schema": {"type": "string"}}
    if spec.name == Route.FILE_CONTENT:
        success = {
            "application/octet-stream": {
                "schema": {"type": "string", "contentMediaType": "application/octet-stream"}
            }
        }
    errors = ["401"] if auth else []
    errors += ["404", "429", "501", "502", "503", "504"]
    if spec.body is Body.JSON:
        errors += ["400", "413"]
    anthropic = spec.name in r.ANTHROPIC_ROUTES
    envelope = {"application/json": {"schema": {"$ref": "#/components/schemas/AnthropicError"}}}

    def error(status: str) -> dict[str, Any]:
        if anthropic:
            return {"description": GATEWAY_ERRORS[status] + " (Anthropic's envelope)", "content": envelope}
        return {"$ref": f"#/components/responses/{status}"}

    operation: dict[str, Any] = {
        "operationId": f"{spec.name}_{'_'.join(spec.methods).lower()}",
        "summary": summary,
        "tags": ["admin" if spec.admin else _tag(spec)],
        "responses": {
            "200": {"description": "The runtime's answer, passed through", "content": success},
            **{status: error(status) for status in errors},
            "default": {
                "description": "The runtime's own error, with its status",
                "content": envelope
                if anthropic
                else {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
    if parameters:
        operation["parameters"] = parameters
    if spec.body is Body.JSON:
        schema: dict[str, Any] = {"$ref": "#/components/schemas/JsonObject"}
        if spec.required:
            schema = {
                "type": "object",
                "required": list(spec.required),
                "properties": {name: {"type": "string", "minLength": 1} for name in spec.required},
                "additionalProperties": True,
            }
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    elif spec.body is Body.STREAM and spec.name in {
        Route.FILE_UPLOAD,
        Route.TRANSCRIPTIONS,
        Route.TRANSLATIONS,
    }:
        form = {
            "type": "object",
            "properties": {"file": {"type": "string", "contentMediaType": "application/octet-stream"}},
            "additionalProperties": True,
        }
        operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": form}}}
        operation["responses"]["413"] = {"$ref": "#/components/responses/413"}
    if not auth:
        operation["security"] = []
    elif spec.admin:
        operation["description"] = "Admin keys only."
    return operation


def _tag(spec: RouteSpec) -> str:
    if spec.name in r.ANTHROPIC_ROUTES:
        return "anthropic"
    if spec.name in r.TEXTGEN_ROUTES:
        return "text-generation-webui"
    if spec.name in r.FILE_ROUTES or spec.name in r.BATCH_ROUTES:
        return "files and batches"
    return "openai"


def _gateway_routes(paths: dict[str, dict[str, Any]], *, admin: bool, metrics: bool) -> None:
    def plain(
        summary: str, content: str = "application/json", extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {
            "summary": summary,
            "tags": ["gateway"],
            "security": [],
            "responses": {
                "200": {"description": summary, "content": {content: {"schema": {}}}},
                **(extra or {}),
            },
        }

    unavailable = {"503": {"$ref": "#/components/responses/503"}}
    paths["/health"] = {"get": {**plain("Liveness: the process serves"), "operationId": "health"}}
    paths["/ready"] = {
        "get": {**plain("Readiness: a backend answers", extra=unavailable), "operationId": "ready"}
    }
    if metrics:
        summary = "The gateway's Prometheus metrics (open, or the metrics token)"
        paths["/metrics"] = {"get": {**plain(summary, "text/plain"), "operationId": "metrics"}}
    if admin:
        paths["/admin/backends"] = {
            "get": {
                "operationId": "admin_backends",
                "summary": "Every backend and replica as the gateway sees it (admin keys)",
                "tags": ["admin"],
                "responses": {
                    "200": {"description": "The backends", "content": {"application/json": {"schema": {}}}},
                    "401": {"$ref": "#/components/responses/401"},
                },
            }
        }


class Docs:
    """``GET /openapi.json`` and ``GET /docs`` (and its assets under ``/docs/``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.body = orjson.dumps(spec)
        self.assets = _assets_folder()

    async def openapi(self, request: Request) -> Response:
        return Response(self.body, media_type="application/json")

    async def page(self, request: Request) -> Response:
        return HTMLResponse(DOCS_PAGE)

    async def elsewhere(self, request: Request) -> Response:
        """``/redoc``, where FastAPI servers keep their other docs page: the same document, in
        the one page the gateway has."""
        return RedirectResponse("docs", status_code=307)

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in DOCS_ASSETS:
            error = NotFound(f"no route {request.url.path}")
            return Response(error.body(), status_code=404, media_type="application/json")
        return FileResponse(self.assets / name, headers={"cache-control": "public, max-age=86400"})


def _assets_folder() -> Path:
    """swagger-ui-py's ``static`` folder, found without importing the package (its templating
    is not needed: the page is the gateway's own)."""
    found = importlib.util.find_spec("swagger_ui")
    if found is None or not found.submodule_search_locations:
        raise RuntimeError("/docs needs the swagger-ui-py package (a dependency): reinstall the gateway")
    return Path(next(iter(found.submodule_search_locations))) / "static"
