"""Tracing: one trace from the client through the gateway into the runtime, exported by OTLP to
a receiver in the test, in the GenAI conventions, with no prompt, completion or key in it."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.settings import Settings
from gateway.core.tracecontext import parse_traceparent
from gateway.observability.tracing import create_tracer, enabled
from gateway.tenancy.auth import plain_key_name
from tests.conftest import Fake, Gateway, GatewayFactory, Runtime
from tests.observability.test_accesslog import lines, read_lines
from tests.support.otlp_receiver import Received, Receiver
from tests.support.processes import serve, stop

SECRET_PROMPT = "the launch code is 7-7-alpha"
KEY = "sk-trace-secret-1"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")


@pytest.fixture
def traced(
    start_gateway: GatewayFactory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Gateway]:
    """A gateway whose traces go to the receiver, configured as OpenTelemetry's SDK is."""

    def start(**overrides: Any) -> Gateway:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url + "/v1/traces")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        overrides.setdefault("api_keys", [KEY])
        return start_gateway(**overrides)

    return start


def chat(gateway: Gateway, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": SECRET_PROMPT}], **body},
        headers={"Authorization": f"Bearer {KEY}", **(headers or {})},
        timeout=10,
    )


def runtime_parent(fake: Fake) -> tuple[str, str, str]:
    """The trace ID, parent span ID and flags the runtime was sent."""
    found = TRACEPARENT.fullmatch(fake.seen.requests[-1]["headers"]["traceparent"])
    assert found is not None
    return found.group(1), found.group(2), found.group(3)


def by_kind(spans: list[Received]) -> dict[str, Received]:
    return {span.kind: span for span in spans}


def test_a_clients_trace_is_continued_through_the_gateway_into_the_runtime(
    traced: Callable[..., Gateway], receiver: Receiver, fake: Fake, capfd: pytest.CaptureFixture[str]
) -> None:
    gateway = traced(access_log=True)
    capfd.readouterr()
    answer = chat(
        gateway,
        {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=opaque"},
        max_tokens=64,
        temperature=0.5,
    )
    assert answer.status_code == 200
    spans = by_kind(receiver.trace(CLIENT_TRACE))
    server, client = spans["SPAN_KIND_SERVER"], spans["SPAN_KIND_CLIENT"]
    # The client's span is the gateway's parent; the gateway's CLIENT span is the runtime's.
    assert server.parent_id == CLIENT_SPAN
    assert client.parent_id == server.span_id
    assert runtime_parent(fake) == (CLIENT_TRACE, client.span_id, "01")
    assert fake.seen.requests[-1]["headers"]["tracestate"] == "vendor=opaque"
    assert server.span.trace_state == client.span.trace_state == "vendor=opaque"
    assert server.name == "POST /v1/chat/completions"
    assert client.name == "chat fake-model"
    assert server.attributes == {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "gateway.request_id": answer.headers["x-request-id"],
        "gateway.api_key.name": plain_key_name(KEY),
        "gateway.backend": "openai",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "fake-model",
    }
    attributes = client.attributes
    assert attributes.pop("gateway.time_to_first_byte") > 0
    port = int(fake.url.rsplit(":", 1)[1])
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "fake-model",
        "gen_ai.request.max_tokens": 64,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.response.model": "fake-model",
        "gen_ai.response.id": answer.json()["id"],
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 3,
        "server.address": "127.0.0.1",
        "server.port": port,
        "http.request.method": "POST",
        "http.response.status_code": 200,
    }
    assert [name for name, _ in client.events] == ["gateway.attempt"]
    assert server.span.start_time_unix_nano <= client.span.start_time_unix_nano
    assert client.span.end_time_unix_nano <= server.span.end_time_unix_nano
    assert not server.error
    assert not client.error
    assert server.resource["service.name"] == "inference-gateway"
    # The access log's line joins the trace.
    (line,) = lines(read_lines(capfd, 1))
    assert (line["trace_id"], line["span_id"]) == (CLIENT_TRACE, server.span_id)
    # Nothing of the prompt, the completion or the key was exported.
    raw = receiver.raw()
    for secret in (SECRET_PROMPT, "Hello there", KEY):
        assert secret.encode() not in raw


