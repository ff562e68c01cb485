"""Any OpenAI-compatible server: every route is forwarded and the backend answers for itself.

That is how servers the gateway has no adapter for are fronted (text-generation-webui,
agent servers, hosted APIs): their answers, errors included, pass through untouched.
"""

from __future__ import annotations

from adapters.base import ALL_ROUTES, Adapter

# /v1/models is the one route every OpenAI-compatible server has, hosted APIs included.
ADAPTER = Adapter(
    name="openai",
    routes=ALL_ROUTES,
    health_path="/v1/models",
    loading_statuses=frozenset(),
    normalise=False,
)
