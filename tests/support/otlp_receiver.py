"""An OTLP/HTTP trace receiver on a real socket: what a collector would be sent, decoded."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@dataclass
class Received:
    """One span as received, with its resource's attributes."""

    span: Span
    resource: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.span.name)

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def kind(self) -> str:
        return str(Span.SpanKind.Name(self.span.kind))

    @property
    def attributes(self) -> dict[str, Any]:
        return {kv.key: plain(kv.value) for kv in self.span.attributes}

    @property
    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return [(e.name, {kv.key: plain(kv.value) for kv in e.attributes}) for e in self.span.events]

    @property
    def error(self) -> bool:
        return self.span.status.code == self.span.status.STATUS_CODE_ERROR


@dataclass
class Receiver:
    port: int = 0
    status: int = 200
    """What the receiver answers (503: a collector that refuses)."""
    bodies: list[bytes] = field(default_factory=list)
    """Every export as it arrived, decompressed: what a test searches for leaks."""
    headers: list[dict[str, str]] = field(default_factory=list)
    spans: list[Received] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with receiver._lock:
                    receiver.paths.append(self.path)
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    receiver.bodies.append(body)
                    if receiver.status == 200:
                        for spans in request.resource_spans:
                            resource = {kv.key: plain(kv.value) for kv in spans.resource.attributes}
                            for scope in spans.scope_spans:
                                receiver.spans.extend(Received(span, resource) for span in scope.spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def trace(self, trace_id: str, count: int = 2, within: float = 10) -> list[Received]:
        """The spans of ``trace_id`` once ``count`` of them arrived (fewer after ``within``)."""
        deadline = time.monotonic() + within
        while True:
            with self._lock:
                found = [s for s in self.spans if s.trace_id == trace_id]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def wait(self, count: int, within: float = 10) -> list[Received]:
        deadline = time.monotonic() + within
        while True:
            with self._lock:
                found = list(self.spans)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def raw(self) -> bytes:
        with self._lock:
            return b"".join(self.bodies)
