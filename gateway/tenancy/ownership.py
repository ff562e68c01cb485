"""Stored objects belong to the key that made them: files, batches, stored responses.

A runtime sees one client, the gateway, so it would show every key's objects to every other
key. With more than one client key the gateway makes ownership its own business:

- IDs it hands out are sealed: the runtime's ID, a dot and a tag, an HMAC over the owning
  key's name and the ID with the server secret (``--object-secret``, the same on every
  gateway replica). An ID coming in is unsealed against the key presenting it; one that is
  not that key's, or not sealed at all, is 404 ``not_found`` and never reaches the runtime.
  No database: any replica with the secret checks any ID.
- Lists show only the key's own objects, from records of who made what: kept in the
  rate-limit storage's Redis when there is one (shared by the replicas), else in the
  process.

The OpenAI SDKs treat IDs as opaque strings, so they work unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import orjson
from redis.exceptions import RedisError

from adapters import base as r
from adapters.base import Route
from gateway.core.errors import InvalidRequest, NotFound
from gateway.core.jsonbody import JsonBody

logger = logging.getLogger("gateway.ownership")

FILE = "file"
BATCH = "batch"
RESPONSE = "response"
KINDS = {FILE: "file", BATCH: "batch", RESPONSE: "response"}
# Fields that hold an ID, by the kind of object they name.
FIELDS = {
    FILE: {"id": FILE},
    BATCH: {"id": BATCH, "input_file_id": FILE, "output_file_id": FILE, "error_file_id": FILE},
    RESPONSE: {"id": RESPONSE, "previous_response_id": RESPONSE},
}
# The routes that name objects, and the kind of object each one names.
ROUTE_KINDS = {
    **dict.fromkeys(r.FILE_ROUTES, FILE),
    **dict.fromkeys(r.BATCH_ROUTES, BATCH),
    **dict.fromkeys((Route.RESPONSES, Route.RESPONSE, Route.RESPONSE_CANCEL), RESPONSE),
}
LISTS = frozenset({Route.FILE_LIST, Route.BATCH_LIST})
LISTED_KINDS = frozenset({FILE, BATCH})
PATH_PARAMS = {"file_id": FILE, "batch_id": BATCH, "response_id": RESPONSE}
BODY_FIELDS = {
    Route.BATCH_CREATE: ("input_file_id", FILE),
    Route.RESPONSES: ("previous_response_id", RESPONSE),
}
REDIS_FAILURES = (RedisError, OSError, TimeoutError)
TAG_BYTES = 16
SEALED = re.compile(r"(.+)\.([A-Za-z0-9_-]{22})", re.DOTALL)
RECORD_DAYS = 400
"""How long a record of who made an object is kept (files live until deleted)."""
MAX_ID = 512
STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
FILE_ID_KEY = re.compile(rb'"file_id"\s*:\s*')
LETTER_ESCAPE = re.compile(rb"\\u00(?:6[69cC54]|5[fF])")
"""A letter of ``file_id`` written as an escape (``\\u0066``): how the key could hide."""
MAX_FILE_REFS = 64
"""Files one request may name (each is checked)."""


class Owners:
    """Seals and unseals IDs, and keeps records of who made what."""

    def __init__(self, secret: bytes, records: Records) -> None:
        self.secret = secret
        self.records = records

    def tag(self, owner: str, kind: str, raw: str) -> str:
        message = b"\0".join((owner.encode(), kind.encode(), raw.encode()))
        digest = hmac.digest(self.secret, message, hashlib.sha256)[:TAG_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def seal(self, owner: str, kind: str, raw: str) -> str:
        return f"{raw}.{self.tag(owner, kind, raw)}"

    def unseal(self, owner: str, kind: str, sealed: Any) -> str:
        """The runtime's ID behind ``sealed``; NotFound unless ``owner`` made it."""
        if isinstance(sealed, str) and len(sealed) <= MAX_ID and (found := SEALED.fullmatch(sealed)):
            raw, tag = found.groups()
            if hmac.compare_digest(tag, self.tag(owner, kind, raw)):
                return raw
        shown = str(sealed)[:64]
        raise NotFound(f"no {KINDS[kind]} {shown!r}", code=f"{KINDS[kind]}_not_found", param=None)

    def inbound(
        self,
        owner: str,
        route: Route,
        template: str,
        params: dict[str, str],
        query: bytes,
        parsed: JsonBody | None,
    ) -> tuple[str | None, bytes, dict[str, str]]:
        """A request's IDs as the runtime knows them, NotFound for any the owner did not make:
        the path with them (None: the path names none), the query (a list's ``after``), and
        the body's fields to change (a batch's input file, a response's previous one)."""
        path = None
        named = {name: value for name, value in params.items() if name in PATH_PARAMS}
        if named:
            raws = {
                name: quote(self.unseal(owner, PATH_PARAMS[name], value), safe="")
                for name, value in named.items()
            }
            path = template.format(**raws)
        if route in LISTS and query:
            # Read as the runtime reads it: "%61fter" is "after" too.
            kind = ROUTE_KINDS[route]
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
            unsealed = [(k, self.unseal(owner, kind, v) if k == "after" else v) for k, v in pairs]
            query = urlencode(unsealed).encode("latin-1")
        changes = {}
        field = BODY_FIELDS.get(route)
        if field is not None and parsed is not None and parsed.get(field[0]) is not None:
            changes[field[0]] = self.unseal(owner, field[1], parsed.get(field[0]))
        return path, query, changes

    def unseal_file_refs(self, owner: str, body: bytes) -> bytes | None:
        """``body`` with every file it names by ``file_id`` (a chat's file part, a Responses
        ``input_file``, an Anthropic document's source) as the runtime knows it; None when it
        names none; NotFound for a file the owner did not make.

        Found on the bytes, at the cost of a search: a quote inside a string is escaped, so
        ``"file_id":`` matches only a key. The key could hide only behind an escaped letter
        (``"fil\\u0065_id"``), which no JSON encoder writes: such a body is refused."""
        if b"\\u00" in body and _escapes_a_letter(body):
            raise InvalidRequest(
                "the body writes an ASCII letter as an escape (\\u00..): send letters as they are",
                code="invalid_json",
            )
        named = body.count(b'"file_id"')
        if not named:
            return None
        if named > MAX_FILE_REFS:
            raise InvalidRequest(f"a request may name at most {MAX_FILE_REFS} files", code="too_many_files")
        pieces: list[bytes] = []
        at = 0
        for match in FILE_ID_KEY.finditer(body):
            value = STRING.match(body, match.end())
            if value is None:
                continue  # not a string (a schema's property, null): not a file's ID
            raw = self.unseal(owner, FILE, orjson.loads(value.group()))
            pieces += (body[at : value.start()], orjson.dumps(raw))
            at = value.end()
        if not pieces:
            return None
        pieces.append(body[at:])
        return b"".join(pieces)

    def seal_object(self, owner: str, kind: str, obj: Any) -> list[tuple[str, str]]:
        """Seal the ID fields of one object in place; the (kind, raw ID) pairs it names."""
        named: list[tuple[str, str]] = []
        if not isinstance(obj, dict):
            return named
        for name, of in FIELDS[kind].items():
            raw = obj.get(name)
            if isinstance(raw, str) and raw:
                obj[name] = self.seal(owner, of, raw)
                named.append((of, raw))
        return named

    async def answer(self, owner: str, route: Route, body: bytes) -> bytes:
        """A runtime's answer with the owner's IDs sealed, and a list cut to the owner's
        objects; what it names is recorded as the owner's (a deleted file no longer)."""
        kind = ROUTE_KINDS[route]
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        if route == Route.FILE_DELETE and isinstance(document, dict) and isinstance(document.get("id"), str):
            await self.records.remove(owner, FILE, document["id"])
            self.seal_object(owner, kind, document)
            return orjson.dumps(document)
        if route in LISTS and isinstance(document, dict) and isinstance(document.get("data"), list):
            mine = await self.records.owned(owner, kind)
            kept = [e for e in document["data"] if isinstance(e, dict) and e.get("id") in mine]
            for entry in kept:
                self.seal_object(owner, kind, entry)
            document["data"] = kept
            for end in ("first_id", "last_id"):
                if end in document:
                    document[end] = kept[0 if end == "first_id" else -1]["id"] if kept else None
            return orjson.dumps(document)
        named = self.seal_object(owner, kind, document)
        # Only what can be listed is recorded: there is no list of stored responses.
        await self.records.add(owner, [(of, raw) for of, raw in named if of in LISTED_KINDS])
        return orjson.dumps(document)


