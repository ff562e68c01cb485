"""llama.cpp: its C++ ``llama-server``, and llama-cpp-python's server.

``llama-server`` serves the OpenAI routes under /v1 (no ``/v1/models/{id}``), ``/tokenize``
and ``/detokenize`` at the root, ``/v1/rerank`` with ``--reranking`` and embeddings with
``--embeddings`` (else 501 ``not_supported_error``), and Anthropic's ``/v1/messages`` and
``/v1/messages/count_tokens``. While the model loads
every route, ``/health`` included, answers 503 ``unavailable_error`` "Loading model". Its
``/slots`` (which saves and restores files) is never reachable.

llama-cpp-python's server (``python -m llama_cpp.server``, FastAPI, the gateway's embedded
backend) has the same OpenAI paths but tokenizes under ``/extras/``, has no ``/health``
and listens only once the model is loaded.
"""

from __future__ import annotations

from adapters import base as r
from adapters.base import Adapter, LoadSignals, Route

ADAPTER = Adapter(
    name="llamacpp",
    routes=r.CORE_ROUTES - {Route.MODEL}
    | r.ANTHROPIC_ROUTES
    | {Route.RESPONSES, Route.RERANK, Route.TOKENIZE, Route.DETOKENIZE, Route.TRANSCRIPTIONS},
    paths={Route.TOKENIZE: "/tokenize", Route.DETOKENIZE: "/detokenize"},
    health_path="/health",
    health_fallback_path="/v1/models",
    metrics_path="/metrics",
    load_signals=LoadSignals(
        waiting=("llamacpp:requests_deferred",),
        running=("llamacpp:requests_processing",),
        kv_use=("llamacpp:kv_cache_usage_ratio",),  # older releases only
    ),
    # n_predict wins over max_tokens where both are sent; -1 runs until the context is full.
    limit_fields=("n_predict",),
)

PYTHON = Adapter(
    name="llamacpp-python",
    routes=r.CORE_ROUTES - {Route.MODEL} | {Route.TOKENIZE, Route.DETOKENIZE},
    paths={Route.TOKENIZE: "/extras/tokenize", Route.DETOKENIZE: "/extras/detokenize"},
    # Its /v1/models waits behind the generation under way (the model's lock): a probe of it
    # during a long generation gets no answer in time, and a busy replica would be ejected.
    # The API docs page is answered by the event loop at once; the server listens only once
    # its model is loaded.
    health_path="/docs",
    health_fallback_path="/v1/models",
    loading_statuses=frozenset(),
)
