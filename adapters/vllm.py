"""vLLM (``vllm serve``).

- OpenAI routes under /v1, plus ``/tokenize`` and ``/detokenize`` at the root; no
  ``/v1/models/{id}``. Embeddings only on pooling models (a chat model answers 404).
- ``/health`` answers 200 once the engine runs and 503 when it has died; while weights load
  the socket refuses connections, so "refused" means loading as often as down.
- Errors are OpenAI-shaped with vLLM's exception names as ``type`` and an integer ``code``;
  a route it has not registered (routes are registered per model task and per flag:
  embeddings only for pooling models, LoRA loading only when enabled) is FastAPI's
  ``{"detail": "Not Found"}``, which the gateway answers as 501 saying why.
- Anthropic's ``/v1/messages`` and ``/v1/messages/count_tokens`` beside the OpenAI routes.
- LoRA load/unload at ``/v1/load_lora_adapter`` (needs VLLM_ALLOW_RUNTIME_LORA_UPDATING),
  which ``/v1/lora/load`` and ``/unload`` reach with the same body; no model loading (one
  model a server).
- ``/metrics`` (Prometheus, no auth).
"""

from __future__ import annotations

from adapters import base as r
from adapters.base import Adapter, LoadSignals, Route

LORA_OFF = (
    "runtime LoRA updating is off: start vLLM with --enable-lora and the environment "
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
)

ADAPTER = Adapter(
    name="vllm",
    routes=r.CORE_ROUTES - {Route.MODEL}
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
        Route.TRANSLATIONS,
    }
    | {Route.LORA_LOAD, Route.LORA_UNLOAD},
    paths={
        Route.TOKENIZE: "/tokenize",
        Route.DETOKENIZE: "/detokenize",
        Route.LORA_LOAD: "/v1/load_lora_adapter",
        Route.LORA_UNLOAD: "/v1/unload_lora_adapter",
    },
    health_path="/health",
    metrics_path="/metrics",
    load_signals=LoadSignals(
        waiting=("vllm:num_requests_waiting",),
        running=("vllm:num_requests_running",),
        # Renamed in 0.10; the old name is still served by older releases.
        kv_use=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    loading_statuses=frozenset(),
    unregistered={
        Route.EMBEDDINGS: "vLLM serves embeddings only for a pooling model (a generative model has none)",
        Route.RERANK: "vLLM serves rerank only for a cross-encoder or pooling model",
        Route.SCORE: "vLLM serves score only for a cross-encoder or pooling model",
        Route.TRANSCRIPTIONS: "vLLM serves transcriptions only for a speech-recognition model",
        Route.TRANSLATIONS: "vLLM serves translations only for a speech-recognition model",
        Route.CHAT_COMPLETIONS: "vLLM serves chat completions only for a generative model",
        Route.COMPLETIONS: "vLLM serves completions only for a generative model",
        Route.RESPONSES: "vLLM serves responses only for a generative model",
        Route.MESSAGES: "vLLM serves messages only for a generative model",
        Route.LOAD_LORA: LORA_OFF,
        Route.UNLOAD_LORA: LORA_OFF,
        Route.LORA_LOAD: LORA_OFF,
        Route.LORA_UNLOAD: LORA_OFF,
    },
)
