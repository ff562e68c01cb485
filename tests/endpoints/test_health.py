"""Liveness and readiness of one backend (gateway/endpoints/health.py); a fleet's readiness is in
test_routing."""

from __future__ import annotations

import httpx

from tests.conftest import Fake, Gateway, GatewayFactory
from tests.support.calls import error_of
from tests.support.fakes import free_port, wait_until


def test_health_needs_no_key(gateway: Gateway) -> None:
    response = httpx.get(gateway.url + "/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_follows_the_backend(gateway: Gateway, fake: Fake) -> None:
    assert httpx.get(gateway.url + "/ready").status_code == 200
    fake.backend.models_status = 500
    # /ready answers from a probe at most a second old.
    assert wait_until(lambda: httpx.get(gateway.url + "/ready").status_code == 503, timeout=5)
    response = httpx.get(gateway.url + "/ready")
    assert response.status_code == 503
    assert error_of(response)["type"] == "backend_unavailable"


def test_ready_is_503_when_the_backend_is_down(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(backend_url=f"http://127.0.0.1:{free_port()}")
    response = httpx.get(gateway.url + "/ready")
    assert response.status_code == 503
    assert error_of(response)["type"] == "backend_unreachable"
    assert httpx.get(gateway.url + "/health").status_code == 200