def test_without_a_traceparent_the_gateway_starts_the_trace(
    traced: Callable[..., Gateway], receiver: Receiver, fake: Fake
) -> None:
    gateway = traced()
    # Invalid ones are ignored as W3C says: upper case, a zero ID, version ff, two headers.
    for sent in (
        None,
        f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01",
        f"00-{'0' * 32}-{CLIENT_SPAN}-01",
        f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
    ):
        assert chat(gateway, {"traceparent": sent} if sent else None).status_code == 200
        trace_id, parent, flags = runtime_parent(fake)
        assert trace_id != CLIENT_TRACE.lower()
        assert flags == "01"
        spans = by_kind(receiver.trace(trace_id))
        assert spans["SPAN_KIND_SERVER"].parent_id == ""
        assert spans["SPAN_KIND_SERVER"].span.flags & 0x200 == 0  # no remote parent
        assert spans["SPAN_KIND_CLIENT"].span_id == parent
    twice = [(b"traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode())] * 2
    assert httpx.post(
        gateway.url + "/v1/chat/completions",
        content=json.dumps({"model": "fake-model", "messages": []}),
        headers=[(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json"),
                 *twice],
    ).status_code == 200  # fmt: skip
    assert runtime_parent(fake)[0] != CLIENT_TRACE


def test_a_sampled_out_parent_is_passed_on_sampled_out_and_nothing_is_exported(
    traced: Callable[..., Gateway], receiver: Receiver, fake: Fake
) -> None:
    gateway = traced()
    assert chat(gateway, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"}).status_code == 200
    trace_id, parent, flags = runtime_parent(fake)
    assert (trace_id, flags) == (CLIENT_TRACE, "00")
    assert parent != CLIENT_SPAN  # the gateway's own span, not recorded
    # A sampled request after it is exported; the sampled-out one never is.
    assert chat(gateway).status_code == 200
    later = runtime_parent(fake)[0]
    assert len(receiver.trace(later)) == 2
    time.sleep(0.2)
    assert receiver.trace(CLIENT_TRACE, within=0) == []


def test_a_stream_records_its_usage_and_time_to_first_chunk(
    traced: Callable[..., Gateway], receiver: Receiver, fake: Fake
) -> None:
    gateway = traced()
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={"model": "fake-model", "stream": True, "stream_options": {"include_usage": True},
              "messages": [{"role": "user", "content": SECRET_PROMPT}]},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as answer:  # fmt: skip
        assert answer.status_code == 200
        body = answer.read()
    assert b"[DONE]" in body
    client = by_kind(receiver.trace(runtime_parent(fake)[0]))["SPAN_KIND_CLIENT"]
    attributes = client.attributes
    assert attributes["gen_ai.request.stream"] is True
    assert attributes["gen_ai.usage.input_tokens"] == 5
    assert attributes["gen_ai.usage.output_tokens"] == 5
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert attributes["gen_ai.response.model"] == "fake-model"
    assert 0 < attributes["gen_ai.response.time_to_first_chunk"] <= attributes["gateway.time_to_first_byte"]
    assert attributes["gateway.stream.events"] == 7  # five words, usage, [DONE]
    assert b"friend" not in receiver.raw()


def test_a_stream_the_runtime_breaks_off_is_an_error_with_what_it_sent(
    traced: Callable[..., Gateway], receiver: Receiver, fake: Fake
) -> None:
    gateway = traced()
    with httpx.stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json={"model": "die", "stream": True, "messages": []},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as answer:
        answer.read()
    spans = by_kind(receiver.trace(runtime_parent(fake)[0]))
    server, client = spans["SPAN_KIND_SERVER"], spans["SPAN_KIND_CLIENT"]
    assert server.error
    assert client.error
    assert server.attributes["error.type"] == client.attributes["error.type"] == "mid_stream"
    assert client.attributes["gen_ai.response.model"] == "die"
    assert client.attributes["gateway.stream.events"] == 2


def test_refusals_are_spans_of_their_own(
    traced: Callable[..., Gateway], receiver: Receiver, fake: Fake
) -> None:
    gateway = traced(rate_limit="1/minute")
    assert chat(gateway, {"Authorization": "Bearer sk-wrong"}).status_code == 401
    assert chat(gateway).status_code == 200
    assert chat(gateway).status_code == 429
    assert chat(gateway, model="error-500").status_code == 429
    spans = receiver.wait(5)
    servers = [s for s in spans if s.kind == "SPAN_KIND_SERVER"]
    assert [s.attributes.get("error.type") for s in servers] == [
        "authentication_error",
        None,
        "rate_limit_exceeded",
        "rate_limit_exceeded",
    ]
    assert [s.attributes["http.response.status_code"] for s in servers] == [401, 200, 429, 429]
    assert not any(s.error for s in servers)  # a 4xx is the client's, not the server's
    assert len([s for s in spans if s.kind == "SPAN_KIND_CLIENT"]) == 1  # only one reached the runtime
    assert b"sk-wrong" not in receiver.raw()


def test_a_runtime_error_and_a_failover_are_recorded(
    receiver: Receiver,
    runtimes: Callable[..., Runtime],
    fleet_gateway: Callable[..., Gateway],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url + "/v1/traces")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    busy, url1 = runtimes("busy")
    busy.status = 429
    _, url2 = runtimes("free")
    gateway = fleet_gateway([{"name": "r", "urls": [url1, url2]}])
    answers = [chat(gateway, {"Authorization": "Bearer sk-test-1"}, model="m") for _ in range(6)]
    assert all(a.status_code == 200 for a in answers)
    clients = [s for s in receiver.wait(12) if s.kind == "SPAN_KIND_CLIENT"]
    failed_over = [c for c in clients if len(c.events) > 1]
    assert failed_over, [c.events for c in clients]
    events = failed_over[0].events
    busy_port = int(url1.rsplit(":", 1)[1])
    free_port = int(url2.rsplit(":", 1)[1])
    assert events[0] == (
        "gateway.attempt",
        {"gateway.attempt": 1, "server.address": "127.0.0.1", "server.port": busy_port},
    )
    assert events[1][0] == "gateway.attempt.failed"
    assert events[1][1]["error.type"] == "429"
    assert events[1][1]["http.response.status_code"] == 429
    assert events[2] == (
        "gateway.attempt",
        {"gateway.attempt": 2, "server.address": "127.0.0.1", "server.port": free_port},
    )
    assert failed_over[0].attributes["server.port"] == free_port
    assert not failed_over[0].error


def test_a_backend_error_passes_through_and_marks_the_spans(
    traced: Callable[..., Gateway], receiver: Receiver, fake: Fake
) -> None:
    gateway = traced()
    assert chat(gateway, model="error-500").status_code == 500
    spans = by_kind(receiver.trace(runtime_parent(fake)[0]))
    assert spans["SPAN_KIND_SERVER"].error
    assert spans["SPAN_KIND_CLIENT"].error
    assert spans["SPAN_KIND_CLIENT"].attributes["error.type"] == "500"
    assert chat(gateway, model="error-400").status_code == 400
    spans = by_kind(receiver.trace(runtime_parent(fake)[0]))
    assert not spans["SPAN_KIND_SERVER"].error  # the client's mistake
    assert spans["SPAN_KIND_CLIENT"].error
    assert spans["SPAN_KIND_CLIENT"].attributes["error.type"] == "400"


def test_a_collector_that_is_down_costs_only_dropped_spans(
    start_gateway: GatewayFactory, fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support.fakes import free_port

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    gateway = start_gateway(api_keys=[KEY])
    began = time.monotonic()
    for _ in range(40):
        assert chat(gateway).status_code == 200
    assert time.monotonic() - began < 10
    metrics = httpx.get(gateway.url + "/metrics").text
    dropped = re.search(r'gateway_trace_spans_total\{outcome="dropped"\} (\S+)', metrics)
    failed = re.search(r'gateway_trace_spans_total\{outcome="failed"\} (\S+)', metrics)
    assert dropped is not None
    assert failed is not None
    assert float(dropped.group(1)) + float(failed.group(1)) > 0
    assert 'gateway_trace_spans_total{outcome="exported"} 0.0' in metrics


def test_a_collector_that_refuses_is_counted_as_failed(
    traced: Callable[..., Gateway], receiver: Receiver
) -> None:
    receiver.status = 400  # not retried
    gateway = traced()
    assert chat(gateway).status_code == 200

    def failed() -> float:
        found = re.search(
            r'gateway_trace_spans_total\{outcome="failed"\} (\S+)', httpx.get(gateway.url + "/metrics").text
        )
        return float(found.group(1)) if found else 0.0

    deadline = time.monotonic() + 10
    while failed() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert failed() == 2


def test_off_the_gateway_passes_trace_context_on_as_sent(
    start_gateway: GatewayFactory, fake: Fake, capfd: pytest.CaptureFixture[str]
) -> None:
    gateway = start_gateway(api_keys=[KEY], access_log=True)
    assert gateway.app.state.gateway.tracer is None
    capfd.readouterr()
    sent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    assert chat(gateway, {"traceparent": sent, "tracestate": "a=1"}).status_code == 200
    headers = fake.seen.requests[-1]["headers"]
    assert (headers["traceparent"], headers["tracestate"]) == (sent, "a=1")
    (line,) = lines(read_lines(capfd, 1))
    assert "trace_id" not in line


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_tracing_is_on_when_an_endpoint_is_configured(env: dict[str, str], on: bool) -> None:
    assert enabled(Settings(), env) is on
    assert enabled(Settings(otlp_traces_endpoint="http://c:4318/v1/traces"), {}) is True


def test_a_protocol_that_cannot_be_used_is_refused_at_start() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    with pytest.raises(ValueError, match="http/json"):
        create_tracer(Settings(), None, env)
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"otel-grpc"):
            create_tracer(Settings(), None, env)


def test_the_standard_variables_alone_configure_a_real_process(receiver: Receiver, fake: Fake) -> None:
    """``gateway serve`` with OpenTelemetry's variables and nothing else: base endpoint, service
    name, resource attributes, headers, compression, sampler, batch delay."""
    process, url = serve(
        "--backend-url",
        fake.url,
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_SERVICE_NAME": "edge-gateway",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test,team=ml",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=ops",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "1.0",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
        stdout=subprocess.PIPE,
    )
    try:
        answer = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": SECRET_PROMPT}]},
            headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
        )
        assert answer.status_code == 200
        spans = receiver.trace(CLIENT_TRACE)
        assert len(spans) == 2
    finally:
        stop(process)
    assert receiver.paths[0] == "/v1/traces"
    assert receiver.headers[0]["x-tenant"] == "ops"
    assert receiver.headers[0]["content-encoding"] == "gzip"
    resource = spans[0].resource
    assert resource["service.name"] == "edge-gateway"
    assert resource["deployment.environment.name"] == "test"
    assert resource["team"] == "ml"
    assert SECRET_PROMPT.encode() not in receiver.raw()


def test_the_last_spans_are_exported_when_the_gateway_stops(receiver: Receiver, fake: Fake) -> None:
    process, url = serve(
        "--backend-url",
        fake.url,
        env={
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/v1/traces",
            "OTEL_BSP_SCHEDULE_DELAY": "60000",
        },
    )
    try:
        assert (
            httpx.post(url + "/v1/chat/completions", json={"model": "fake-model", "messages": []}).status_code
            == 200
        )
        assert receiver.wait(1, within=0.5) == []  # held for the batch
    finally:
        stop(process)
    assert len(receiver.wait(2, within=5)) == 2


@given(st.binary(max_size=80))
def test_any_traceparent_is_parsed_or_refused_never_raises(value: bytes) -> None:
    parsed = parse_traceparent(value)
    if parsed is not None:
        trace_id, parent_id, flags = parsed
        assert trace_id
        assert parent_id
        assert 0 <= flags <= 0xFF
        assert value[:55] == b"%s-%032x-%016x-%02x" % (value[:2], trace_id, parent_id, flags)


@given(
    st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1), st.integers(0, 255), st.sampled_from([b"", b"-x"])
)
def test_a_valid_traceparent_is_read_back(trace_id: int, parent_id: int, flags: int, rest: bytes) -> None:
    version = b"01" if rest else b"00"
    value = b"%s-%032x-%016x-%02x%s" % (version, trace_id, parent_id, flags, rest)
    assert parse_traceparent(value) == (trace_id, parent_id, flags)
    assert parse_traceparent(b"00" + value[2:] + b"-x") is None  # version 00 has nothing after


REFERENCE_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def reference_traceparent(value: bytes) -> tuple[int, int, int] | None:
    """W3C Trace Context level 1, 3.2, as its text reads."""
    found = REFERENCE_TRACEPARENT.match(value)
    if found is None:
        return None
    version, size = found.group(1), len(value)
    if version == b"ff" or (size != 55 if version == b"00" else size > 55 and value[55:56] != b"-"):
        return None
    trace_id, parent_id = int(found.group(2), 16), int(found.group(3), 16)
    if not trace_id or not parent_id:
        return None
    return trace_id, parent_id, int(found.group(4), 16)


NEAR_TRACEPARENT = st.builds(
    lambda version, trace_id, parent_id, flags, rest, at, byte: (
        lambda value: value[:at] + byte + value[at + 1 :] if at >= 0 else value
    )(b"%s-%s-%s-%s%s" % (version, trace_id, parent_id, flags, rest)),
    st.sampled_from([b"00", b"01", b"ff", b"0A", b"cc"]),
    st.text("0123456789abcdef", min_size=31, max_size=33).map(str.encode),
    st.text("0123456789abcdef", min_size=15, max_size=17).map(str.encode),
    st.sampled_from([b"00", b"01", b"ff", b"1", b"0g"]),
    st.sampled_from([b"", b"-", b"-x", b"x", b"--"]),
    st.integers(-1, 56),
    st.sampled_from([b"-", b"A", b"g", b" ", b"0"]),
)


@given(st.one_of(st.binary(max_size=80), NEAR_TRACEPARENT))
def test_the_traceparent_parser_reads_as_the_specification_does(value: bytes) -> None:
    assert parse_traceparent(value) == reference_traceparent(value)


def samplers() -> list[Any]:
    from opentelemetry.sdk.trace import sampling

    class ByName(sampling.Sampler):
        """One of the user's own: samples by the span's name."""

        def should_sample(self, parent_context: Any, trace_id: int, name: str, *args: Any, **kw: Any) -> Any:
            decision = sampling.Decision.RECORD_AND_SAMPLE if "chat" in name else sampling.Decision.DROP
            return sampling.SamplingResult(decision)

        def get_description(self) -> str:
            return "ByName"

    return [
        sampling.ALWAYS_ON,
        sampling.ALWAYS_OFF,
        sampling.ParentBased(sampling.ALWAYS_ON),
        sampling.ParentBased(sampling.ALWAYS_OFF),
        sampling.ParentBased(sampling.TraceIdRatioBased(0.5)),
        sampling.TraceIdRatioBased(0.5),
        sampling.ParentBased(sampling.ALWAYS_OFF, remote_parent_not_sampled=sampling.ALWAYS_ON),
        sampling.ParentBased(ByName(), remote_parent_sampled=ByName()),
        ByName(),
    ]


@pytest.mark.parametrize("sampler", samplers(), ids=lambda s: s.get_description())
def test_each_request_is_sampled_as_the_sdks_sampler_decides(sampler: Any) -> None:
    """The tracer asks a static sampler once for each kind of parent (none, sampled, sampled
    out): its decisions are the SDK's, for every kind of parent and tracestate."""
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from gateway.observability.export import Exporter
    from gateway.observability.otlp import Encoder
    from gateway.observability.tracing import Tracer

    tracer = Tracer(sampler, Exporter(Encoder((), "gateway", "0"), lambda data: True))
    propagator = TraceContextTextMapPropagator()
    parents = [None, b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]
    parents += [b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", b"00-zz-bad"]
    for traceparent in parents:
        for tracestate in (None, b"vendor=1,other=two"):
            for name in ("POST /v1/chat/completions", "POST /v1/embeddings"):
                for _ in range(20):
                    trace = tracer.start(name, traceparent, tracestate)
                    carrier = {}
                    if traceparent is not None and parse_traceparent(traceparent) is not None:
                        carrier["traceparent"] = traceparent.decode()
                        if tracestate is not None:
                            carrier["tracestate"] = tracestate.decode()
                    context = propagator.extract(carrier) if carrier else Context()
                    expected = sampler.should_sample(context, trace.trace_id, name, SpanKind.SERVER)
                    assert trace.sampled is expected.decision.is_sampled(), (traceparent, tracestate, name)
                    state = expected.trace_state.to_header() if expected.trace_state else None
                    assert trace.state == (state or None)


def decoded(value: Any) -> object:
    """An ``AnyValue`` as Python."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(decoded(item) for item in value.array_value.values)
    return getattr(value, kind)


@pytest.mark.parametrize("failed", [False, True])
def test_the_spans_decode_as_opentelemetry_proto_reads_them(failed: bool) -> None:
    """The wire encoding, field by field, read back by the protobuf package: IDs, parents,
    tracestate, times, every attribute (repeated, varying, the request's, the events'),
    status and flags."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from adapters.base import Route
    from gateway.core.exchange import Exchange
    from gateway.core.jsonbody import JsonBody
    from gateway.core.tracecontext import RequestTrace
    from gateway.observability.otlp import Encoder
    from gateway.observability.tracing import request_parameters

    encoder = Encoder((("service.name", "gateway"), ("deployment.environment", "test")), "gateway", "1.2")
    exchanges = []
    for n in range(3):  # the second and third reuse what the first encoded once
        exchange = Exchange(f"req-{n}", Route.CHAT_COMPLETIONS, "POST", "pool")
        exchange.key, exchange.model, exchange.stream = "team-a", "tiny", True
        exchange.status = 502 if failed else 200
        exchange.error = "backend_unreachable" if failed else None
        exchange.ttfb, exchange.duration, exchange.queued = 0.25, 1.5, 0.125
        exchange.prompt_tokens, exchange.completion_tokens, exchange.events = 9, 12 + n, 14
        trace = RequestTrace(
            "POST /v1/chat/completions", 0xABC + n, 0x12, 0x34 + n, 0x56, True, "v=1", 10**18
        )
        trace.operation, trace.provider, trace.replica = "chat", "vllm", "http://10.0.0.7:8000"
        trace.client_start, trace.client_end = exchange.start + 0.125, exchange.start + 1.25
        trace.request = request_parameters(
            JsonBody(b'{"max_tokens": 64, "temperature": 0.5, "stream": true}')
        )
        trace.event(
            exchange.start + 0.125,
            "gateway.queue",
            ("gateway.queue.wait_seconds", 0.125),
            ("gateway.queue.outcome", "dispatched"),
        )
        trace.event(
            exchange.start + 0.25,
            "gateway.attempt",
            ("gateway.attempt", 1),
            ("server.address", "10.0.0.7"),
            ("server.port", 8000),
        )
        trace.head = b'data: {"id":"chatcmpl-%d","object":"chat.completion.chunk","model":"tiny-v2"}' % n
        trace.tail = b'{"finish_reason":"length"}]}\n\ndata: [DONE]\n\n'
        exchange.trace = trace
        exchanges.append(exchange)
    spans = [span for exchange in exchanges for span in encoder.spans(exchange, exchange.trace)]  # type: ignore[arg-type]
    request = ExportTraceServiceRequest.FromString(encoder.request(spans))
    (resource_spans,) = request.resource_spans
    assert {a.key: decoded(a.value) for a in resource_spans.resource.attributes} == {
        "service.name": "gateway",
        "deployment.environment": "test",
    }
    (scope,) = resource_spans.scope_spans
    assert (scope.scope.name, scope.scope.version) == ("gateway", "1.2")
    assert len(scope.spans) == 6
    for n in range(3):
        server, client = scope.spans[2 * n], scope.spans[2 * n + 1]
        assert server.trace_id == client.trace_id == (0xABC + n).to_bytes(16, "big")
        assert server.parent_span_id == (0x12).to_bytes(8, "big")
        assert server.span_id == client.parent_span_id == (0x34 + n).to_bytes(8, "big")
        assert client.span_id == (0x56).to_bytes(8, "big")
        assert server.trace_state == client.trace_state == "v=1"
        assert (server.name, client.name) == ("POST /v1/chat/completions", "chat tiny")
        assert (server.kind, client.kind) == (2, 3)  # SERVER, CLIENT
        assert server.start_time_unix_nano == 10**18
        assert server.end_time_unix_nano == 10**18 + 1_500_000_000
        assert client.start_time_unix_nano == 10**18 + 125_000_000
        assert client.end_time_unix_nano == 10**18 + 1_250_000_000
        assert server.flags == 0x301  # sampled, its parent remote
        assert client.flags == 0x101  # sampled, its parent local
        error = {"error.type": "backend_unreachable"} if failed else {}
        assert {a.key: decoded(a.value) for a in server.attributes} == {
            "http.request.method": "POST",
            "http.route": "/v1/chat/completions",
            "http.response.status_code": 502 if failed else 200,
            "gateway.api_key.name": "team-a",
            "gateway.backend": "pool",
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "tiny",
            "gateway.request_id": f"req-{n}",
            "gateway.queue.wait_seconds": 0.125,
            **error,
        }
        assert {a.key: decoded(a.value) for a in client.attributes} == {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "vllm",
            "gen_ai.request.model": "tiny",
            "gen_ai.request.max_tokens": 64,
            "gen_ai.request.temperature": 0.5,
            "gen_ai.request.stream": True,
            "gen_ai.response.model": "tiny-v2",
            "gen_ai.response.id": f"chatcmpl-{n}",
            "gen_ai.response.finish_reasons": ("length",),
            "gen_ai.usage.input_tokens": 9,
            "gen_ai.usage.output_tokens": 12 + n,
            "gen_ai.response.time_to_first_chunk": 0.125,
            "gateway.time_to_first_byte": 0.25,
            "gateway.stream.events": 14,
            "server.address": "10.0.0.7",
            "server.port": 8000,
            "http.request.method": "POST",
            "http.response.status_code": 502 if failed else 200,
            **error,
        }
        queue, attempt = client.events
        assert (queue.name, queue.time_unix_nano) == ("gateway.queue", 10**18 + 125_000_000)
        assert {a.key: decoded(a.value) for a in queue.attributes} == {
            "gateway.queue.wait_seconds": 0.125,
            "gateway.queue.outcome": "dispatched",
        }
        assert (attempt.name, attempt.time_unix_nano) == ("gateway.attempt", 10**18 + 250_000_000)
        assert {a.key: decoded(a.value) for a in attempt.attributes} == {
            "gateway.attempt": 1,
            "server.address": "10.0.0.7",
            "server.port": 8000,
        }
        assert (server.status.code, client.status.code) == ((2, 2) if failed else (0, 0))
        if failed:
            assert server.status.message == client.status.message == "backend_unreachable"


CHARACTER = st.characters(exclude_categories=["Cs"])
TEXT = st.text(CHARACTER, max_size=300) | st.builds(
    lambda size, character: character * size,
    st.sampled_from([0, 1, 100, 123, 124, 125, 126, 127, 128, 300]),
    CHARACTER,
)
"""Any text UTF-8 can carry, its lengths often near where their sizes take a second byte."""
ANSWER_ID = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters='"\\'), min_size=1
)


@settings(deadline=None)  # a shared machine's pauses are not the encoder's
@given(
    request_id=TEXT,
    key=st.none() | TEXT,
    response_id=ANSWER_ID.filter(lambda text: len(text) <= 256),
    tokens=st.tuples(st.none() | st.integers(0, 2**62), st.none() | st.integers(0, 2**62)),
    times=st.tuples(st.floats(0, 1e6), st.floats(0, 1e6)),
    stream=st.booleans(),
    events=st.integers(0, 2**40),
    tries=st.integers(1, 300),
)
def test_every_value_decodes_as_it_was_recorded(
    request_id: str,
    key: str | None,
    response_id: str,
    tokens: tuple[int | None, int | None],
    times: tuple[float, float],
    stream: bool,
    events: int,
    tries: int,
) -> None:
    """The values that differ from request to request (IDs, counts, times), written with
    what is made once per key, read back by the protobuf package as they were."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from adapters.base import Route
    from gateway.core.exchange import Exchange
    from gateway.core.tracecontext import RequestTrace
    from gateway.observability.otlp import Encoder

    exchange = Exchange(request_id, Route.CHAT_COMPLETIONS, "POST", "pool")
    exchange.key, exchange.model, exchange.stream, exchange.status = key, "m", stream, 200
    exchange.prompt_tokens, exchange.completion_tokens = tokens
    exchange.queued, exchange.ttfb = times
    exchange.duration, exchange.events = times[1] + 1, events
    trace = RequestTrace("POST /v1/chat/completions", 7, 0, 8, 9, True, None, 10**18)
    trace.operation, trace.replica = "chat", "http://10.0.0.7:8000"
    trace.client_start = exchange.start
    trace.event(exchange.start, "gateway.attempt", ("gateway.attempt", tries), ("server.port", 8000))
    trace.head = b'{"id": "%s", "model": "m"}' % response_id.encode()
    exchange.trace = trace
    encoder = Encoder((), "gateway", "1")
    request = ExportTraceServiceRequest.FromString(encoder.request(encoder.spans(exchange, trace)))
    server, client = request.resource_spans[0].scope_spans[0].spans
    attributes = {a.key: decoded(a.value) for a in server.attributes}
    assert attributes["gateway.request_id"] == request_id
    assert attributes.get("gateway.api_key.name") == key
    assert attributes.get("gateway.queue.wait_seconds") == (times[0] or None)
    attributes = {a.key: decoded(a.value) for a in client.attributes}
    assert attributes["gen_ai.response.id"] == response_id
    assert attributes.get("gen_ai.usage.input_tokens") == tokens[0]
    assert attributes.get("gen_ai.usage.output_tokens") == tokens[1]
    assert attributes["gateway.time_to_first_byte"] == times[1]
    assert attributes.get("gateway.stream.events") == (events if stream else None)
    assert ("gen_ai.response.time_to_first_chunk" in attributes) is stream
    (attempt,) = client.events
    assert {a.key: decoded(a.value) for a in attempt.attributes} == {
        "gateway.attempt": tries,
        "server.port": 8000,
    }