def _escapes_a_letter(body: bytes) -> bool:
    """Whether ``body`` writes a letter of ``file_id`` as an escape, not as text that reads
    ``\\u0066`` (an escaped backslash before it). Past a few such places, or behind a long run
    of backslashes, it is taken to: the work stays bounded whatever the body."""
    for count, match in enumerate(LETTER_ESCAPE.finditer(body)):
        before = body[max(match.start() - 64, 0) : match.start()]
        run = len(before) - len(before.rstrip(b"\\"))  # an even run: its backslash is an escape's
        if count >= MAX_FILE_REFS or run >= 64 or run % 2 == 0:
            return True
    return False


class StreamSealer:
    """Seals a Responses stream's IDs as it passes: the response's own, learnt from the first
    event that carries it, and the previous response's. An event is never cut in two, so
    an ID is never split across what is sent; a partial event waits for the rest (up to
    ``limit`` bytes)."""

    def __init__(self, owners: Owners, owner: str, previous: str | None, limit: int) -> None:
        self.owners = owners
        self.owner = owner
        self.limit = limit
        self.pending = b""
        self.found = False
        self.replace: dict[bytes, bytes] = {}
        if previous is not None:
            self._learn(previous)

    def _learn(self, raw: str) -> None:
        sealed = self.owners.seal(self.owner, RESPONSE, raw)
        self.replace[orjson.dumps(raw)] = orjson.dumps(sealed)

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk
        cut = max(data.rfind(b"\n\n") + 2, data.rfind(b"\r\n\r\n") + 4)
        if cut < 2:
            if len(data) <= self.limit:
                self.pending = data
                return b""
            cut = len(data)
        self.pending = data[cut:]
        return self._edit(data[:cut])

    def flush(self) -> bytes:
        data, self.pending = self.pending, b""
        return self._edit(data)

    def _edit(self, events: bytes) -> bytes:
        if not self.found:
            for line in events.splitlines():
                if not line.startswith(b"data:"):
                    continue
                try:
                    event = orjson.loads(line[5:])
                except orjson.JSONDecodeError:
                    continue
                response = event.get("response") if isinstance(event, dict) else None
                if isinstance(response, dict) and isinstance(response.get("id"), str):
                    self._learn(response["id"])
                    self.found = True
                    break
        for raw, sealed in self.replace.items():
            events = events.replace(raw, sealed)
        return events


