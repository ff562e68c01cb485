"""Backend runtimes the gateway can front, by the name ``--backend`` takes."""

from __future__ import annotations

from adapters import basert, llamacpp, localai, ollama, openai, sglang, textgen, tgi, vllm
from adapters.base import Adapter

ADAPTERS: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in (
        openai.ADAPTER,
        vllm.ADAPTER,
        sglang.ADAPTER,
        tgi.ADAPTER,
        ollama.ADAPTER,
        llamacpp.ADAPTER,
        llamacpp.PYTHON,
        localai.ADAPTER,
        textgen.ADAPTER,
        basert.ADAPTER,
    )
}

__all__ = ["ADAPTERS", "Adapter"]
