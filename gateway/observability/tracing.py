"""Tracing with OpenTelemetry: on when an OTLP endpoint is configured, absent otherwise.

The OpenTelemetry SDK reads its own settings: the endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or ``--otlp-traces-endpoint``), the protocol, headers,
compression, TLS and timeout, the resource (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``), the sampler (``OTEL_TRACES_SAMPLER``/``_ARG``, parent-based
always-on by default) and the batch processor's ``OTEL_BSP_*``. The SDK's sampler decides
each request (a static one, once for each kind of parent), which records plain values; its
spans are written when the event loop's turn ends (``gateway.observability.otlp``) and sent
in batches by a thread (``gateway.observability.export``).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from adapters.base import Route
from gateway import __version__
from gateway.config.settings import Settings
from gateway.core.exchange import Exchange
from gateway.core.jsonbody import JsonBody
from gateway.core.tracecontext import RequestTrace, parse_traceparent

if TYPE_CHECKING:
    from gateway.observability.export import Exporter

logger = logging.getLogger("gateway.tracing")

# gen_ai.operation.name of the routes that are GenAI operations.
OPERATIONS = {
    Route.CHAT_COMPLETIONS: "chat",
    Route.RESPONSES: "chat",
    Route.MESSAGES: "chat",
    Route.COMPLETIONS: "text_completion",
    Route.EMBEDDINGS: "embeddings",
}
# What the runtime is asked for, as the GenAI conventions name it (never the content).
MAX_TOKENS = ("max_completion_tokens", "max_tokens", "max_output_tokens", "max_new_tokens", "n_predict")
PROTOCOLS = ("http/protobuf", "grpc")
EXTRA = "pip install 'inference-gateway[otel]'"


def enabled(settings: Settings, env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether tracing is on: an OTLP endpoint configured, the SDK and traces not disabled."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        settings.otlp_traces_endpoint
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


class Tracer:
    """Starts a request's trace (the SDK's sampler decides) and hands it, finished, to the
    exporter."""

    def __init__(self, sampler: Any, exporter: Exporter, close: Callable[[], None] = lambda: None) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            TraceFlags,
            set_span_in_context,
        )
        from opentelemetry.trace.span import TraceState

        self.sampler = sampler
        self.exporter = exporter
        self._close = close
        self._root = Context()
        self._server = SpanKind.SERVER

        def parent(trace_id: int, span_id: int, flags: int, state: str | None) -> Context:
            """The context the SDK's sampler reads a remote parent from."""
            span = NonRecordingSpan(
                SpanContext(
                    trace_id,
                    span_id,
                    is_remote=True,
                    trace_flags=TraceFlags(flags & 0xFF),
                    trace_state=TraceState.from_header([state]) if state else None,
                )
            )
            return set_span_in_context(span, self._root)

        self._parent = parent
        from opentelemetry.sdk.trace import sampling

        # The SDK's own samplers read of a parent only whether it is valid, remote and sampled,
        # and its tracestate: without one, a context per sampled flag gives their decisions.
        self._shared: tuple[Context, Context] | None = None
        self._fixed: tuple[bool | None, bool | None, bool | None] = (None, None, None)
        """Whether a request with no parent, a parent sampled out, a parent sampled (and no
        tracestate) is sampled, where the SDK's sampler that decides is a static one: it
        reads nothing else, so it is asked once."""
        if _builtin(sampler, sampling):
            self._shared = (parent(1, 1, 0, None), parent(1, 1, 1, None))
            self._fixed = (
                _static(sampler, None, sampling),
                _static(sampler, 0, sampling),
                _static(sampler, 1, sampling),
            )

    def start(self, name: str, traceparent: bytes | None, tracestate: bytes | None) -> RequestTrace:
        """The trace of a request that arrived now, a child of the client's where its
        ``traceparent`` is valid."""
        start_ns = time.time_ns()
        parent = parse_traceparent(traceparent) if traceparent is not None else None
        bits = random.getrandbits
        state_out: str | None = None
        if parent is None:
            trace_id, parent_id = bits(128) or 1, 0
            sampled = self._fixed[0]
            if sampled is None:
                sampled, state_out = self._decide(self._root, trace_id, name)
        else:
            trace_id, parent_id, flags = parent
            if tracestate is None and self._shared is not None:
                sampled = self._fixed[1 + (flags & 1)]
                if sampled is None:
                    sampled, state_out = self._decide(self._shared[flags & 1], trace_id, name)
            else:
                state = tracestate.decode("latin-1") if tracestate else None
                context = self._parent(trace_id, parent_id, flags, state)
                sampled, state_out = self._decide(context, trace_id, name)
        return RequestTrace(
            name, trace_id, parent_id, bits(64) or 1, bits(64) or 1, sampled, state_out, start_ns
        )

    def _decide(self, context: Any, trace_id: int, name: str) -> tuple[bool, str | None]:
        """The SDK sampler's decision, and the tracestate it passes on."""
        result = self.sampler.should_sample(context, trace_id, name, self._server)
        state = result.trace_state.to_header() if result.trace_state else None
        return result.decision.is_sampled(), state or None

    def finish(self, exchange: Exchange) -> None:
        trace = exchange.trace
        if trace is not None and trace.sampled:
            self.exporter.add(exchange)

    def close(self) -> None:
        """Export what is queued and stop (blocks up to ``OTEL_BSP_EXPORT_TIMEOUT``)."""
        self.exporter.stop()
        self._close()


