"""Fakes that answer as each runtime really does (see ../shared/BACKENDS.md): their model
lists, error bodies and statuses, loading behaviour, stream framing and mid-stream errors."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

FLAVOURS = ("vllm", "sglang", "tgi", "ollama", "llamacpp", "localai")
MODEL = "org/model-7b"


def _chunk(content: str) -> bytes:
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class RuntimeFake:
    def __init__(self, flavour: str) -> None:
        self.flavour = flavour
        self.loading = False
        self.paths: list[str] = []
        self.app = web.Application(client_max_size=1024**3, middlewares=[self._middleware])
        router = self.app.router
        router.add_get("/v1/models", self.models)
        router.add_post("/v1/chat/completions", self.chat)
        router.add_post("/v1/embeddings", self.embeddings)
        router.add_route("*", "/{tail:.*}", self.other)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.headers.get("User-Agent", "").startswith("inference-gateway/"):
            self.paths.append(request.path)  # a client's request, not the gateway's own probes
        if self.loading and self.flavour == "llamacpp":
            # llama-server answers every route, /health included, while it loads.
            return web.json_response(
                {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, status=503
            )
        response: web.StreamResponse = await handler(request)
        return response

    # Routes

    async def models(self, request: web.Request) -> web.Response:
        entry = {"id": MODEL, "object": "model", "created": 1700000000, "owned_by": self.flavour}
        if self.flavour == "vllm":
            body: dict[str, Any] = {
                "object": "list",
                "data": [{**entry, "root": MODEL, "max_model_len": 4096}],
            }
        elif self.flavour == "llamacpp":
            body = {
                "models": [{"name": MODEL, "model": MODEL}],
                "object": "list",
                "data": [{**entry, "meta": {"n_ctx_train": 4096}}],
            }
        elif self.flavour == "localai":
            body = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
        elif self.flavour == "tgi":
            body = {
                "object": "list",
                "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": MODEL}],
            }
        else:
            body = {"object": "list", "data": [entry]}
        return web.json_response(body)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        data = await request.json()
        model = data.get("model")
        if model == "too-long":
            return self._context_error()
        if model != MODEL:
            return self._unknown_model(model)
        if data.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(_chunk("Hi"))
            if data.get("fail_mid_stream"):
                await response.write(self._stream_error())
                if self.flavour in {"vllm", "sglang", "localai"}:
                    await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response
            await response.write(_chunk(" there"))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.json_response({
            "id": "c1", "object": "chat.completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        })  # fmt: skip

    async def embeddings(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "model": MODEL,
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
                "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
            }
        )

    async def other(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if (
            request.method == "GET"
            and path.startswith("/v1/models/")
            and self.flavour in {"sglang", "ollama"}
        ):
            model = path.removeprefix("/v1/models/")
            if model == MODEL:
                return web.json_response(
                    {"id": MODEL, "object": "model", "created": 1, "owned_by": self.flavour}
                )
            return self._unknown_model(model)
        if path in {"/health", "/readyz"}:
            if self.loading:
                return web.json_response({"status": "loading"}, status=503)
            return web.json_response({"status": "ok"})
        if path == "/" and self.flavour == "ollama":
            return web.Response(text="Ollama is running")
        if path in {"/tokenize", "/v1/tokenize"}:
            return web.json_response({"tokens": [1, 2, 3], "count": 3})
        if path in {"/v1/load_lora_adapter", "/load_lora_adapter"}:
            return web.Response(text="Success: LoRA adapter 'sql' added successfully.")
        if path == "/v1/images/generations":
            return web.json_response({"created": 1, "data": [{"url": "http://localai/image.png"}]})
        # An unregistered route, in the runtime's own words.
        if self.flavour in {"vllm", "sglang"}:
            return web.json_response({"detail": "Not Found"}, status=404)
        return web.Response(status=404, text="404 page not found")

    # The runtimes' own error shapes

    def _context_error(self) -> web.Response:
        message = "This model's maximum context length is 4096 tokens"
        if self.flavour == "vllm":
            body: Any = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
            return web.json_response(body, status=400)
        if self.flavour == "sglang":
            body = {
                "object": "error",
                "message": message,
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
            return web.json_response(body, status=400)
        if self.flavour == "tgi":
            body = {"error": f"Input validation error: {message}", "error_type": "validation"}
            return web.json_response(body, status=422)
        if self.flavour == "llamacpp":
            body = {
                "error": {
                    "code": 400,
                    "message": message,
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": 5000,
                    "n_ctx": 4096,
                }
            }
            return web.json_response(body, status=400)
        if self.flavour == "localai":
            return web.json_response({"error": {"code": 400, "message": message, "type": ""}}, status=400)
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        return web.json_response(body, status=400)

    def _unknown_model(self, model: str) -> web.Response:
        message = f'model "{model}" not found'
        if self.flavour == "sglang":
            body: Any = {
                "object": "error",
                "message": message,
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            }
        elif self.flavour == "tgi":
            body = {"error": message, "error_type": "not_found"}
        elif self.flavour == "ollama":
            body = {
                "error": {
                    "message": message + ", try pulling it first",
                    "type": "not_found_error",
                    "param": None,
                    "code": None,
                }
            }
        else:
            body = {"error": {"message": message, "type": "NotFoundError", "param": None, "code": 404}}
        return web.json_response(body, status=404)

    def _stream_error(self) -> bytes:
        if self.flavour == "tgi":
            error: Any = {
                "error": "Request failed during generation: out of memory",
                "error_type": "generation",
            }
        else:
            error = {
                "error": {
                    "message": "Request failed during generation: out of memory",
                    "type": "InternalServerError",
                    "code": 500,
                }
            }
        return b"data: " + json.dumps(error).encode() + b"\n\n"
