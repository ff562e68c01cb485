"""CORS: preflights answered without a key, headers exposed, backends' own CORS headers
dropped; and a real browser (headless Chromium) streaming a chat completion from a page of
another origin."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config.settings import Settings
from tests.conftest import AUTH, GatewayFactory
from tests.support.raw import JSON_OK, RawBackend, Reply

ORIGIN = "https://app.example.com"
CHAT = "/v1/chat/completions"


def preflight(url: str, origin: str, headers: str = "authorization, content-type") -> httpx.Response:
    return httpx.options(
        url + CHAT,
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": headers,
        },
        timeout=10,
    )


def test_a_preflight_from_an_allowed_origin_needs_no_key(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], cors_origins=[ORIGIN])
    answer = preflight(gateway.url, ORIGIN, "authorization, content-type, x-stainless-os")
    assert answer.status_code == 204
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in answer.headers["access-control-allow-methods"]
    assert answer.headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    assert "Origin" in answer.headers["vary"]
    refused = preflight(gateway.url, "https://evil.example")
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers
    # A header list that is not one is not echoed.
    odd = preflight(gateway.url, ORIGIN, "x y;z")
    assert "access-control-allow-headers" not in odd.headers


def test_answers_to_an_allowed_origin_carry_cors_headers(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], cors_origins=[ORIGIN], rate_limit="100/minute")
    answer = httpx.post(
        gateway.url + CHAT, json={"model": "m"}, headers={**AUTH, "origin": ORIGIN}, timeout=10
    )
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    exposed = answer.headers["access-control-expose-headers"]
    for name in ("x-request-id", "x-ratelimit-remaining-requests", "retry-after"):
        assert name in exposed
    # Errors the gateway answers itself too (the browser app must be able to read them).
    denied = httpx.post(gateway.url + CHAT, json={"model": "m"}, headers={"origin": ORIGIN}, timeout=10)
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.post(
        gateway.url + CHAT, json={"model": "m"}, headers={**AUTH, "origin": "https://x.example"}
    )
    assert "access-control-allow-origin" not in other.headers


def test_a_backends_own_cors_headers_are_replaced(start_gateway: GatewayFactory) -> None:
    head, _, body = JSON_OK.partition(b"\r\n\r\n")
    reply = (
        head + b"\r\naccess-control-allow-origin: *\r\naccess-control-allow-credentials: true\r\n\r\n" + body
    )
    backend = RawBackend(lambda request: Reply(reply))
    try:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url, cors_origins=[ORIGIN])
        answer = httpx.post(gateway.url + CHAT, json={"model": "m"}, headers={**AUTH, "origin": ORIGIN})
        assert answer.headers.get_list("access-control-allow-origin") == [ORIGIN]
        assert "access-control-allow-credentials" not in answer.headers
        plain = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        passed = httpx.post(plain.url + CHAT, json={"model": "m"}, headers={**AUTH, "origin": ORIGIN})
        assert passed.headers["access-control-allow-origin"] == "*"  # no CORS set: untouched
    finally:
        backend.close()


def test_without_cors_origins_a_preflight_is_not_answered(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"])
    answer = preflight(gateway.url, ORIGIN)
    assert answer.status_code == 405
    assert "access-control-allow-origin" not in answer.headers


def test_any_origin_and_credentials_do_not_go_together() -> None:
    with pytest.raises(ValueError, match="cannot go with --cors-credentials"):
        Settings(cors_origins=["*"], cors_credentials=True)
    with pytest.raises(ValueError, match="a scheme and a host"):
        Settings(cors_origins=["app.example.com/path"])
    assert Settings(cors_origins="https://a.example, https://b.example").cors_origins == [
        "https://a.example",
        "https://b.example",
    ]


# A real browser


PAGE = """<!doctype html>
<html><body><pre id="out">pending</pre>
<script>
(async () => {
  const out = document.getElementById("out");
  try {
    const answer = await fetch("GATEWAY/v1/chat/completions", {
      method: "POST",
      headers: {"Authorization": "Bearer sk-test-1", "Content-Type": "application/json",
                "x-stainless-lang": "js"},
      body: JSON.stringify({model: "fake-model", stream: true,
                            messages: [{role: "user", content: "hi"}]}),
    });
    const reader = answer.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      text += decoder.decode(value, {stream: true});
    }
    out.textContent = "status=" + answer.status + " request-id=" + answer.headers.get("x-request-id")
      + "\\n" + text;
  } catch (error) {
    out.textContent = "failed: " + error;
  }
})();
</script></body></html>
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is installed by `make test` (make system-packages)"
    return found


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


def test_a_browser_streams_a_chat_completion_from_another_origin(
    start_gateway: GatewayFactory, chromium: str, page_server: tuple[str, Path], tmp_path: Path
) -> None:
    origin, directory = page_server
    gateway = start_gateway(api_keys=["sk-test-1"], cors_origins=[origin])
    (directory / "index.html").write_text(PAGE.replace("GATEWAY", gateway.url))

    def browse(page: str = "index.html") -> str:
        result = subprocess.run(
            [
                chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom",
                f"{origin}/{page}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        return result.stdout

    dom = browse()
    assert "status=200" in dom, dom[-2000:]
    assert "request-id=" in dom
    assert "request-id=null" not in dom  # an exposed header
    for word in ("Hello", "friend"):
        assert word in dom
    assert "[DONE]" in dom
    # The same page from an origin the gateway does not allow: the browser blocks it.
    other = start_gateway(api_keys=["sk-test-1"], cors_origins=["https://elsewhere.example"])
    # A page of its own: the first one, rewritten within the same second, would be answered 304
    # (its Last-Modified has one-second steps) and the browser would run its cached copy.
    (directory / "other.html").write_text(PAGE.replace("GATEWAY", other.url))
    assert "failed: TypeError" in browse("other.html")
