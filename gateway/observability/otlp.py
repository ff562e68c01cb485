"""Finished requests turned into OTLP spans and sent in batches.

A sampled request leaves its ``Exchange`` (its ``RequestTrace`` inside); when the event loop's
turn ends, its two spans are written as OTLP protobuf bytes, and a thread of their own sends
them in batches through the OpenTelemetry SDK's own OTLP exporter transport (endpoint,
headers, compression, TLS, timeout and retries as the SDK reads them). The bytes are the
``ExportTraceServiceRequest`` of ``opentelemetry-proto`` (its field numbers are read from that
package's descriptors; the resource and the scope are its messages, serialized once), written
field by field: building that package's message objects cost about 100 µs a request, more
than the rest of the request, and the SDK's span objects more still; written here, about
20 µs. Attributes that repeat (a route, a model, a replica) are encoded once per set of
values. A full queue drops (and counts) a request's spans; a collector that is down costs
the retries of one batch at a time, on the thread.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, SpanFlags, Status

from gateway.core.exchange import Exchange, Outcome
from gateway.core.tracecontext import RequestTrace, address

logger = logging.getLogger("gateway.tracing")

Attributes = Sequence[tuple[str, object]]
Send = Callable[[bytes], bool]
"""Sends one serialized ``ExportTraceServiceRequest``; False when it was not taken."""

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


def key_value(key: str, item: object) -> bytes:
    return delimited(KEY, key.encode()) + delimited(VALUE, any_value(item))


class AttributeEncoder:
    """Attributes encoded as ``KeyValue`` messages. Those whose values repeat from request to
    request (a route, a model, a replica...) are encoded together once per set of values;
    the others (an ID, a count, a time) each time."""

    def __init__(self) -> None:
        self._blocks: dict[tuple[bytes, Attributes], bytes] = {}

    def encode(self, tag: bytes, repeated: Attributes, varying: Attributes = ()) -> bytes:
        """Every attribute that is not None, under ``tag`` (a span's or an event's field). An
        attribute's values are of one type (``True == 1``: a key must not take both)."""
        blocks = self._blocks
        block = blocks.get((tag, repeated))
        if block is None:
            if len(blocks) >= MAX_CACHED:
                blocks.clear()
            block = blocks[(tag, repeated)] = self.fresh(tag, repeated)
        return block + self.fresh(tag, varying) if varying else block

    @staticmethod
    def fresh(tag: bytes, attributes: Attributes) -> bytes:
        return b"".join(delimited(tag, key_value(key, item)) for key, item in attributes if item is not None)


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


