"""What the gateway knows about a backend runtime: the routes it serves and how it says it is ready.

An adapter is data plus small pure functions. It imports nothing from the gateway's app or
proxy, so a runtime's quirks live in one file each.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

# Route names: the gateway's vocabulary for what a client may ask of a backend.
MODELS = "models"
MODEL = "model"
CHAT_COMPLETIONS = "chat_completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"

ALL_ROUTES = frozenset({MODELS, MODEL, CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS})


class Readiness(Enum):
    READY = "ready"
    LOADING = "loading"
    FAILING = "failing"


@dataclass(frozen=True, slots=True)
class Adapter:
    """One kind of backend runtime.

    ``paths`` maps a route name to the runtime's own path where it differs from the
    gateway's; the query string is kept either way. ``health_path`` is probed by ``/ready``.
    """

    name: str
    routes: frozenset[str]
    paths: Mapping[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    loading_statuses: frozenset[int] = frozenset({503})

    def serves(self, route: str) -> bool:
        return route in self.routes

    def readiness(self, status: int) -> Readiness:
        if 200 <= status < 300:
            return Readiness.READY
        if status in self.loading_statuses:
            return Readiness.LOADING
        return Readiness.FAILING
