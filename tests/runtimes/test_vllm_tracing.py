"""One trace from the client through the gateway into a real vLLM (its CPU build), started
with ``--otlp-traces-endpoint`` as its docs say, and exporting to a receiver in the test.

A vLLM of its own (about a minute to start), so that the other modules' runtimes run as
users run them, untraced.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.support.otlp_receiver import Receiver
from tests.support.vllm_server import MODEL_NAME, TinyModel, VllmServer, make_model, start_vllm, stop_vllm

pytestmark = pytest.mark.vllm

KEY = "sk-test-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return make_model(tmp_path_factory.mktemp("vllm-model"))


@pytest.fixture(scope="module")
def collector() -> Iterator[Receiver]:
    """The OTLP receiver vLLM exports its spans to (and the gateway, its own)."""
    running = Receiver().start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def vllm(
    tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory, collector: Receiver
) -> Iterator[VllmServer]:
    # Traced as its docs say: --otlp-traces-endpoint (and its protocol, gRPC unless told).
    server = start_vllm(
        tiny,
        tmp_path_factory.mktemp("vllm-log") / "vllm.log",
        "--otlp-traces-endpoint",
        collector.url + "/v1/traces",
        env={"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "200"},
    )
    yield server
    stop_vllm(server)


def test_vllms_span_is_a_child_of_the_gateways_in_one_trace(
    start_gateway: GatewayFactory, vllm: VllmServer, collector: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's trace, the gateway's two spans and vLLM's own, at one collector."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    gateway = start_gateway(backend="vllm", backend_url=vllm.url, api_keys=[KEY])
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    answer = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": CHAT, "max_tokens": 8, "temperature": 0},
        headers={**AUTH, "traceparent": f"00-{trace_id}-{parent}-01"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    found = collector.trace(trace_id, count=3, within=30)
    ours = {s.kind: s for s in found if s.resource.get("service.name") == "inference-gateway"}
    theirs = [s for s in found if s.resource.get("service.name") != "inference-gateway"]
    assert len(found) == 3, found
    assert len(theirs) == 1, found
    server, client, runtime = ours["SPAN_KIND_SERVER"], ours["SPAN_KIND_CLIENT"], theirs[0]
    assert server.parent_id == parent
    assert client.parent_id == server.span_id
    assert runtime.parent_id == client.span_id  # vLLM continued the gateway's trace
    assert runtime.name == "llm_request"
    usage = answer.json()["usage"]
    attributes = client.attributes
    assert attributes["gen_ai.provider.name"] == "vllm"
    assert attributes["gen_ai.response.model"] == MODEL_NAME
    assert attributes["gen_ai.request.max_tokens"] == 8
    assert attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attributes["gen_ai.response.finish_reasons"] == [answer.json()["choices"][0]["finish_reason"]]
    assert runtime.attributes["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert client.span.start_time_unix_nano <= runtime.span.start_time_unix_nano
    # A sampled-out client: vLLM is told so and records nothing either.
    dropped = "1bf92f3577b34da6a3ce929d0e0e4737"
    quiet = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": CHAT, "max_tokens": 4},
        headers={**AUTH, "traceparent": f"00-{dropped}-{parent}-00"},
        timeout=120,
    )
    assert quiet.status_code == 200
    later = "2bf92f3577b34da6a3ce929d0e0e4738"
    httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": CHAT, "max_tokens": 4},
        headers={**AUTH, "traceparent": f"00-{later}-{parent}-01"},
        timeout=120,
    )
    assert len(collector.trace(later, count=3, within=30)) == 3
    assert collector.trace(dropped, within=0) == []
    assert b"how are you today" not in collector.raw()
