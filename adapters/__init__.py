"""Backend runtimes the gateway can front, by the name ``--backend`` takes."""

from __future__ import annotations

from adapters import llamacpp, localai, ollama, openai, sglang, tgi, vllm
from adapters.base import Adapter

ADAPTERS: dict[str, Adapter] = {
    module.ADAPTER.name: module.ADAPTER for module in (openai, vllm, sglang, tgi, ollama, llamacpp, localai)
}

__all__ = ["ADAPTERS", "Adapter"]