class Encoder:
    """Exchanges to one serialized ``ExportTraceServiceRequest`` under the gateway's resource."""

    def __init__(self, resource: Attributes, scope: str, version: str) -> None:
        kept = [KeyValue(key=k, value=AnyValue(string_value=str(v))) for k, v in resource]
        self.resource = delimited(RESOURCE, Resource(attributes=kept).SerializeToString())
        self.scope = delimited(SCOPE, InstrumentationScope(name=scope, version=version).SerializeToString())
        self.attributes = AttributeEncoder()

    def request(self, spans: Sequence[bytes]) -> bytes:
        """The ``ExportTraceServiceRequest`` of spans encoded by ``spans``."""
        scope_spans = delimited(SCOPE_SPANS, self.scope + b"".join(delimited(SPANS, span) for span in spans))
        return delimited(RESOURCE_SPANS, self.resource + scope_spans)

    def spans(self, exchange: Exchange, trace: RequestTrace) -> list[bytes]:
        """The request's SERVER span, and its CLIENT span where the runtime was called."""
        trace_id = delimited(SPAN_TRACE_ID, trace.trace_id.to_bytes(16, "big"))
        state = delimited(SPAN_TRACE_STATE, trace.state.encode()) if trace.state else b""
        server = self.server_span(exchange, trace, trace_id, state)
        if trace.client_start is None:
            return [server]
        return [server, self.client_span(exchange, trace, trace_id, state)]

    def server_span(self, exchange: Exchange, trace: RequestTrace, trace_id: bytes, state: bytes) -> bytes:
        """The request at the gateway's edge, a child of the client's span where it sent one."""
        start_ns = trace.start_ns
        end_ns = start_ns + int(exchange.duration * 1e9)
        code, error_type = exchange.status, exchange.error
        server_error = code >= 500 or error_type == Outcome.MID_STREAM
        if error_type is None and code >= 500:
            error_type = str(code)
        encode = self.attributes.encode
        return b"".join(
            (
                trace_id,
                delimited(SPAN_ID, trace.span_id.to_bytes(8, "big")),
                state,
                delimited(SPAN_PARENT, trace.parent_id.to_bytes(8, "big")) if trace.parent_id else b"",
                delimited(SPAN_NAME, trace.name.encode()),
                SPAN_KIND + varint(SERVER),
                SPAN_START + FIXED64_PACK(start_ns),
                SPAN_END + FIXED64_PACK(end_ns),
                encode(
                    SPAN_ATTRIBUTE,
                    (
                        ("http.request.method", exchange.method),
                        ("http.route", trace.name.partition(" ")[2]),
                        ("http.response.status_code", code or None),
                        ("gateway.api_key.name", exchange.key),
                        ("gateway.backend", exchange.backend),
                        ("gen_ai.operation.name", trace.operation),
                        ("gen_ai.request.model", exchange.model),
                        ("error.type", error_type),
                    ),
                    (
                        ("gateway.request_id", exchange.request_id),
                        ("gateway.queue.wait_seconds", exchange.queued or None),
                    ),
                ),
                status(error_type or "") if server_error else b"",
                SPAN_FLAGS + FIXED32_PACK(1 | HAS_REMOTE | (IS_REMOTE if trace.parent_id else 0)),
            )
        )

    def client_span(self, exchange: Exchange, trace: RequestTrace, trace_id: bytes, state: bytes) -> bytes:
        """The call to the runtime, every try included: the GenAI conventions' inference span."""
        assert trace.client_start is not None  # made only where the runtime was called
        start_ns, origin, code = trace.start_ns, exchange.start, exchange.status
        encode = self.attributes.encode
        end_ns = start_ns + int(exchange.duration * 1e9)
        client_error = code >= 400 or exchange.error is not None
        client_error_type = exchange.error or (str(code) if code >= 400 else None)
        server_address, server_port = address(trace.replica) if trace.replica else (None, None)
        model, response_id, reasons = read_answer(trace.head or b"", trace.tail or b"")
        ttfb = exchange.ttfb
        first_chunk = None
        if ttfb is not None and exchange.stream:
            first_chunk = max(0.0, ttfb - (trace.client_start - origin))
        client_end = trace.client_end
        return b"".join(
            (
                trace_id,
                delimited(SPAN_ID, trace.client_id.to_bytes(8, "big")),
                state,
                delimited(SPAN_PARENT, trace.span_id.to_bytes(8, "big")),
                delimited(
                    SPAN_NAME,
                    (
                        f"{trace.operation} {exchange.model}"
                        if trace.operation and exchange.model
                        else exchange.method
                    ).encode(),
                ),
                SPAN_KIND + varint(CLIENT),
                SPAN_START + FIXED64_PACK(start_ns + int((trace.client_start - origin) * 1e9)),
                SPAN_END
                + FIXED64_PACK(
                    start_ns + int((client_end - origin) * 1e9) if client_end is not None else end_ns
                ),
                encode(
                    SPAN_ATTRIBUTE,
                    (
                        ("gen_ai.operation.name", trace.operation),
                        ("gen_ai.provider.name", trace.provider),
                        ("gen_ai.request.model", exchange.model),
                        *trace.request,
                        ("gen_ai.response.model", model),
                        ("gen_ai.response.finish_reasons", reasons),
                        ("server.address", server_address),
                        ("server.port", server_port),
                        ("http.request.method", exchange.method),
                        ("http.response.status_code", code or None),
                        ("error.type", client_error_type),
                    ),
                    (
                        ("gen_ai.response.id", response_id),
                        ("gen_ai.usage.input_tokens", exchange.prompt_tokens),
                        ("gen_ai.usage.output_tokens", exchange.completion_tokens),
                        ("gen_ai.response.time_to_first_chunk", first_chunk),
                        ("gateway.time_to_first_byte", ttfb),
                        ("gateway.stream.events", exchange.events if exchange.stream else None),
                    ),
                ),
                *(
                    delimited(
                        SPAN_EVENT,
                        EVENT_TIME
                        + FIXED64_PACK(start_ns + int((when - origin) * 1e9))
                        + delimited(EVENT_NAME, name.encode())
                        + encode(
                            EVENT_ATTRIBUTE,
                            tuple(a for a in attributes if not isinstance(a[1], float)),
                            tuple(a for a in attributes if isinstance(a[1], float)),
                        ),
                    )
                    for when, name, attributes in trace.events
                ),
                status(client_error_type or "") if client_error else b"",
                SPAN_FLAGS + FIXED32_PACK(1 | HAS_REMOTE),
            )
        )


