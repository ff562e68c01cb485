"""SGLang (``python -m sglang.launch_server``).

- OpenAI routes under /v1, ``/v1/models/{id}`` included; tokenize and detokenize under /v1;
  Anthropic's ``/v1/messages`` and ``/v1/messages/count_tokens``.
- ``/health`` runs a one-token generation and answers 503 during warm-up after the socket
  opens (before that, connections are refused).
- Errors are **flat**: ``{"object": "error", "message", "type", "param", "code"}``; the
  gateway nests them into the OpenAI shape.
- LoRA load/unload at the root: ``/load_lora_adapter``, ``/unload_lora_adapter`` (also
  reached by ``/v1/lora/load`` and ``/unload``). Its weight-update routes are never reachable.
- ``/metrics`` with ``--enable-metrics``.
"""

from __future__ import annotations

from adapters import base as r
from adapters.base import Adapter, LoadSignals, Route

ADAPTER = Adapter(
    name="sglang",
    routes=r.CORE_ROUTES
    | r.LORA_ROUTES
    | r.ANTHROPIC_ROUTES
    | {
        Route.RESPONSES,
        Route.RESPONSE,
        Route.RESPONSE_CANCEL,
        Route.RERANK,
        Route.SCORE,
        Route.TOKENIZE,
        Route.DETOKENIZE,
        Route.TRANSCRIPTIONS,
    }
    | {Route.LORA_LOAD, Route.LORA_UNLOAD},
    paths={
        Route.LOAD_LORA: "/load_lora_adapter",
        Route.UNLOAD_LORA: "/unload_lora_adapter",
        Route.LORA_LOAD: "/load_lora_adapter",
        Route.LORA_UNLOAD: "/unload_lora_adapter",
    },
    health_path="/health",
    metrics_path="/metrics",
    load_signals=LoadSignals(
        waiting=("sglang:num_queue_reqs",),
        running=("sglang:num_running_reqs",),
        kv_use=("sglang:token_usage",),
    ),
)