class Records:
    """Who made which object, for lists. In the process."""

    def __init__(self) -> None:
        self._owned: dict[tuple[str, str], dict[str, None]] = {}

    async def add(self, owner: str, named: Iterable[tuple[str, str]]) -> None:
        for kind, raw in named:
            self._owned.setdefault((owner, kind), {})[raw] = None

    async def remove(self, owner: str, kind: str, raw: str) -> None:
        self._owned.get((owner, kind), {}).pop(raw, None)

    async def owned(self, owner: str, kind: str) -> set[str]:
        return set(self._owned.get((owner, kind), ()))

    async def close(self) -> None:
        pass


class RedisRecords(Records):
    """Who made which object, in Redis (a set per key and kind), shared by every replica.

    When Redis fails a list shows nothing of the key's (never another key's), and it is logged.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        from redis import asyncio as redis

        self.client = redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._last_failure_log = 0.0

    @staticmethod
    def _key(owner: str, kind: str) -> str:
        return f"gateway:objects:{kind}:{owner}"

    async def add(self, owner: str, named: Iterable[tuple[str, str]]) -> None:
        by_kind: dict[str, list[str]] = {}
        for kind, raw in named:
            by_kind.setdefault(kind, []).append(raw)
        if not by_kind:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for kind, raws in by_kind.items():
                    pipe.sadd(self._key(owner, kind), *raws)
                    pipe.expire(self._key(owner, kind), RECORD_DAYS * 86400)
                await pipe.execute()
        except REDIS_FAILURES as exc:
            self._failed(exc)

    async def remove(self, owner: str, kind: str, raw: str) -> None:
        try:
            await self.client.srem(self._key(owner, kind), raw)
        except REDIS_FAILURES as exc:
            self._failed(exc)

    async def owned(self, owner: str, kind: str) -> set[str]:
        try:
            members = await self.client.smembers(self._key(owner, kind))
        except REDIS_FAILURES as exc:
            self._failed(exc)
            return set()
        return {member.decode() if isinstance(member, bytes) else str(member) for member in members}

    async def close(self) -> None:
        await self.client.aclose()

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_failure_log > 10:
            self._last_failure_log = now
            logger.error("object records: Redis failed (%s): %s", type(exc).__name__, exc)


def records_for(storage_uri: str) -> Records:
    if storage_uri.startswith(("redis://", "rediss://")):
        return RedisRecords(storage_uri)
    return Records()
