"""Model management for operators (``/v1/models/load``, ``/v1/lora/load``, ... with admin
keys): which backend a request goes to, its body in the runtime's own shape, and, on a
backend with several replicas, every replica's answer."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from adapters.base import Rewrite, Route
from gateway.client import UpstreamError
from gateway.config.settings import Settings
from gateway.core.errors import NotFound, PermissionDenied
from gateway.core.jsonbody import JsonBody
from gateway.fleet.replicas import Group, Replica
from gateway.fleet.upstream import before_response_error
from gateway.routing.router import Router

MAX_NAME = 256


async def target_group(router: Router, parsed: JsonBody) -> Group:
    """The backend named by the body's ``backend`` field, else the one serving ``model``,
    else the default one (a model to load is in no list yet)."""
    named = parsed.get("backend")
    if named is not None:
        group = router.group(named) if isinstance(named, str) else None
        if group is None:
            raise NotFound(f"no backend named {str(named)[:MAX_NAME]!r}", code="backend_not_found")
        return group
    model = parsed.get("model")
    if isinstance(model, str):
        try:
            return (await router.catalogue.groups_for(model))[0]
        except NotFound:
            pass
    return router.default


def check_sources(group: Group, route: Route, parsed: JsonBody, allowed: bool) -> None:
    """PermissionDenied for a body naming a remote source the runtime would download from,
    unless the operator allows it (``--allow-remote-model-sources``)."""
    if allowed:
        return
    named = [name for name in group.backend.adapter.remote_sources.get(route, ()) if name in parsed]
    if named:
        raise PermissionDenied(
            f"{', '.join(named)} would make the {group.name} backend download from a remote source, "
            "which this gateway does not allow (--allow-remote-model-sources): name a model of its "
            "gallery instead",
            code="remote_source",
            param=named[0],
        )


def runtime_body(parsed: JsonBody, rewrite: Rewrite | None, raw: bytes) -> bytes:
    """The body in the runtime's shape, without the gateway's ``backend`` field: ``raw``, the
    client's own bytes, where the runtime takes the gateway's shape and no field is dropped.
    (An admin key's body, and small: the one the gateway decodes whole.)"""
    if rewrite is None and "backend" not in parsed:
        return raw
    document = orjson.loads(raw)
    fields = {name: value for name, value in document.items() if name != "backend"}
    shaped = rewrite(fields) if rewrite is not None else fields
    return b"" if shaped is None else orjson.dumps(shaped)


async def on_every_replica(
    group: Group,
    route: Route,
    target: str,
    forward: list[tuple[bytes, bytes]],
    parsed: JsonBody,
    raw: bytes,
    settings: Settings,
) -> tuple[int, bytes]:
    """The request on every replica at once (a model loaded on one replica of four would
    serve a quarter of its requests), each answer read whole within the read cap and the
    backend timeout. The status and body to answer: every replica's answer listed, 200 when
    all succeeded, else the first failure's status with an error saying how many failed."""
    backend = group.backend
    payload = runtime_body(parsed, backend.adapter.rewrites.get(route), raw)

    async def one(replica: Replica) -> dict[str, Any]:
        try:
            status, answer = await replica.upstream.fetch(
                "POST", target, settings.backend_timeout, body=payload, forward=forward
            )
        except UpstreamError as exc:
            error = before_response_error(exc, settings)
            return {"url": replica.url, "status": error.status, "body": orjson.loads(error.body())}
        try:
            shown: Any = orjson.loads(answer)
        except orjson.JSONDecodeError:
            shown = answer.decode("utf-8", "replace")
        return {"url": replica.url, "status": status, "body": shown}

    answers = await asyncio.gather(*(one(replica) for replica in group.replicas))
    failed = [answer for answer in answers if not 200 <= answer["status"] < 300]
    if not failed:
        return 200, orjson.dumps({"object": "list", "data": answers})
    message = f"{len(failed)} of {len(answers)} replicas of the {group.name} backend failed"
    error = {"type": "backend_error", "message": message, "code": "replicas_failed"}
    return failed[0]["status"], orjson.dumps({"error": error, "data": answers})
