"""``/openapi.json`` and ``/docs``: the document as configured validates, Swagger UI renders it
in a real browser from bundled assets, and schemathesis finds nothing of the gateway's own
that breaks it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import Gateway, GatewayFactory
from tests.support.fakes import LoopThread, start_fake
from tests.support.runtime_fakes import RuntimeFake

KEY = "sk-client"
ADMIN = "sk-admin"


def spec_of(gateway: Gateway) -> dict[str, Any]:
    response = httpx.get(gateway.url + "/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    validate(document)
    return document


def test_the_document_lists_only_what_the_runtime_serves(start_gateway: GatewayFactory) -> None:
    tgi = spec_of(start_gateway(backend="tgi", api_keys=[KEY]))
    assert tgi["openapi"].startswith("3.1")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}"} <= set(
        tgi["paths"]
    )
    assert "/v1/embeddings" not in tgi["paths"]  # TGI has none: 501
    assert "/v1/files" not in tgi["paths"]
    assert not any(path.startswith("/admin") for path in tgi["paths"])
    chat = tgi["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["responses"]["501"] == {"$ref": "#/components/responses/501"}
    assert tgi["security"] == [{"bearer": []}, {"apiKey": []}]
    assert tgi["components"]["securitySchemes"]["apiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
    }
    error = tgi["components"]["schemas"]["Error"]["properties"]["error"]
    assert "backend_unreachable" in error["properties"]["type"]["examples"]


def test_admin_routes_appear_with_admin_keys_and_security_without_keys(start_gateway: GatewayFactory) -> None:
    seed = spec_of(start_gateway(backend="basert", api_keys=[KEY], admin_api_keys=[ADMIN]))
    load = seed["paths"]["/v1/models/load"]["post"]
    assert load["tags"] == ["admin"]
    assert load["requestBody"]["content"]["application/json"]["schema"]["required"] == ["model"]
    upload = seed["paths"]["/v1/files"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload
    assert {"get", "post"} == set(seed["paths"]["/v1/files"])
    open_gateway = spec_of(start_gateway(backend="basert"))
    assert open_gateway["security"] == []
    assert "/v1/models/load" not in open_gateway["paths"]


def test_docs_are_served_from_bundled_assets_and_can_be_switched_off(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=[KEY])
    page = httpx.get(gateway.url + "/docs")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert "//" not in page.text.replace("<!doctype", "")  # nothing from another host
    script = httpx.get(gateway.url + "/docs/swagger-ui-bundle.js")
    assert script.status_code == 200
    assert "SwaggerUIBundle" in script.text
    assert httpx.get(gateway.url + "/docs/..%2Fsettings.py").status_code == 404
    assert httpx.get(gateway.url + "/docs/index.html").status_code == 404
    assert httpx.get(gateway.url + "/redoc", follow_redirects=True).text == page.text
    off = start_gateway(api_keys=[KEY], docs=False)
    for path in ("/openapi.json", "/docs", "/docs/swagger-ui.css", "/redoc"):
        assert httpx.get(off.url + path).status_code == 404, path


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is installed by `make test` (make system-packages)"
    return found


def test_a_browser_renders_the_routes(start_gateway: GatewayFactory, chromium: str, tmp_path: Path) -> None:
    gateway = start_gateway(backend="vllm", api_keys=[KEY])
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
              "--window-size=1280,2000"]  # fmt: skip
    shot = tmp_path / "docs.png"
    subprocess.run([*common, f"--screenshot={shot}", gateway.url + "/docs"], capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    dom = subprocess.run(
        [*common, "--dump-dom", gateway.url + "/docs"], capture_output=True, text=True, timeout=120
    ).stdout
    assert "opblock-summary-path" in dom, dom[-2000:]  # Swagger UI drew its operations
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/score", "/ready"):
        assert f'data-path="{path}"' in dom, path
    assert 'data-path="/v1/audio/speech"' not in dom  # vLLM has none


@pytest.fixture
def seed_gateway(loop_thread: LoopThread, start_gateway: GatewayFactory) -> Iterator[Gateway]:
    fake = RuntimeFake("basert")
    runner, port = loop_thread.run(start_fake(fake))  # type: ignore[arg-type]
    yield start_gateway(
        backend="basert", backend_url=f"http://127.0.0.1:{port}", api_keys=[KEY], admin_api_keys=[ADMIN]
    )
    loop_thread.run(runner.cleanup())


def test_schemathesis_finds_no_gateway_fault(seed_gateway: Gateway) -> None:
    """Generated requests for every route: no 500 of the gateway's own, and every answer the
    gateway makes itself (its envelope, 4xx and 5xx) matches the document."""
    document = spec_of(seed_gateway)
    schema = schemathesis.openapi.from_dict(document)
    faults: list[str] = []
    answered: dict[str, int] = {}
    for result in schema.get_all_operations():
        api = result.ok()  # type: ignore[union-attr]

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=api.as_strategy())
        def check(case: Any) -> None:
            key = ADMIN if "admin" in (case.operation.tags or []) else KEY
            response = case.call(base_url=seed_gateway.url, headers={"x-api-key": key}, timeout=10)
            where = f"{case.method} {case.formatted_path}"
            answered[case.operation.label] = answered.get(case.operation.label, 0) + 1
            if response.status_code >= 500 and b"internal_error" in response.content:
                faults.append(f"{where}: {response.status_code} {response.content[:200]!r}")
            if "x-gateway-backend" not in response.headers:  # an answer of the gateway's own
                try:
                    case.validate_response(response, checks=[response_schema_conformance])
                except Exception as exc:
                    faults.append(f"{where}: {str(exc)[:300]}")

        check()
    assert faults == []
    assert len(answered) == len(document["paths"]) + sum(
        len(methods) - 1 for methods in document["paths"].values()
    )
    assert sum(answered.values()) > 10 * len(answered), answered
