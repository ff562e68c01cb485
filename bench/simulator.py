"""A simulated continuous-batching runtime, for balancing workloads without a GPU.

    python -m bench.simulator --port 8000 [--max-batch 8] [--decode-ms 20] ...

It behaves like vLLM's engine in the ways a balancer can see and feel:
- requests wait in a queue and run in a batch of at most ``max_batch``; each engine step
  decodes one token for every running request and takes longer as the batch grows;
- a request's first step also pays prefill time for its prompt tokens that the prefix
  cache does not hold (the prompt is cut in blocks, each block's hash chained to the ones
  before it, kept in an LRU of ``cache_blocks``);
- ``/metrics`` has vLLM's names: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc`` and the prefix-cache query and hit counters.

Prompt tokens are counted as whitespace-separated words of the messages (or prompt);
``max_tokens`` (default 16) sets the answer's length. Streams send a chunk a token.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODEL = "sim"


@dataclass
class Settings:
    max_batch: int = 8
    decode_ms: float = 20.0
    """One step with one running request."""
    batch_growth: float = 0.05
    """Each further request in the batch lengthens a step by this share of ``decode_ms``."""
    prefill_ms_per_token: float = 0.2
    block_tokens: int = 16
    cache_blocks: int = 4096

    def options(self) -> list[str]:
        """These settings as ``python -m bench.simulator``'s options."""
        return [f"--{name.replace('_', '-')}={getattr(self, name)}" for name in self.__dataclass_fields__]

    def capacity(self, max_tokens: int, prompt_tokens: int) -> float:
        """Requests a second one replica finishes with a full batch: a request's prefill
        holds up the whole batch's step, its decoding takes a share of the steps."""
        step = self.decode_ms * (1 + self.batch_growth * (self.max_batch - 1)) / 1000
        prefill = prompt_tokens * self.prefill_ms_per_token / 1000
        return 1 / (prefill + max_tokens * step / self.max_batch)


@dataclass(eq=False)
class Request:
    blocks: list[str]
    prompt_tokens: int
    max_tokens: int
    tokens: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    produced: int = 0
    prefilled: bool = False


class Engine:
    """The queue, the batch and the prefix cache; one step at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.cache: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.cache_queries = 0
        self.cache_hits = 0
        self.steps = 0
        self.submitted = 0
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def submit(self, prompt: str, max_tokens: int) -> Request:
        words = prompt.split()
        size = self.settings.block_tokens
        blocks, chained = [], hashlib.sha256()
        for start in range(0, len(words) - len(words) % size, size):
            chained.update(" ".join(words[start : start + size]).encode())
            blocks.append(chained.hexdigest())
        request = Request(blocks, len(words), max(max_tokens, 1))
        self.submitted += 1
        self.waiting.append(request)
        self._work.set()
        return request

    def abort(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)

    def kv_usage(self) -> float:
        used = sum(r.prompt_tokens + r.produced for r in self.running)
        capacity = self.settings.cache_blocks * self.settings.block_tokens
        return min(used / capacity, 1.0)

    async def _run(self) -> None:
        settings = self.settings
        while True:
            if not self.running and not self.waiting:
                self._work.clear()
                await self._work.wait()
            while self.waiting and len(self.running) < settings.max_batch:
                self.running.append(self.waiting.popleft())
            prefill_tokens = sum(self._prefill(r) for r in self.running if not r.prefilled)
            step = settings.decode_ms * (1 + settings.batch_growth * (len(self.running) - 1))
            await asyncio.sleep((step + prefill_tokens * settings.prefill_ms_per_token) / 1000)
            self.steps += 1
            for request in list(self.running):
                request.produced += 1
                request.tokens.put_nowait(f" t{request.produced}")
                if request.produced >= request.max_tokens:
                    request.tokens.put_nowait(None)
                    self.running.remove(request)

    def _prefill(self, request: Request) -> int:
        """Prompt tokens to compute: those past the longest cached prefix of blocks."""
        request.prefilled = True
        cached = 0
        for position, block in enumerate(request.blocks):
            self.cache_queries += 1
            if cached == position and block in self.cache:
                self.cache_hits += 1
                cached += 1
            self.cache[block] = None
            self.cache.move_to_end(block)
        while len(self.cache) > self.settings.cache_blocks:
            self.cache.popitem(last=False)
        return request.prompt_tokens - cached * self.settings.block_tokens


def _prompt(body: dict[str, Any]) -> str:
    if "messages" in body:
        parts = []
        for message in body["messages"]:
            content = message.get("content")
            parts.append(content if isinstance(content, str) else json.dumps(content))
        return " ".join(parts)
    return str(body.get("prompt", ""))


def _chunk(text: str, finish: str | None) -> bytes:
    delta = {"content": text} if text else {}
    event = {
        "id": "sim", "object": "chat.completion.chunk", "created": int(time.time()), "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }  # fmt: skip
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.engine = Engine(settings)
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.chat)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_post("/reset", self.reset)
        self.app.on_startup.append(self._start)
        self.app.on_cleanup.append(self._stop)

    async def _start(self, app: web.Application) -> None:
        self.engine.start()

    async def _stop(self, app: web.Application) -> None:
        await self.engine.stop()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        job = self.engine.submit(_prompt(body), int(body.get("max_tokens") or 16))
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            try:
                await response.prepare(request)
                while (token := await job.tokens.get()) is not None:
                    await response.write(_chunk(token, None))
                await response.write(_chunk("", "length") + b"data: [DONE]\n\n")
                await response.write_eof()
            except (ConnectionResetError, asyncio.CancelledError):
                self.engine.abort(job)  # the client left: the engine stops working for it
                raise
            return response
        text = []
        while (token := await job.tokens.get()) is not None:
            text.append(token)
        usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.produced,
                 "total_tokens": job.prompt_tokens + job.produced}  # fmt: skip
        return web.json_response({
            "id": "sim", "object": "chat.completion", "created": int(time.time()), "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": "length"}],
            "usage": usage,
        })  # fmt: skip

    async def reset(self, request: web.Request) -> web.Response:
        """Empty the prefix cache and zero the counters (between two runs of a workload)."""
        engine = self.engine
        engine.cache.clear()
        engine.cache_queries = engine.cache_hits = engine.submitted = 0
        return web.json_response({"reset": True})

    async def models(self, request: web.Request) -> web.Response:
        entry = {"id": MODEL, "object": "model", "created": 0, "owned_by": "sim"}
        return web.json_response({"object": "list", "data": [entry]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def metrics(self, request: web.Request) -> web.Response:
        engine = self.engine
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{model_name="{MODEL}"}} {len(engine.running)}',
            "# TYPE vllm:num_requests_waiting gauge",
            f'vllm:num_requests_waiting{{model_name="{MODEL}"}} {len(engine.waiting)}',
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}} {engine.kv_usage()}',
            "# TYPE vllm:prefix_cache_queries counter",
            f'vllm:prefix_cache_queries_total{{model_name="{MODEL}"}} {engine.cache_queries}',
            "# TYPE vllm:prefix_cache_hits counter",
            f'vllm:prefix_cache_hits_total{{model_name="{MODEL}"}} {engine.cache_hits}',
            "# TYPE sim_requests counter",
            f"sim_requests_total {engine.submitted}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    defaults = Settings()
    for name in defaults.__dataclass_fields__:
        parser.add_argument("--" + name.replace("_", "-"), type=type(getattr(defaults, name)),
                            default=getattr(defaults, name))  # fmt: skip
    args = parser.parse_args()
    settings = Settings(**{name: getattr(args, name) for name in defaults.__dataclass_fields__})
    web.run_app(Runtime(settings).app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
