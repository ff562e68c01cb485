"""A runtime that stores objects as OpenAI's API does: files, batches (which finish at once
with output and error files) and stored responses that a later one may continue, streamed
or not. Every ID it hands out is its own, and it trusts whoever asks: the gateway alone
keeps one key from another's objects."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from aiohttp import web

MODEL = "org/model-7b"
OTHER_MODELS = ["org/other-1b", "team-a/tiny"]


class ObjectRuntime:
    def __init__(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.responses: dict[str, dict[str, Any]] = {}
        self.probes = 0
        self.flood_closed = threading.Event()
        """Set when a ``flood`` stream's client went away."""
        self.chats: list[dict[str, Any]] = []
        """The bodies of the chat requests it was sent."""
        self.requests: list[tuple[str, str]] = []
        """Method and path (with the query) of every request but the health probes."""
        self.app = web.Application(client_max_size=64 * 1024**2)
        router = self.app.router
        router.add_get("/health", self.health)
        router.add_get("/v1/models", self.models)
        router.add_get("/v1/models/{id:.+}", self.model)
        router.add_post("/v1/files", self.upload)
        router.add_get("/v1/files", self.list_files)
        router.add_get("/v1/files/{id}", self.file)
        router.add_get("/v1/files/{id}/content", self.content)
        router.add_delete("/v1/files/{id}", self.delete)
        router.add_post("/v1/batches", self.create_batch)
        router.add_get("/v1/batches", self.list_batches)
        router.add_get("/v1/batches/{id}", self.batch)
        router.add_post("/v1/batches/{id}/cancel", self.cancel_batch)
        router.add_post("/v1/responses", self.respond)
        router.add_get("/v1/responses/{id}", self.response)
        router.add_post("/v1/chat/completions", self.chat)

    def _seen(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path_qs))

    async def health(self, request: web.Request) -> web.Response:
        self.probes += 1
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        self._seen(request)
        models = [MODEL, *OTHER_MODELS]
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "x"} for m in models]}
        )

    async def model(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.json_response({"id": request.match_info["id"], "object": "model", "owned_by": "x"})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        body = await request.json()
        self.chats.append(body)
        if body.get("model") == "flood":
            return await self._flood(request)
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": body.get("model"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    async def _flood(self, request: web.Request) -> web.StreamResponse:
        """A stream as fast as the socket takes it, until the client goes."""
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        event = b"data: " + json.dumps({"pad": "x" * 65_000}).encode() + b"\n\n"
        try:
            while True:
                await stream.write(event)
        except ConnectionError:
            self.flood_closed.set()
        except asyncio.CancelledError:
            self.flood_closed.set()
            raise
        return stream

    # Files

    def _add_file(self, content: bytes, name: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-{len(self.files) + 1:04d}"
        self.files[file_id] = {
            "id": file_id, "object": "file", "bytes": len(content), "created_at": 1, "filename": name,
            "purpose": purpose, "status": "processed",
        }  # fmt: skip
        self.contents[file_id] = content
        return self.files[file_id]

    def _missing(self, what: str) -> web.Response:
        body = {"error": {"message": f"No such {what}", "type": "invalid_request_error", "code": None}}
        return web.json_response(body, status=404)

    async def upload(self, request: web.Request) -> web.Response:
        self._seen(request)
        form = await request.post()
        upload = form["file"]
        assert isinstance(upload, web.FileField)
        return web.json_response(self._add_file(upload.file.read(), upload.filename, str(form["purpose"])))

    async def list_files(self, request: web.Request) -> web.Response:
        self._seen(request)
        data = list(self.files.values())
        after = request.query.get("after")
        if after is not None:
            data = [f for f in data if f["id"] > after]
        return web.json_response(
            {"object": "list", "data": data, "first_id": None, "last_id": None, "has_more": False}
        )

    async def file(self, request: web.Request) -> web.Response:
        self._seen(request)
        found = self.files.get(request.match_info["id"])
        return web.json_response(found) if found else self._missing("file")

    async def content(self, request: web.Request) -> web.Response:
        self._seen(request)
        found = self.contents.get(request.match_info["id"])
        if found is None:
            return self._missing("file")
        return web.Response(body=found, content_type="application/octet-stream")

    async def delete(self, request: web.Request) -> web.Response:
        self._seen(request)
        file_id = request.match_info["id"]
        if self.files.pop(file_id, None) is None:
            return self._missing("file")
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    # Batches: each one completes as soon as it is made

    async def create_batch(self, request: web.Request) -> web.Response:
        self._seen(request)
        data = await request.json()
        input_id = data.get("input_file_id")
        if input_id not in self.files:
            return self._missing("file")
        lines = self.contents[input_id].splitlines()
        output = self._add_file(b"".join(b'{"ok": true}\n' for _ in lines), "output.jsonl", "batch_output")
        errors = self._add_file(b"", "errors.jsonl", "batch_output")
        batch_id = f"batch_{len(self.batches) + 1:04d}"
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": data["endpoint"], "input_file_id": input_id,
            "completion_window": data["completion_window"], "status": "completed", "created_at": 1,
            "output_file_id": output["id"], "error_file_id": errors["id"],
            "request_counts": {"total": len(lines), "completed": len(lines), "failed": 0},
        }  # fmt: skip
        return web.json_response(self.batches[batch_id])

    async def list_batches(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.json_response({"object": "list", "data": list(self.batches.values()), "has_more": False})

    async def batch(self, request: web.Request) -> web.Response:
        self._seen(request)
        found = self.batches.get(request.match_info["id"])
        return web.json_response(found) if found else self._missing("batch")

    async def cancel_batch(self, request: web.Request) -> web.Response:
        self._seen(request)
        found = self.batches.get(request.match_info["id"])
        if found is None:
            return self._missing("batch")
        found["status"] = "cancelling"
        return web.json_response(found)

    # Stored responses

    async def respond(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        data = await request.json()
        previous = data.get("previous_response_id")
        if previous is not None and previous not in self.responses:
            return self._missing("response")
        said = data.get("input") if isinstance(data.get("input"), str) else "?"
        history = [*self.responses[previous]["history"], said] if previous else [said]
        response_id = f"resp_{len(self.responses) + 1:04d}"
        stored: dict[str, Any] = {
            "id": response_id, "object": "response", "created_at": 1, "status": "completed",
            "model": data.get("model"), "previous_response_id": previous,
            "output": [{
                "type": "message", "id": f"msg_{response_id}", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": " | ".join(history), "annotations": []}],
            }],
            "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
            "history": history,
        }  # fmt: skip
        self.responses[response_id] = stored
        shown = {k: v for k, v in stored.items() if k != "history"}
        if not data.get("stream"):
            return web.json_response(shown)
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        created = {**shown, "status": "in_progress", "output": []}
        events: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": created}),
            ("response.output_text.delta", {"item_id": f"msg_{response_id}", "delta": "x"}),
            ("response.completed", {"response": shown}),
        ]
        for number, (kind, event) in enumerate(events):
            payload = json.dumps({"type": kind, "sequence_number": number, **event}).encode()
            # An event sent in two pieces, split inside the ID, as a network may deliver it.
            text = b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"
            middle = text.find(response_id.encode()) + 3
            await stream.write(text[:middle])
            await stream.write(text[middle:])
        await stream.write_eof()
        return stream

    async def response(self, request: web.Request) -> web.Response:
        self._seen(request)
        found = self.responses.get(request.match_info["id"])
        if found is None:
            return self._missing("response")
        return web.json_response({k: v for k, v in found.items() if k != "history"})


async def start_objects(runtime: ObjectRuntime) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(runtime.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    return runner, server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
