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
RESPONSES = "responses"
RESPONSE = "response"  # GET /v1/responses/{id}
RESPONSE_CANCEL = "response_cancel"
RERANK = "rerank"
SCORE = "score"
TOKENIZE = "tokenize"
DETOKENIZE = "detokenize"
TRANSCRIPTIONS = "audio_transcriptions"
TRANSLATIONS = "audio_translations"
SPEECH = "audio_speech"
IMAGES = "images_generations"
MODERATIONS = "moderations"
LOAD_LORA = "load_lora_adapter"
UNLOAD_LORA = "unload_lora_adapter"

CORE_ROUTES = frozenset({MODELS, MODEL, CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS})
LORA_ROUTES = frozenset({LOAD_LORA, UNLOAD_LORA})
ALL_ROUTES = (
    CORE_ROUTES
    | LORA_ROUTES
    | {
        RESPONSES,
        RESPONSE,
        RESPONSE_CANCEL,
        RERANK,
        SCORE,
        TOKENIZE,
        DETOKENIZE,
        TRANSCRIPTIONS,
        TRANSLATIONS,
        SPEECH,
        IMAGES,
        MODERATIONS,
    }
)


class Readiness(Enum):
    READY = "ready"
    LOADING = "loading"
    FAILING = "failing"


@dataclass(frozen=True, slots=True)
class Adapter:
    """One kind of backend runtime.

    ``routes`` are the gateway routes it serves (others answer 501, except ``/v1/models/{id}``,
    which is answered from the model list). ``paths`` maps a route name to the runtime's own
    path where it differs from the gateway's; the query string is kept either way.
    ``health_path`` is probed by ``/ready``.
    """

    name: str
    routes: frozenset[str]
    paths: Mapping[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    health_fallback_path: str | None = None
    """Probed instead when ``health_path`` answers 404 (a server of the family without it)."""
    loading_statuses: frozenset[int] = frozenset({503})
    normalise: bool = True
    """Wrap errors that are not OpenAI-shaped, complete the model list, and answer
    ``/v1/models/{id}`` from the list when the runtime has no such route."""

    def serves(self, route: str) -> bool:
        return route in self.routes

    def readiness(self, status: int) -> Readiness:
        if 200 <= status < 300:
            return Readiness.READY
        if status in self.loading_statuses:
            return Readiness.LOADING
        return Readiness.FAILING
