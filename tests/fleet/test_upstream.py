"""The door to the backend (gateway/fleet/upstream.py): its pool owned by the lifespan, the client's
errors mapped to the gateway's before the first byte.
"""

from __future__ import annotations

import httpx
import pytest

from gateway.app import create_app
from gateway.config.settings import Settings
from tests.conftest import Fake, GatewayFactory
from tests.support.calls import error_of
from tests.support.fakes import free_port, wait_until


def test_unreachable_backend_is_502(start_gateway: GatewayFactory) -> None:
    for url in (f"http://127.0.0.1:{free_port()}", "http://backend.invalid:8000"):
        gateway = start_gateway(backend_url=url)
        response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "m"})
        assert response.status_code == 502
        assert error_of(response)["type"] == "backend_unreachable"
        assert response.headers["x-request-id"]


def test_no_first_byte_in_time_is_504(start_gateway: GatewayFactory, fake: Fake) -> None:
    gateway = start_gateway(backend_timeout=0.3)
    response = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "slow"})
    assert response.status_code == 504
    assert error_of(response)["type"] == "backend_timeout"
    assert wait_until(fake.seen.cancelled.is_set, timeout=2.0)


async def test_lifespan_owns_the_upstream_pool(fake: Fake) -> None:
    app = create_app(Settings(backend_url=fake.url))
    upstream = app.state.upstream
    async with app.router.lifespan_context(app):
        pool = upstream.pool
        assert not pool.closed
    assert pool.closed
    with pytest.raises(RuntimeError, match="lifespan"):
        _ = upstream.pool