def _builtin(sampler: Any, sampling: Any) -> bool:
    """Whether ``sampler`` is made of the SDK's own samplers only."""
    if isinstance(sampler, sampling.ParentBased):
        delegates = (
            sampler._root,
            sampler._remote_parent_sampled,
            sampler._remote_parent_not_sampled,
            sampler._local_parent_sampled,
            sampler._local_parent_not_sampled,
        )
        return all(_builtin(d, sampling) for d in delegates)
    return type(sampler) in (sampling.StaticSampler, sampling.TraceIdRatioBased)


def _static(sampler: Any, flags: int | None, sampling: Any) -> bool | None:
    """Whether the SDK's ``sampler`` samples every request with no parent (``flags`` None) or
    with a remote parent of ``flags``, where the sampler that decides is a static one; else
    None (it is asked each time)."""
    if isinstance(sampler, sampling.ParentBased):
        if flags is None:
            sampler = sampler._root
        elif flags & 1:
            sampler = sampler._remote_parent_sampled
        else:
            sampler = sampler._remote_parent_not_sampled
    if type(sampler) is sampling.StaticSampler:
        return bool(sampler._decision.is_sampled())
    return None


def request_parameters(parsed: JsonBody | None) -> tuple[tuple[str, object], ...]:
    """The GenAI request attributes a body gives (numbers and flags, never content)."""
    if parsed is None:
        return ()
    found: list[tuple[str, object]] = []
    for name in MAX_TOKENS:
        limit = parsed.get(name)
        if isinstance(limit, int) and not isinstance(limit, bool):
            found.append(("gen_ai.request.max_tokens", limit))
            break
    for name in ("temperature", "top_p"):
        number = parsed.get(name)
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            found.append((f"gen_ai.request.{name}", float(number)))
    stream = parsed.get("stream")
    if isinstance(stream, bool):
        found.append(("gen_ai.request.stream", stream))
    choices = parsed.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices != 1:
        found.append(("gen_ai.request.choice.count", choices))
    return tuple(found)


def _positive(env: dict[str, str] | os._Environ[str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        number = int(raw)
    except ValueError:
        number = 0
    if number <= 0:
        logger.warning("%s=%r is not a positive whole number: %d is used", name, raw, default)
        return default
    return number


def protocol(env: dict[str, str] | os._Environ[str] = os.environ) -> str:
    chosen = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    chosen = chosen.strip().lower()
    if chosen not in PROTOCOLS:
        raise ValueError(
            f"OTLP protocol {chosen!r} is not supported for traces: use one of {', '.join(PROTOCOLS)}"
        )
    return chosen


def _sender(chosen: str, endpoint: str | None) -> tuple[Callable[[bytes], bool], Any]:
    """The SDK's exporter for ``chosen``, sending requests serialized here; and the exporter."""
    if chosen == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
            from opentelemetry.sdk.trace.export import SpanExportResult
        except ImportError:
            raise ValueError(
                "OTLP over gRPC needs its exporter: pip install 'inference-gateway[otel-grpc]'"
            ) from None

        class Prebuilt(Grpc):  # type: ignore[misc]
            """The SDK's gRPC exporter, given requests already made."""

            def _translate_data(self, data: Any) -> Any:
                return data

            def _count_data(self, data: Any) -> int:
                return sum(len(scope.spans) for spans in data.resource_spans for scope in spans.scope_spans)

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        grpc = Prebuilt(endpoint=endpoint)
        parse = ExportTraceServiceRequest.FromString
        return (lambda data: grpc.export(parse(data)) == SpanExportResult.SUCCESS), grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    http = OTLPSpanExporter(endpoint=endpoint)
    client = getattr(http, "_client", None)  # the SDK's transport: retries, compression, headers, TLS
    if client is None:
        raise ValueError(f"this opentelemetry-exporter-otlp-proto-http is not one tracing knows: {EXTRA}")

    return (lambda data: bool(client.export(data).success)), http


def create_tracer(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    env: dict[str, str] | os._Environ[str] = os.environ,
) -> Tracer | None:
    """The tracer the settings and the environment ask for, or None (tracing off). Raises
    ValueError for a configuration that cannot work (an unknown protocol, a missing extra)."""
    if not enabled(settings, env):
        return None
    chosen = protocol(env)
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        from gateway.observability.export import Exporter
        from gateway.observability.otlp import Encoder
    except ImportError:
        raise ValueError(f"tracing (an OTLP endpoint is configured) needs OpenTelemetry: {EXTRA}") from None
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": settings.otel_service_name}))
    if "service.version" not in resource.attributes:
        resource = resource.merge(Resource({"service.version": __version__}))
    sampler = TracerProvider(resource=resource, shutdown_on_exit=False).sampler
    send, sdk_exporter = _sender(chosen, settings.otlp_traces_endpoint)
    spans = Counter(
        "gateway_trace_spans",
        "Spans exported, dropped (the export queue was full) or failed (the collector did not take them).",
        ["outcome"],
        registry=registry,
    )
    for outcome in ("exported", "dropped", "failed"):
        spans.labels(outcome)
    max_queue = _positive(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    exporter = Exporter(
        Encoder(tuple(resource.attributes.items()), "gateway", __version__),
        send,
        max_queue=max_queue,
        batch=_positive(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
        delay=_positive(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000,
        timeout=_positive(env, "OTEL_BSP_EXPORT_TIMEOUT", 30000) / 1000,
        counted=lambda outcome, count: spans.labels(outcome).inc(count),
    )
    logger.info(
        "tracing on: OTLP %s to %s, sampler %s",
        chosen,
        getattr(sdk_exporter, "_endpoint", None)
        or settings.otlp_traces_endpoint
        or "the environment's endpoint",
        sampler.get_description(),
    )
    return Tracer(sampler, exporter, sdk_exporter.shutdown)
