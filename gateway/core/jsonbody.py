"""A JSON request body: the bytes the client sent, and the few top-level fields the gateway reads.

A general decoder builds every value of a document: ``{"pad": [[], [], ...]}`` costs about
thirty times its size in objects and holds the event loop while they are made. The gateway
reads a handful of top-level fields (the model, the output limits, ``n``, ``stream``, the
leading messages for affinity, object IDs), so one msgspec struct names them: the decoder
checks the whole document's syntax but makes no object of anything else, and keeps each
field it names as a view of its bytes (``msgspec.Raw``). A scalar is decoded when asked for;
an array or object stays bytes for what needs it (``leading_messages``, ``prompt_count``).
What a body costs is its bytes, whatever its shape.

A field is changed (an alias renamed, a sealed ID unsealed) by splicing its new value into
the bytes at its one top-level place, checked by decoding the result again; a body where
that place cannot be told for certain is decoded whole only while it is small.
"""

from __future__ import annotations

import codecs
import re
from typing import Any

import msgspec
import orjson
from msgspec import Raw

from gateway.core.errors import InvalidRequest

ABSENT = Raw(b"")
READ = (
    "model",
    "backend",
    "stream",
    "background",
    "n",
    "best_of",
    "prompt",
    "messages",
    "input",
    "prompt_cache_key",
    "user",
    "previous_response_id",
    "input_file_id",
    "lora_name",
    # Where a runtime would download a model from (adapters' remote_sources).
    "url",
    "config_url",
    "files",
    # Output limits, as each runtime reads them (gateway.tenancy.reserve says which).
    "max_completion_tokens",
    "max_tokens",
    "max_output_tokens",
    "max_new_tokens",
    "n_predict",
    "auto_max_new_tokens",
    # Sampling parameters a trace records (gateway.observability.tracing).
    "temperature",
    "top_p",
)
"""The top-level fields the gateway reads; every other is skipped unbuilt."""

Fields = msgspec.defstruct("Fields", [(name, Raw, ABSENT) for name in READ], gc=False)
_DECODE = msgspec.json.Decoder(Fields).decode
_SCALAR = msgspec.json.Decoder(str | int | float | bool | None).decode
"""Decodes a scalar; refuses a container at its first byte, building nothing."""
WHOLE_DECODE_BYTES = 1 << 20
"""A body whose field cannot be spliced in place is decoded whole only up to this size."""
UTF8_CHUNK = 1 << 20


class JsonBody:
    """A JSON object's bytes and its read fields, each decoded only when asked for."""

    __slots__ = ("_fields", "raw")

    def __init__(self, raw: bytes) -> None:
        """Raises InvalidRequest unless ``raw`` is one JSON object in UTF-8."""
        try:
            fields = _DECODE(raw)
        except msgspec.ValidationError:
            raise InvalidRequest("request body must be a JSON object", code="invalid_json") from None
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not raw.isascii():
            _check_utf8(raw)  # skipped strings are not decoded, so not checked by the decoder
        self.raw = raw
        self._fields = fields

    def __contains__(self, name: str) -> bool:
        return len(getattr(self._fields, name)) != 0

    def field(self, name: str) -> Raw:
        """The field's bytes as sent (empty when it is absent)."""
        raw: Raw = getattr(self._fields, name)
        return raw

    def get(self, name: str, default: Any = None) -> Any:
        """The field's value when it is a scalar (string, number, boolean, null), its bytes
        (``Raw``) when it is an array or object, ``default`` when absent."""
        raw: Raw = getattr(self._fields, name)
        if not raw:
            return default
        try:
            return _SCALAR(raw)
        except msgspec.ValidationError:
            return raw

    def replaced(self, changes: dict[str, str]) -> bytes:
        """The body with these top-level string fields set to new values."""
        raw = self.raw
        for name, value in changes.items():
            raw = _splice(raw, name, value)
        return raw


def _splice(body: bytes, name: str, value: str) -> bytes:
    old = bytes(getattr(_DECODE(body), name))
    if old:
        pattern = re.compile(b'"' + re.escape(name.encode()) + rb'"\s*:\s*' + re.escape(old))
        ends = [match.end() for _, match in zip(range(2), pattern.finditer(body), strict=False)]
        if len(ends) == 1:
            end = ends[0]
            new = msgspec.json.encode(value)
            spliced = body[: end - len(old)] + new + body[end:]
            # Its one place was the top level's only if the top level now reads the new value.
            if bytes(getattr(_DECODE(spliced), name)) == new:
                return spliced
    if len(body) > WHOLE_DECODE_BYTES:
        raise InvalidRequest(
            f"the field {name!r} must appear once, at the top level, written plainly",
            code="invalid_json",
            param=name,
        )
    document = orjson.loads(body)
    document[name] = value
    return orjson.dumps(document)


def _check_utf8(raw: bytes) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(raw)
    try:
        for start in range(0, len(view), UTF8_CHUNK):
            decoder.decode(view[start : start + UTF8_CHUNK])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"request body is not valid JSON: it is not UTF-8 ({exc.reason})", code="invalid_json"
        ) from None


LEADING = 16
"""At most this many leading messages are looked at for the first user message."""
Leading = msgspec.defstruct(
    "Leading", [(f"m{i}", Raw, ABSENT) for i in range(LEADING)], array_like=True, gc=False
)


class Role(msgspec.Struct, gc=False):
    role: Raw = ABSENT


_LEADING = msgspec.json.Decoder(Leading).decode
_ROLE = msgspec.json.Decoder(Role).decode
USER = b'"user"'


def leading_messages(messages: Raw) -> list[memoryview]:
    """The bytes of a messages array's first elements, up to and with the first user message:
    the part of a conversation that stays the same from one turn to the next. Elements past
    ``LEADING`` are skipped unbuilt."""
    leading: msgspec.Struct = _LEADING(messages)
    views: list[memoryview] = []
    for name in leading.__struct_fields__:
        element: Raw = getattr(leading, name)
        if not element or memoryview(element)[0] != ord("{"):
            break
        views.append(memoryview(element))
        if bytes(_ROLE(element).role) == USER:
            break
    return views


def first_element(array: Raw) -> memoryview:
    """The bytes of an array's first element (empty for an empty array), the rest skipped."""
    first: Raw = getattr(_LEADING(array), "m0")  # noqa: B009 (a struct made at run time)
    return memoryview(first)


STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)


def prompt_count(prompt: Raw) -> int:
    """How many prompts a completions ``prompt`` holds: a string or a list of token IDs is one;
    a list of strings or of token lists, one each. Counted on the bytes, building nothing."""
    view = memoryview(prompt)
    if not view or view[0] != ord("["):
        return 1
    stripped, strings = STRING.subn(b"", view)
    inner_lists = stripped.count(b"[") - 1
    return max(strings + inner_lists, 1)
