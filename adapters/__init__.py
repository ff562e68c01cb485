"""Backend runtimes the gateway can front, by the name ``--backend`` takes."""

from __future__ import annotations

from adapters import openai
from adapters.base import Adapter

ADAPTERS: dict[str, Adapter] = {adapter.name: adapter for adapter in (openai.ADAPTER,)}

__all__ = ["ADAPTERS", "Adapter"]
