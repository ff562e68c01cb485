"""The model catalogue: which backends serve a model, from their configuration or their own lists.

A backend's ``models`` and ``aliases`` say what it serves; without ``models``, its own
``/v1/models`` is read at start and refreshed (``follow``), and read again when a request
names a model no backend is known to serve (at most every ``LIST_RETRY`` seconds). One
read per backend at a time, whoever asks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

import orjson

from gateway.client import UpstreamError
from gateway.core.errors import NotFound
from gateway.fleet.replicas import Group

logger = logging.getLogger("gateway.catalogue")

LIST_REFRESH = 60.0
LIST_RETRY = 5.0


class Catalogue:
    def __init__(self, by_model: bool = True) -> None:
        self.by_model = by_model
        """Whether requests go by the model they name; not with one backend
        (``--backend-url``), where every model goes to it, listed or not."""
        self.groups: list[Group] = []
        self.default: Group | None = None
        self.on_models: Callable[[Iterable[str]], object] | None = None
        """Told every model name whenever a list is read (the metrics' model label)."""
        self._by_model: dict[str, list[Group]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._warned: set[tuple[str, str]] = set()

    def set_groups(self, groups: list[Group], default: Group) -> None:
        self.groups = groups
        self.default = default
        self.rebuild()

    def rebuild(self) -> None:
        """Which backends serve each model. A model several backends declare (``models`` or
        ``aliases``) is shared between them, on purpose; one a backend serves only by its own
        list goes to it only where no other backend serves it: a second runtime that lists a
        model would otherwise take a share of its prompts unasked (it is told in a warning)."""
        by_model: dict[str, list[Group]] = {}
        listed: list[Group] = []
        for group in self.groups:
            if group.models is None:
                listed.append(group)
                for name in group.aliases:
                    by_model.setdefault(name, []).append(group)
            else:
                for name in group.model_names():
                    by_model.setdefault(name, []).append(group)
        for group in listed:
            for name in group.model_names() - set(group.aliases):
                serving = by_model.get(name)
                if serving is None:
                    by_model[name] = [group]
                elif group not in serving:
                    self._overlap(name, group, serving[0])
        self._by_model = by_model

    def _overlap(self, model: str, group: Group, serving: Group) -> None:
        if (model, group.name) in self._warned:
            return
        self._warned.add((model, group.name))
        logger.warning(
            "the %s backend lists the model %r, which the %s backend serves: it gets none of its "
            "requests (list the model in both backends' models to share it)",
            group.name,
            model,
            serving.name,
        )

    async def groups_for(self, model: str | None) -> list[Group]:
        """The backends that serve ``model``; the default one for a request naming none."""
        assert self.default is not None
        if not self.by_model or model is None:
            return [self.default]
        groups = self._by_model.get(model)
        if groups is None and await self._refresh_stale():
            groups = self._by_model.get(model)
        if groups is None:
            raise NotFound(f"the model {model!r} does not exist", code="model_not_found", param="model")
        return groups

    async def check_listed(self, model: str | None) -> None:
        """NotFound unless a backend lists ``model`` (read again when not, as for routing):
        with one backend, what a key that may use only some models may name."""
        if model is not None and (
            model in self._by_model or (await self._refresh_stale() and model in self._by_model)
        ):
            return
        raise NotFound(
            f"the model {model!r} does not exist or this key may not use it",
            code="model_not_found",
            param="model",
        )

    async def _refresh_stale(self) -> bool:
        """Re-read the lists of backends not read lately; True if any was."""
        now = time.monotonic()
        stale = [
            group
            for group in self.groups
            if group.models is None and (group.listed_at is None or now - group.listed_at > LIST_RETRY)
        ]
        if not stale:
            return False
        await asyncio.gather(*(self.refresh(group) for group in stale))
        return True

    async def refresh(self, group: Group, fresh: bool = False) -> None:
        """Read ``group``'s model list (one read at a time, whoever asks); ``fresh``: a read
        begun after this call (a model was just loaded), not one already under way."""
        running = self._refreshing.get(group.name)
        if running is not None and fresh:
            await asyncio.shield(running)
            running = self._refreshing.get(group.name)
        if running is None:
            running = self._refreshing[group.name] = asyncio.ensure_future(self._read_list(group))
            running.add_done_callback(lambda _: self._refreshing.pop(group.name, None))
        await asyncio.shield(running)

    async def _read_list(self, group: Group) -> None:
        if not group.replicas:
            return  # none yet (discovery): asked again once one is there
        replicas = sorted(group.replicas, key=lambda r: not r.available())
        for replica in replicas:
            try:
                status, body = await replica.upstream.fetch("GET", "/v1/models", 10)
                data = orjson.loads(body) if status == 200 else None
            except (UpstreamError, orjson.JSONDecodeError):
                continue
            entries = data.get("data") if isinstance(data, dict) else None
            if isinstance(entries, list):
                group.listed = [e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]
                group.listed_at = time.monotonic()
                self.rebuild()
                if self.on_models is not None:
                    self.on_models(self._by_model)
                return
        group.listed_at = time.monotonic()  # failed too: not asked again for LIST_RETRY seconds

    def all_models(self) -> list[dict[str, object]]:
        """The union of every backend's models and aliases, each name once, for GET /v1/models."""
        seen: set[str] = set()
        entries: list[dict[str, object]] = []
        for group in self.groups:
            listed = {str(entry["id"]): entry for entry in group.listed}
            names = sorted(group.models) if group.models is not None else list(listed)
            for name in [*names, *sorted(group.aliases)]:
                if name in seen:
                    continue
                seen.add(name)
                entry = listed.get(group.backend_model(name))
                if entry is None:
                    entry = {"id": name, "object": "model", "created": 0, "owned_by": group.name}
                else:
                    entry = {**entry, "id": name}
                entries.append(entry)
        return entries

    async def follow(self) -> None:
        """Keep every backend's model list fresh, for routing and for the metrics' labels."""
        while True:
            await asyncio.gather(*(self.refresh(group) for group in self.groups if group.models is None))
            missing = any(group.models is None and not group.listed for group in self.groups)
            await asyncio.sleep(LIST_RETRY if missing else LIST_REFRESH)

    def cancel(self) -> None:
        for task in self._refreshing.values():
            task.cancel()
