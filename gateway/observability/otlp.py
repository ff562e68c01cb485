"""Finished requests turned into OTLP spans and sent in batches.

A sampled request leaves its ``Exchange`` (its ``RequestTrace`` inside); when the event loop's
turn ends, its two spans are written as OTLP protobuf bytes, and a thread of their own sends
them in batches through the OpenTelemetry SDK's own OTLP exporter transport (endpoint,
headers, compression, TLS, timeout and retries as the SDK reads them). The bytes are the
``ExportTraceServiceRequest`` of ``opentelemetry-proto`` (its field numbers are read from that
package's descriptors; the resource and the scope are its messages, serialized once), written
field by field: building that package's message objects cost about 100 µs a request, more
than the rest of the request, and the SDK's span objects more still; written here, about
8 µs. Attributes that repeat (a route, a model, a replica) are encoded once per set of
values, and of those that vary (IDs, counts, times) all but the values once per key.
Queued and sent by ``gateway.observability.export``.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterable, Sequence

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, SpanFlags, Status

from gateway.core.exchange import Exchange, Outcome
from gateway.core.tracecontext import RequestTrace, address

logger = logging.getLogger("gateway.tracing")

Attributes = Sequence[tuple[str, object]]

SERVER = Span.SpanKind.SPAN_KIND_SERVER
CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
ERROR = Status.StatusCode.STATUS_CODE_ERROR
HAS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
# Read from a copy of the answer's first and last bytes. JSON escapes a quote inside a
# string, so text a model wrote never matches a key.
RESPONSE_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
RESPONSE_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,256})"')
FINISH_REASON = re.compile(rb'"(?:finish_reason|stop_reason)"\s*:\s*"([^"\\]{1,64})"')
MAX_CACHED = 4096
"""Encoded attributes kept for reuse (a cache that grows past it starts again)."""


# The protobuf wire format (protobuf.dev/programming-guides/encoding), with the field numbers
# of opentelemetry-proto's messages.

VARINT, FIXED64, DELIMITED, FIXED32 = 0, 1, 2, 5


def _tag(message: type, field: str, wire: int) -> bytes:
    number: int = message.DESCRIPTOR.fields_by_name[field].number  # type: ignore[attr-defined]
    return varint(number << 3 | wire)


def varint(value: int) -> bytes:
    if value < SMALL:
        return SMALL_VARINTS[value] if value >= 0 else _varint(value)
    return _varint(value)


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # an int64 below zero takes ten bytes
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


SMALL = 1 << 14
SMALL_VARINTS = tuple(_varint(n) for n in range(SMALL))
"""The one- and two-byte varints: every length here but a batch's and a large span's."""


def delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


FIXED64_PACK = struct.Struct("<Q").pack
TIMES_PACK = struct.Struct("<BQBQ").pack
"""A span's start and end: a one-byte tag and a fixed64 each."""
DOUBLE_PACK = struct.Struct("<d").pack
FIXED32_PACK = struct.Struct("<I").pack

