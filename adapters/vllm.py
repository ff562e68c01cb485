"""vLLM (``vllm serve``): OpenAI routes under /v1, ``/health`` answering 200 once the engine runs.

While weights load the socket is bound but not listening, so a refused connection means
"loading" as often as "down"; ``/health`` answers 503 when the engine has died.
Embeddings are served only by pooling models (a chat model answers 404).
"""

from __future__ import annotations

from adapters.base import ALL_ROUTES, Adapter

ADAPTER = Adapter(name="vllm", routes=ALL_ROUTES, health_path="/health", loading_statuses=frozenset())
