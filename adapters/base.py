"""What the gateway knows about a backend runtime: the routes it serves and how it says it is ready.

An adapter is data plus small pure functions. It imports nothing from the gateway's app or
proxy, so a runtime's quirks live in one file each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any


class Route(StrEnum):
    """Route names: the gateway's vocabulary for what a client may ask of a backend."""

    MODELS = "models"
    MODEL = "model"
    CHAT_COMPLETIONS = "chat_completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    RESPONSE = "response"  # GET /v1/responses/{id}
    RESPONSE_CANCEL = "response_cancel"
    # Anthropic's Messages API, which some runtimes serve beside OpenAI's.
    MESSAGES = "messages"
    COUNT_TOKENS = "messages_count_tokens"
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
    # Files and batches.
    FILE_UPLOAD = "file_upload"  # POST /v1/files (multipart)
    FILE_LIST = "file_list"
    FILE = "file"  # GET /v1/files/{id}
    FILE_DELETE = "file_delete"
    FILE_CONTENT = "file_content"
    BATCH_CREATE = "batch_create"
    BATCH_LIST = "batch_list"
    BATCH = "batch"  # GET /v1/batches/{id}
    BATCH_CANCEL = "batch_cancel"
    # The operators' model management (admin keys), mapped to each runtime's own way.
    MODEL_LOAD = "model_load"
    MODEL_UNLOAD = "model_unload"
    LORA_LOAD = "lora_load"
    LORA_UNLOAD = "lora_unload"
    # text-generation-webui's own routes (/v1/internal/...).
    INTERNAL_ENCODE = "internal_encode"
    INTERNAL_DECODE = "internal_decode"
    INTERNAL_TOKEN_COUNT = "internal_token_count"
    INTERNAL_LOGITS = "internal_logits"
    INTERNAL_CHAT_PROMPT = "internal_chat_prompt"
    INTERNAL_STOP = "internal_stop_generation"
    INTERNAL_MODEL_INFO = "internal_model_info"
    INTERNAL_MODEL_LIST = "internal_model_list"
    INTERNAL_MODEL_LOAD = "internal_model_load"
    INTERNAL_MODEL_UNLOAD = "internal_model_unload"
    INTERNAL_LORA_LIST = "internal_lora_list"
    INTERNAL_LORA_LOAD = "internal_lora_load"
    INTERNAL_LORA_UNLOAD = "internal_lora_unload"


CORE_ROUTES = frozenset(
    {Route.MODELS, Route.MODEL, Route.CHAT_COMPLETIONS, Route.COMPLETIONS, Route.EMBEDDINGS}
)
ANTHROPIC_ROUTES = frozenset({Route.MESSAGES, Route.COUNT_TOKENS})
"""Their errors go in Anthropic's envelope, which Anthropic's SDKs read."""
LORA_ROUTES = frozenset({Route.LOAD_LORA, Route.UNLOAD_LORA})
FILE_ROUTES = frozenset(
    {Route.FILE_UPLOAD, Route.FILE_LIST, Route.FILE, Route.FILE_DELETE, Route.FILE_CONTENT}
)
BATCH_ROUTES = frozenset({Route.BATCH_CREATE, Route.BATCH_LIST, Route.BATCH, Route.BATCH_CANCEL})
MANAGEMENT_ROUTES = frozenset({Route.MODEL_LOAD, Route.MODEL_UNLOAD, Route.LORA_LOAD, Route.LORA_UNLOAD})
TEXTGEN_ROUTES = frozenset(
    {
        Route.INTERNAL_ENCODE,
        Route.INTERNAL_DECODE,
        Route.INTERNAL_TOKEN_COUNT,
        Route.INTERNAL_LOGITS,
        Route.INTERNAL_CHAT_PROMPT,
        Route.INTERNAL_STOP,
        Route.INTERNAL_MODEL_INFO,
        Route.INTERNAL_MODEL_LIST,
        Route.INTERNAL_MODEL_LOAD,
        Route.INTERNAL_MODEL_UNLOAD,
        Route.INTERNAL_LORA_LIST,
        Route.INTERNAL_LORA_LOAD,
        Route.INTERNAL_LORA_UNLOAD,
    }
)
ALL_ROUTES = (
    CORE_ROUTES
    | LORA_ROUTES
    | FILE_ROUTES
    | BATCH_ROUTES
    | MANAGEMENT_ROUTES
    | ANTHROPIC_ROUTES
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
        Route.SPEECH,
        Route.IMAGES,
        Route.MODERATIONS,
    }
)


Rewrite = Callable[[dict[str, Any]], "dict[str, Any] | None"]
"""A request body in the gateway's shape to the runtime's (``None``: the runtime takes none)."""


@dataclass(frozen=True, slots=True)
class LoadSignals:
    """Where a runtime's ``metrics_path`` says how loaded it is, for ``strategy: queue``.

    Each field lists metric names, the current one first and older spellings after it (the
    first one present in a scrape is read). Values are summed over label sets (several
    models or engines on one server), except the KV-cache use, whose largest value counts.
    """

    waiting: tuple[str, ...]
    """Requests queued, not yet running."""
    running: tuple[str, ...]
    """Requests in the running batch."""
    kv_use: tuple[str, ...] = ()
    """The share of the KV cache in use, 0 to 1."""

    @property
    def names(self) -> frozenset[str]:
        return frozenset((*self.waiting, *self.running, *self.kv_use))


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
    ``health_path`` is probed by ``/ready``. ``rewrites`` turn a JSON body in the gateway's
    shape into the runtime's for routes the runtime spells its own way (model management).
    """

    name: str
    routes: frozenset[str]
    paths: Mapping[str, str] = field(default_factory=dict)
    rewrites: Mapping[str, Rewrite] = field(default_factory=dict)
    metrics_path: str | None = None
    """The runtime's own Prometheus metrics, shown to operators through the gateway."""
    load_signals: LoadSignals | None = None
    """The metrics that ``strategy: queue`` reads; None: it balances by in-flight counts."""
    health_path: str = "/health"
    health_fallback_path: str | None = None
    """Probed instead when ``health_path`` answers 404 (a server of the family without it)."""
    loading_statuses: frozenset[int] = frozenset({503})
    normalise: bool = True
    """Complete the model list, and answer ``/v1/models/{id}`` from the list when the
    runtime has no such route. (Errors are put in the gateway's envelope for every runtime.)"""
    remote_sources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Fields of a route's body that make the runtime download from where they say (a URL
    to install a model from), by route: refused unless the operator allows it."""
    limit_fields: tuple[str, ...] = ()
    """Fields of its own the runtime reads as a request's output limit, beside OpenAI's
    (every one counts in a token reservation)."""
    fills_context: tuple[str, ...] = ()
    """Flags with which the runtime generates until the context is full."""
    unregistered: Mapping[str, str] = field(default_factory=dict)
    """Why the runtime may not have registered a route it can serve (it registers some per
    model or per flag): said in the 501 answered when it has not."""

    def serves(self, route: Route) -> bool:
        return route in self.routes

    def answers(self, route: Route) -> bool:
        """Whether the gateway answers ``route`` for this runtime: it serves it, or it is
        ``/v1/models/{id}``, answered from the model list."""
        return route in self.routes or (route == Route.MODEL and self.normalise)

    def readiness(self, status: int) -> Readiness:
        if 200 <= status < 300:
            return Readiness.READY
        if status in self.loading_statuses:
            return Readiness.LOADING
        return Readiness.FAILING