SPAN_TRACE_ID = _tag(Span, "trace_id", DELIMITED)
SPAN_ID = _tag(Span, "span_id", DELIMITED)
SPAN_TRACE_STATE = _tag(Span, "trace_state", DELIMITED)
SPAN_PARENT = _tag(Span, "parent_span_id", DELIMITED)
SPAN_NAME = _tag(Span, "name", DELIMITED)
SPAN_KIND = _tag(Span, "kind", VARINT)
SPAN_START = _tag(Span, "start_time_unix_nano", FIXED64)
SPAN_END = _tag(Span, "end_time_unix_nano", FIXED64)
SPAN_START_TAG, SPAN_END_TAG = SPAN_START[0], SPAN_END[0]  # one byte each: fields 7 and 8
SPAN_ATTRIBUTE = _tag(Span, "attributes", DELIMITED)
SPAN_EVENT = _tag(Span, "events", DELIMITED)
SPAN_STATUS = _tag(Span, "status", DELIMITED)
SPAN_FLAGS = _tag(Span, "flags", FIXED32)
EVENT_TIME = _tag(Span.Event, "time_unix_nano", FIXED64)
EVENT_NAME = _tag(Span.Event, "name", DELIMITED)
EVENT_ATTRIBUTE = _tag(Span.Event, "attributes", DELIMITED)
STATUS_MESSAGE = _tag(Status, "message", DELIMITED)
STATUS_CODE = _tag(Status, "code", VARINT)
KEY = _tag(KeyValue, "key", DELIMITED)
VALUE = _tag(KeyValue, "value", DELIMITED)
STRING = _tag(AnyValue, "string_value", DELIMITED)
BOOL = _tag(AnyValue, "bool_value", VARINT)
INT = _tag(AnyValue, "int_value", VARINT)
DOUBLE = _tag(AnyValue, "double_value", FIXED64)
ARRAY = _tag(AnyValue, "array_value", DELIMITED)
ARRAY_VALUES = _tag(ArrayValue, "values", DELIMITED)
RESOURCE_SPANS = _tag(ExportTraceServiceRequest, "resource_spans", DELIMITED)
RESOURCE = _tag(ResourceSpans, "resource", DELIMITED)
SCOPE_SPANS = _tag(ResourceSpans, "scope_spans", DELIMITED)
SCOPE = _tag(ScopeSpans, "scope", DELIMITED)
SPANS = _tag(ScopeSpans, "spans", DELIMITED)


TRACE_ID_PREFIX = SPAN_TRACE_ID + varint(16)
SPAN_ID_PREFIX = SPAN_ID + varint(8)
PARENT_PREFIX = SPAN_PARENT + varint(8)
SERVER_KIND = SPAN_KIND + varint(SERVER)
CLIENT_KIND = SPAN_KIND + varint(CLIENT)
SERVER_FLAGS = SPAN_FLAGS + FIXED32_PACK(1 | HAS_REMOTE)
CHILD_SERVER_FLAGS = SPAN_FLAGS + FIXED32_PACK(1 | HAS_REMOTE | IS_REMOTE)
CLIENT_FLAGS = SPAN_FLAGS + FIXED32_PACK(1 | HAS_REMOTE)
"""Sampled (W3C flag 1); whether the parent is remote is known (a client's is, the SERVER
span is the CLIENT span's local parent)."""


def any_value(item: object) -> bytes:
    if isinstance(item, bool):
        return BOOL + (b"\x01" if item else b"\x00")
    if isinstance(item, int):
        return INT + varint(item)
    if isinstance(item, float):
        return DOUBLE + DOUBLE_PACK(item)
    if isinstance(item, (list, tuple)):
        return delimited(ARRAY, b"".join(delimited(ARRAY_VALUES, any_value(v)) for v in item))
    return delimited(STRING, str(item).encode("utf-8", "replace"))


def key_prefix(key: str) -> bytes:
    """The keys are the code's own names: a few dozen, each encoded once."""
    prefix = KEY_PREFIXES[key] = delimited(KEY, key.encode()) + VALUE
    return prefix


KEY_PREFIXES: dict[str, bytes] = {}
"""An attribute's encoded key and the tag of its value, by key."""


def fresh(tag: bytes, attributes: Iterable[tuple[str, object]]) -> bytes:
    """Every attribute that is not None as a ``KeyValue`` under ``tag`` (a span's or an
    event's field)."""
    out: list[bytes] = []
    for key, item in attributes:
        if item is None:
            continue
        kind = type(item)  # the usual types inline: this runs for every request's IDs and counts
        if kind is str:
            text = item.encode("utf-8", "replace")  # type: ignore[attr-defined]
            value = STRING + varint(len(text)) + text
        elif kind is int:
            value = INT + varint(item)  # type: ignore[arg-type]
        elif kind is float:
            value = DOUBLE + DOUBLE_PACK(item)
        else:
            value = any_value(item)
        prefix = KEY_PREFIXES.get(key)
        if prefix is None:
            prefix = key_prefix(key)
        pair = prefix + varint(len(value)) + value
        out += (tag, varint(len(pair)), pair)
    return b"".join(out)


