"""Text Generation Inference: chat and completions under /v1, one entry in /v1/models, no
embeddings (that is TEI's job), ``/health`` once the model is loaded (refused before)."""

from __future__ import annotations

from adapters.base import CHAT_COMPLETIONS, COMPLETIONS, MODEL, MODELS, Adapter

ADAPTER = Adapter(
    name="tgi",
    routes=frozenset({MODELS, MODEL, CHAT_COMPLETIONS, COMPLETIONS}),
    health_path="/health",
    loading_statuses=frozenset(),
)
