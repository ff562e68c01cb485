"""What the data path checks of a request before it goes anywhere: the models a key may use,
work whose tokens the gateway cannot count, paths a backend would normalise."""

from __future__ import annotations

from typing import Any

from adapters.base import Route
from gateway.core.errors import InvalidRequest, NotFound, PermissionDenied
from gateway.core.exchange import Exchange
from gateway.core.jsonbody import JsonBody
from gateway.fleet.replicas import Group

MAX_MODEL_NAME = 256


def check_allowed(exchange: Exchange, model: Any) -> None:
    """NotFound for a model the key may not use, as for one that does not exist: a key is
    not told which models others may use."""
    key = exchange.restricted
    if key is None:
        return
    if exchange.route == Route.BATCH_CREATE:
        # A batch's lines name their models in a file the gateway does not read.
        raise PermissionDenied("this key may use only some models, so it may not create batches")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "this key may use only some models: name one in 'model'", code="missing_model", param="model"
        )
    if not key.may_use(model):
        raise NotFound(
            f"the model {model[:MAX_MODEL_NAME]!r} does not exist or this key may not use it",
            code="model_not_found",
            param="model",
        )


def stores_files(groups: list[Group]) -> bool:
    """Whether a runtime of these stores files, so that a prompt may name one of them."""
    return any(group.backend.adapter.serves(Route.FILE_UPLOAD) for group in groups)


def check_accountable(route: Route, body: JsonBody) -> None:
    """PermissionDenied for work whose tokens the gateway never sees, asked for by a key
    with a token limit: a batch (generated from a file, answered into another) and a
    background response (generated after the answer)."""
    if route == Route.BATCH_CREATE:
        raise PermissionDenied(
            "this key has a token limit, and a batch's tokens are generated out of the gateway's "
            "sight: it may not create batches",
            code="tokens_unaccountable",
        )
    if route == Route.RESPONSES and body.get("background") is True:
        raise PermissionDenied(
            "this key has a token limit, and a background response's tokens are generated out of "
            "the gateway's sight: send it without 'background'",
            code="tokens_unaccountable",
            param="background",
        )


def has_dot_segment(path: str) -> bool:
    # A backend that normalises "/v1/models/../../admin" would serve a route never listed.
    return any(segment in {".", ".."} for segment in path.split("/"))