class Exporter:
    """Finished requests' spans, encoded on the event loop's thread once per turn of the loop
    (as the access log writes its lines), queued, and sent by a thread of their own as the
    SDK's batch span processor does with its settings (``OTEL_BSP_*``): a batch as soon as
    there is a full one, what is left once ``delay`` passes without one, everything at
    ``stop``.

    A thread that encoded would compete for the interpreter's lock with the event loop,
    which gives it up at every system call and waits up to the switch interval (5 ms) to get
    it back: tried, it halved the gateway's requests a second. The thread here only joins
    bytes and waits on the collector."""

    def __init__(
        self,
        encoder: Encoder,
        send: Send,
        *,
        max_queue: int = 2048,
        batch: int = 512,
        delay: float = 5.0,
        timeout: float = 30.0,
        counted: Callable[[str, int], None] | None = None,
    ) -> None:
        self.encoder = encoder
        self.send = send
        self.max_queue = max(1, max_queue)
        self.batch = max(1, min(batch, max_queue))
        self.delay = delay
        self.timeout = timeout
        self.counted = counted or (lambda outcome, spans: None)
        """Told of spans exported, dropped (a full queue) or failed (not taken)."""
        self._finished: list[Exchange] = []
        """Requests finished in this turn of the loop, their spans not made yet."""
        self._queue: deque[bytes] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gateway-otlp", daemon=True)
            self._thread.start()

    def add(self, exchange: Exchange) -> None:
        """A finished, sampled request (the event loop's thread): its spans are made when the
        loop's turn ends."""
        if not self._finished:
            try:
                asyncio.get_running_loop().call_soon(self.encode_finished)
            except RuntimeError:  # no loop (a caller of its own): now
                self._finished.append(exchange)
                self.encode_finished()
                return
        self._finished.append(exchange)

    def encode_finished(self) -> None:
        finished, self._finished = self._finished, []
        queue, spans, dropped = self._queue, self.encoder.spans, 0
        for exchange in finished:
            trace = exchange.trace
            if trace is None:
                continue
            if len(queue) >= self.max_queue:
                dropped += 1 if trace.client_start is None else 2
                continue
            try:
                queue.extend(spans(exchange, trace))
            except Exception:  # a span this code cannot make is a bug, not the request's
                logger.exception("could not make the spans of request %s", exchange.request_id)
                dropped += 2
        if dropped:
            self.counted("dropped", dropped)
        if len(queue) >= self.batch and not self._wake.is_set():
            self._wake.set()

    def stop(self) -> None:
        """Export what is queued (within ``timeout``) and end the thread."""
        self.encode_finished()
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        thread.join(self.timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            full = self._wake.wait(self.delay)
            self._wake.clear()
            stopping = self._stopping
            self.export_queued(everything=stopping or not full)
            if stopping:
                return

    def export_queued(self, everything: bool = True) -> None:
        """Full batches; and the rest when ``everything``."""
        queue, batch = self._queue, self.batch
        while len(queue) >= batch or (everything and queue):
            taken = [queue.popleft() for _ in range(min(batch, len(queue)))]
            try:
                sent = self.send(self.encoder.request(taken))
            except Exception:  # the SDK's transport answers failures; this is a bug of ours
                logger.exception("could not export %d spans", len(taken))
                sent = False
            self.counted("exported" if sent else "failed", len(taken))