class AttributeEncoder:
    """Attributes whose values repeat from request to request (a route, a model, a
    replica...), encoded together once per set of values. An attribute's values are of one
    type (``True == 1``: a key must not take both)."""

    def __init__(self) -> None:
        self._blocks: dict[tuple[bytes, Attributes], bytes] = {}

    def encode(self, tag: bytes, repeated: Attributes) -> bytes:
        blocks = self._blocks
        block = blocks.get((tag, repeated))
        if block is None:
            if len(blocks) >= MAX_CACHED:
                blocks.clear()
            block = blocks[(tag, repeated)] = fresh(tag, repeated)
        return block


class Varying:
    """Attributes whose values differ from request to request (an ID, a time, a count), under
    one tag, made with the bytes that do not: a float's attribute is all known but its eight
    bytes, an integer's is kept whole for each value seen (counts repeat), a string's is known
    up to its lengths."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self._floats: dict[str, bytes] = {}
        self._ints: dict[str, dict[int, bytes]] = {}

    def double(self, key: str, value: float) -> bytes:
        head = self._floats.get(key)
        if head is None:
            head = self._floats[key] = fresh(self.tag, ((key, 0.0),))[:-8]
        return head + DOUBLE_PACK(value)

    def integer(self, key: str, value: int) -> bytes:
        seen = self._ints.get(key)
        if seen is None:
            seen = self._ints[key] = {}
        block = seen.get(value)
        if block is None:
            if len(seen) >= MAX_CACHED:
                seen.clear()
            block = seen[value] = fresh(self.tag, ((key, value),))
        return block

    def string(self, key: str, value: str) -> bytes:
        data = value.encode("utf-8", "replace")
        size = len(data)
        if size >= 126:  # the value's length would take more than a byte
            return fresh(self.tag, ((key, value),))
        prefix = KEY_PREFIXES.get(key) or key_prefix(key)
        # KeyValue: the key and its tag, then the AnyValue (its tag, length, the text).
        return (
            self.tag
            + varint(len(prefix) + size + 3)
            + prefix
            + SMALL_VARINTS[size + 2]
            + STRING
            + SMALL_VARINTS[size]
            + data
        )


class FixedAttributes:
    """A span's attributes of fixed keys, in that order: those whose values repeat encoded
    once per set of values, as ``AttributeEncoder`` does, keyed by the values alone."""

    def __init__(self, tag: bytes, keys: tuple[str, ...]) -> None:
        self.tag = tag
        self.keys = keys
        self._blocks: dict[tuple[object, ...], bytes] = {}

    def encode(self, values: tuple[object, ...]) -> bytes:
        blocks = self._blocks
        block = blocks.get(values)
        if block is None:
            if len(blocks) >= MAX_CACHED:
                blocks.clear()
            block = blocks[values] = fresh(self.tag, zip(self.keys, values, strict=True))
        return block


def read_answer(head: bytes, tail: bytes) -> tuple[str | None, str | None, tuple[str, ...] | None]:
    """The model and ID an answer starts with, the finish reasons it ends with."""
    model = RESPONSE_MODEL.search(head)
    response_id = RESPONSE_ID.search(head)
    reasons = tuple(r.decode("utf-8", "replace") for r in FINISH_REASON.findall(tail))
    return (
        model.group(1).decode("utf-8", "replace") if model else None,
        response_id.group(1).decode("utf-8", "replace") if response_id else None,
        reasons or None,
    )


def status(message: str) -> bytes:
    return delimited(SPAN_STATUS, delimited(STATUS_MESSAGE, message.encode()) + STATUS_CODE + varint(ERROR))


SERVER_REPEATED = (
    "http.request.method",
    "http.route",
    "http.response.status_code",
    "gateway.api_key.name",
    "gateway.backend",
    "gen_ai.operation.name",
    "gen_ai.request.model",
    "error.type",
)
CLIENT_REPEATED = (
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.response.finish_reasons",
    "server.address",
    "server.port",
    "http.request.method",
    "http.response.status_code",
    "error.type",
)


class Encoder:
    """Exchanges to one serialized ``ExportTraceServiceRequest`` under the gateway's resource."""

    def __init__(self, resource: Attributes, scope: str, version: str) -> None:
        kept = [KeyValue(key=k, value=AnyValue(string_value=str(v))) for k, v in resource]
        self.resource = delimited(RESOURCE, Resource(attributes=kept).SerializeToString())
        self.scope = delimited(SCOPE, InstrumentationScope(name=scope, version=version).SerializeToString())
        self.attributes = AttributeEncoder()
        self.varying = Varying(SPAN_ATTRIBUTE)
        self.server_repeated = FixedAttributes(SPAN_ATTRIBUTE, SERVER_REPEATED)
        self.client_repeated = FixedAttributes(SPAN_ATTRIBUTE, CLIENT_REPEATED)
        self._names: dict[tuple[str | None, str | None, str, bytes], bytes] = {}
        self._events: dict[tuple[str, Attributes], tuple[bytes, bytes]] = {}

    def request(self, spans: Sequence[bytes]) -> bytes:
        """The ``ExportTraceServiceRequest`` of spans encoded by ``spans``."""
        scope_spans = delimited(SCOPE_SPANS, self.scope + b"".join(delimited(SPANS, span) for span in spans))
        return delimited(RESOURCE_SPANS, self.resource + scope_spans)

    def spans(self, exchange: Exchange, trace: RequestTrace) -> list[bytes]:
        """The request's SERVER span, and its CLIENT span where the runtime was called."""
        trace_id = TRACE_ID_PREFIX + trace.trace_id.to_bytes(16, "big")
        state = delimited(SPAN_TRACE_STATE, trace.state.encode()) if trace.state else b""
        server = self.server_span(exchange, trace, trace_id, state)
        if trace.client_start is None:
            return [server]
        return [server, self.client_span(exchange, trace, trace_id, state)]

    def name(self, operation: str | None, model: str | None, fallback: str, kind: bytes) -> bytes:
        """A span's name and kind: ``{operation} {model}`` where both are known, else
        ``fallback``."""
        key = (operation, model, fallback, kind)
        named = self._names.get(key)
        if named is None:
            if len(self._names) >= MAX_CACHED:
                self._names.clear()
            text = f"{operation} {model}" if operation and model else fallback
            named = self._names[key] = delimited(SPAN_NAME, text.encode()) + kind
        return named

    def server_span(self, exchange: Exchange, trace: RequestTrace, trace_id: bytes, state: bytes) -> bytes:
        """The request at the gateway's edge, a child of the client's span where it sent one."""
        start_ns = trace.start_ns
        code, error_type = exchange.status, exchange.error
        server_error = code >= 500 or error_type == Outcome.MID_STREAM
        if error_type is None and code >= 500:
            error_type = str(code)
        varying = self.varying
        return b"".join(
            (
                trace_id,
                SPAN_ID_PREFIX + trace.span_id.to_bytes(8, "big"),
                state,
                PARENT_PREFIX + trace.parent_id.to_bytes(8, "big") if trace.parent_id else b"",
                self.name(None, None, trace.name, SERVER_KIND),
                TIMES_PACK(SPAN_START_TAG, start_ns, SPAN_END_TAG, start_ns + int(exchange.duration * 1e9)),
                self.server_repeated.encode(
                    (
                        exchange.method,
                        trace.name.partition(" ")[2],
                        code or None,
                        exchange.key,
                        exchange.backend,
                        trace.operation,
                        exchange.model,
                        error_type,
                    )
                ),
                varying.string("gateway.request_id", exchange.request_id),
                varying.double("gateway.queue.wait_seconds", exchange.queued) if exchange.queued else b"",
                status(error_type or "") if server_error else b"",
                CHILD_SERVER_FLAGS if trace.parent_id else SERVER_FLAGS,
            )
        )

    def client_span(self, exchange: Exchange, trace: RequestTrace, trace_id: bytes, state: bytes) -> bytes:
        """The call to the runtime, every try included: the GenAI conventions' inference span."""
        assert trace.client_start is not None  # made only where the runtime was called
        start_ns, origin, code = trace.start_ns, exchange.start, exchange.status
        client_error = code >= 400 or exchange.error is not None
        client_error_type = exchange.error or (str(code) if code >= 400 else None)
        server_address, server_port = address(trace.replica) if trace.replica else (None, None)
        model, response_id, reasons = read_answer(trace.head or b"", trace.tail or b"")
        ttfb = exchange.ttfb
        client_end = trace.client_end
        client_seconds = (client_end - origin) if client_end is not None else exchange.duration
        varying = self.varying
        parts = [
            trace_id,
            SPAN_ID_PREFIX + trace.client_id.to_bytes(8, "big"),
            state,
            PARENT_PREFIX + trace.span_id.to_bytes(8, "big"),
            self.name(trace.operation, exchange.model, exchange.method, CLIENT_KIND),
            TIMES_PACK(
                SPAN_START_TAG,
                start_ns + int((trace.client_start - origin) * 1e9),
                SPAN_END_TAG,
                start_ns + int(client_seconds * 1e9),
            ),
            self.client_repeated.encode(
                (
                    trace.operation,
                    trace.provider,
                    exchange.model,
                    model,
                    reasons,
                    server_address,
                    server_port,
                    exchange.method,
                    code or None,
                    client_error_type,
                )
            ),
        ]
        if trace.request:
            parts.append(self.attributes.encode(SPAN_ATTRIBUTE, trace.request))
        if response_id is not None:
            parts.append(varying.string("gen_ai.response.id", response_id))
        if exchange.prompt_tokens is not None:
            parts.append(varying.integer("gen_ai.usage.input_tokens", exchange.prompt_tokens))
        if exchange.completion_tokens is not None:
            parts.append(varying.integer("gen_ai.usage.output_tokens", exchange.completion_tokens))
        if ttfb is not None:
            if exchange.stream:
                first_chunk = max(0.0, ttfb - (trace.client_start - origin))
                parts.append(varying.double("gen_ai.response.time_to_first_chunk", first_chunk))
            parts.append(varying.double("gateway.time_to_first_byte", ttfb))
        if exchange.stream:
            parts.append(varying.integer("gateway.stream.events", exchange.events))
        for when, name, attributes in trace.events:
            parts.append(self.event(start_ns + int((when - origin) * 1e9), name, attributes))
        if client_error:
            parts.append(status(client_error_type or ""))
        parts.append(CLIENT_FLAGS)
        return b"".join(parts)

    def event(self, time_ns: int, name: str, attributes: Attributes) -> bytes:
        """An event of the CLIENT span (a try, a failure, the queue's wait). Its time varies;
        where no attribute is a float (a time), all else is made once per set of values."""
        known = self._events.get((name, attributes))
        if known is not None:
            head, rest = known
            return head + FIXED64_PACK(time_ns) + rest
        times = [a for a in attributes if type(a[1]) is float]
        repeated = tuple(a for a in attributes if type(a[1]) is not float) if times else attributes
        rest = (
            delimited(EVENT_NAME, name.encode())
            + self.attributes.encode(EVENT_ATTRIBUTE, tuple(repeated))
            + (fresh(EVENT_ATTRIBUTE, times) if times else b"")
        )
        head = SPAN_EVENT + varint(len(EVENT_TIME) + 8 + len(rest)) + EVENT_TIME
        if not times:
            if len(self._events) >= MAX_CACHED:
                self._events.clear()
            self._events[(name, attributes)] = (head, rest)
        return head + FIXED64_PACK(time_ns) + rest
