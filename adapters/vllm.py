"""vLLM (``vllm serve``).

- OpenAI routes under /v1, plus ``/tokenize`` and ``/detokenize`` at the root; no
  ``/v1/models/{id}``. Embeddings only on pooling models (a chat model answers 404).
- ``/health`` answers 200 once the engine runs and 503 when it has died; while weights load
  the socket refuses connections, so "refused" means loading as often as down.
- Errors are OpenAI-shaped, except unregistered routes (FastAPI's ``{"detail": ...}``).
- LoRA load/unload at ``/v1/load_lora_adapter`` (needs VLLM_ALLOW_RUNTIME_LORA_UPDATING),
  which ``/v1/lora/load`` and ``/unload`` reach with the same body; no model loading (one
  model a server).
- ``/metrics`` (Prometheus, no auth).
"""

from __future__ import annotations

from adapters import base as r
from adapters.base import Adapter, LoadSignals

ADAPTER = Adapter(
    name="vllm",
    routes=r.CORE_ROUTES - {r.MODEL}
    | r.LORA_ROUTES
    | {
        r.RESPONSES,
        r.RESPONSE,
        r.RESPONSE_CANCEL,
        r.RERANK,
        r.SCORE,
        r.TOKENIZE,
        r.DETOKENIZE,
        r.TRANSCRIPTIONS,
        r.TRANSLATIONS,
    }
    | {r.LORA_LOAD, r.LORA_UNLOAD},
    paths={
        r.TOKENIZE: "/tokenize",
        r.DETOKENIZE: "/detokenize",
        r.LORA_LOAD: "/v1/load_lora_adapter",
        r.LORA_UNLOAD: "/v1/unload_lora_adapter",
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
)
