"""Fakes that answer as each runtime really does (see ../shared/BACKENDS.md): their model
lists, error bodies and statuses, loading behaviour, stream framing and mid-stream errors."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

FLAVOURS = ("vllm", "sglang", "tgi", "ollama", "llamacpp", "localai")
SEED_FLAVOURS = ("textgen", "basert")
"""Servers fronted for their own routes: text-generation-webui's API and basert's serve."""
MODEL = "org/model-7b"
MANAGEMENT_PATHS = {
    "/v1/internal/model/load", "/v1/internal/model/unload", "/v1/internal/lora/load",
    "/v1/internal/lora/unload", "/v1/models/load", "/v1/models/unload", "/v1/lora/load",
    "/v1/lora/unload", "/models/apply", "/backend/shutdown", "/api/generate",
    "/v1/unload_lora_adapter", "/unload_lora_adapter",
}  # fmt: skip


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
        self.lora_updating = True
        """vLLM registers its LoRA routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING."""
        self.paths: list[str] = []
        self.requests: list[tuple[str, str, bytes]] = []
        """Method, path and body of each request the catch-all route took."""
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
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
        # A multipart upload is read by its parser, below, not here.
        body = b"" if path == "/v1/files" else await request.read()
        self.requests.append((request.method, path, body))
        if path.endswith("_lora_adapter") and self.flavour == "vllm" and not self.lora_updating:
            return web.json_response({"detail": "Not Found"}, status=404)
        if path in MANAGEMENT_PATHS:
            if self.flavour == "ollama":
                return web.json_response({"model": MODEL, "response": "", "done": True})
            return web.json_response("OK")
        if path.startswith("/v1/internal/") and self.flavour == "textgen":
            return web.json_response({"route": path.removeprefix("/v1/internal/")})
        if path == ("/v1/metrics" if self.flavour == "basert" else "/metrics") and self.flavour != "ollama":
            return web.Response(
                text=f"# TYPE {self.flavour}_requests_running gauge\n{self.flavour}_requests_running 3\n"
            )
        if (path.startswith(("/v1/files", "/v1/batches"))) and self.flavour in {"basert", "openai"}:
            return await self._files_and_batches(request, path)
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

    async def _files_and_batches(self, request: web.Request, path: str) -> web.StreamResponse:
        """OpenAI's Files and Batches, in memory."""
        parts = path.strip("/").split("/")  # v1, files|batches, id?, content|cancel?
        if parts[1] == "files":
            if request.method == "POST" and len(parts) == 2:
                form = await request.post()
                upload = form["file"]
                assert isinstance(upload, web.FileField)
                file_id = f"file-{len(self.files) + 1}"
                self.files[file_id] = upload.file.read()
                return web.json_response(self._file(file_id, upload.filename, str(form["purpose"])))
            if len(parts) == 2:
                return web.json_response(
                    {
                        "object": "list",
                        "data": [self._file(f, f, "batch") for f in self.files],
                        "has_more": False,
                    }
                )
            if parts[2] not in self.files:
                body = {"error": {"message": "No such file", "type": "invalid_request_error", "code": None}}
                return web.json_response(body, status=404)
            if len(parts) == 4:
                return web.Response(body=self.files[parts[2]], content_type="application/octet-stream")
            if request.method == "DELETE":
                del self.files[parts[2]]
                return web.json_response({"id": parts[2], "object": "file", "deleted": True})
            return web.json_response(self._file(parts[2], parts[2], "batch"))
        if request.method == "POST" and len(parts) == 2:
            data = await request.json()
            batch_id = f"batch-{len(self.batches) + 1}"
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": data["endpoint"],
                "input_file_id": data["input_file_id"], "completion_window": data["completion_window"],
                "status": "validating", "created_at": 1,
            }  # fmt: skip
            return web.json_response(self.batches[batch_id])
        if len(parts) == 2:
            return web.json_response(
                {"object": "list", "data": list(self.batches.values()), "has_more": False}
            )
        batch = self.batches[parts[2]]
        if len(parts) == 4:
            batch["status"] = "cancelling"
        return web.json_response(batch)

    def _file(self, file_id: str, name: str, purpose: str) -> dict[str, Any]:
        size = len(self.files.get(file_id, b""))
        return {
            "id": file_id, "object": "file", "bytes": size, "created_at": 1, "filename": name,
            "purpose": purpose, "status": "processed",
        }  # fmt: skip

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
