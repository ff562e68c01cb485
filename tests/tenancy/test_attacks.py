"""What one tenant could do to the pod and to the others, each tried as an attacker would: a body
whose shape costs memory, a body that never ends, a body sent after a refusal."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.tenancy.auth import plain_key_name
from tests.conftest import AUTH, OBJECT_SECRET, Fake, Gateway, GatewayFactory, Runtime
from tests.support.calls import CHAT, MiB
from tests.support.fakes import free_port, wait_until
from tests.support.object_fakes import ObjectRuntime
from tests.support.processes import serve, stop
from tests.support.raw import RawClient, Reply, Request, current_rss_kib, peak_rss_kib, raw_backend, response

ROOT = Path(__file__).resolve().parents[2]


def _nested_body(size: int) -> bytes:
    """A chat body padded to ``size`` bytes with empty arrays: the shape that costs a general
    decoder about thirty times its bytes in objects."""
    head, tail = b'{"model": "m", "messages": [], "pad": [', b"[]]}"
    return head + b"[]," * ((size - len(head) - len(tail)) // 3) + tail


def test_a_json_body_costs_its_bytes_whatever_its_shape() -> None:
    body = _nested_body(15 * MiB)
    with raw_backend(lambda request: Reply(response(200, b'{"ok": true}'), close=True)) as backend:
        process, url = serve("--backend-url", backend.url, "--api-key", "sk-test-1")
        try:
            before = current_rss_kib(process.pid)
            headers = {**AUTH, "content-type": "application/json"}
            answer = httpx.post(url + CHAT, content=body, headers=headers, timeout=60)
            assert answer.status_code == 200
            # The body is held (read, then forwarded); the document is never built (it was
            # ~30 times the body, 450 MiB here).
            assert peak_rss_kib(process.pid) - before < 4 * 15 * 1024
        finally:
            stop(process)


def test_json_bodies_have_a_cap_below_the_uploads(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], max_json_bytes=1000)
    answer = httpx.post(gateway.url + CHAT, content=_nested_body(2000), headers=AUTH)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"


def test_invalid_utf8_in_a_skipped_field_is_still_refused(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"])
    answer = httpx.post(gateway.url + CHAT, content=b'{"model": "m", "pad": "\xff\xfe"}', headers=AUTH)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_json"


def _trickle(client: RawClient, every: float, until: float) -> bool:
    """One byte every ``every`` seconds; True if the gateway closed before ``until``."""
    while time.monotonic() < until:
        if not client.send(b" ") or client.is_closed_by_peer(every):
            return True
    return False


def test_a_body_trickled_byte_by_byte_is_cut_at_the_body_deadline(start_gateway: GatewayFactory) -> None:
    with raw_backend(lambda request: Reply(response(200, b"{}"))) as backend:
        gateway = start_gateway(
            api_keys=["sk-test-1"], backend_url=backend.url, client_body_timeout=1, client_body_deadline=2
        )
        with RawClient(gateway.url) as client:
            head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-test-1\r\n"
            client.send(head + b"content-length: 100000\r\n\r\n{")
            started = time.monotonic()
            # Each byte comes well within the body timeout; the whole body never does.
            client.sock.settimeout(0.3)
            chunks = []
            while time.monotonic() - started < 8:
                if not client.send(b" "):
                    break
                try:
                    data = client.sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                chunks.append(data)
            answer = b"".join(chunks)
            assert time.monotonic() - started < 4
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert b"within 2 s" in answer


def test_the_rest_of_a_refused_body_has_a_body_timeout_in_all(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], client_body_timeout=1)
    with RawClient(gateway.url) as client:
        # No key: 401 at once, with most of the declared body still to come.
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n{")
        client.sock.settimeout(5)
        assert client.sock.recv(65536).startswith(b"HTTP/1.1 401 ")
        answered = time.monotonic()
        assert _trickle(client, 0.2, answered + 6)
        assert time.monotonic() - answered < 2.5


# Tokens that escaped the limits


def _stream_without_usage(events: int) -> bytes:
    """A chat stream as vLLM sends it when no usage is asked for: an event a token, no usage."""
    chunk = (
        b'data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
    )
    return chunk * events + b"data: [DONE]\n\n"


def _sse(body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
    return head % len(body) + body


STREAM = {"model": "m", "messages": [{"role": "user", "content": "go on"}], "stream": True}


def test_a_stream_without_usage_is_charged_what_it_generated(start_gateway: GatewayFactory) -> None:
    with raw_backend(lambda request: Reply(_sse(_stream_without_usage(3000)))) as backend:
        gateway = start_gateway(
            api_keys=["sk-test-1"],
            backend_url=backend.url,
            token_limit="10000/minute",
            default_max_tokens=100,
        )
        statuses = [httpx.post(gateway.url + CHAT, json=STREAM, headers=AUTH).status_code for _ in range(5)]
        # 3,000 tokens each: after four, no room is left (held at ~120 each, all five went).
        assert statuses == [200, 200, 200, 200, 429]


def test_an_overdraft_is_carried_into_the_next_window(start_gateway: GatewayFactory) -> None:
    with raw_backend(lambda request: Reply(_sse(_stream_without_usage(5000)))) as backend:
        gateway = start_gateway(
            api_keys=["sk-test-1"],
            backend_url=backend.url,
            token_limit="2000/3 seconds",
            default_max_tokens=100,
        )
        assert httpx.post(gateway.url + CHAT, json=STREAM, headers=AUTH).status_code == 200
        time.sleep(3.5)
        # 5,000 generated against 2,000 a window: the next window begins 3,000 down.
        refused = httpx.post(gateway.url + CHAT, json=STREAM, headers=AUTH)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "tokens"


def test_every_output_limit_a_runtime_reads_is_reserved(start_gateway: GatewayFactory) -> None:
    with raw_backend(lambda request: Reply(response(200, b"{}"))) as backend:
        gateway = start_gateway(
            api_keys=["sk-test-1"], backend_url=backend.url, backend="llamacpp", token_limit="2000/minute"
        )
        body = {"model": "m", "max_tokens": 1, "n_predict": 9000}
        answer = httpx.post(gateway.url + CHAT, json=body, headers=AUTH)
        assert answer.status_code == 429
        assert "9" in answer.json()["error"]["message"]
        assert [r for r in backend.requests if not r.own] == []


def test_work_out_of_the_gateways_sight_is_refused_to_a_token_limited_key(
    start_gateway: GatewayFactory,
) -> None:
    with raw_backend(lambda request: Reply(response(200, b"{}"))) as backend:
        gateway = start_gateway(
            api_keys=["sk-test-1"], backend_url=backend.url, backend="basert", token_limit="2000/minute"
        )
        batch = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        answer = httpx.post(gateway.url + "/v1/batches", json=batch, headers=AUTH)
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "tokens_unaccountable"
        background = {"model": "m", "input": "hi", "background": True, "max_output_tokens": 10}
        answer = httpx.post(gateway.url + "/v1/responses", json=background, headers=AUTH)
        assert answer.status_code == 403
        assert "background" in answer.json()["error"]["message"]
        assert [r for r in backend.requests if not r.own] == []


# Identities that changed hands


def test_a_revoked_key_hands_nothing_to_the_next(
    start_gateway: GatewayFactory, objects: tuple[ObjectRuntime, str]
) -> None:
    _, url = objects
    keys = ["sk-one", "sk-two", "sk-three"]
    before = start_gateway(backend="openai", backend_url=url, api_keys=keys)
    uploaded = httpx.post(
        before.url + "/v1/files",
        files={"file": ("in.jsonl", b"{}\n")},
        data={"purpose": "batch"},
        headers={"authorization": "Bearer sk-two"},
    )
    assert uploaded.status_code == 200
    file_id = uploaded.json()["id"]
    # The same gateway after a restart without key two: key three is not who key two was.
    after = start_gateway(backend="openai", backend_url=url, api_keys=["sk-one", "sk-three"])
    read = httpx.get(after.url + f"/v1/files/{file_id}", headers={"authorization": "Bearer sk-three"})
    assert read.status_code == 404
    assert plain_key_name("sk-three") != plain_key_name("sk-two")


def _refused(*args: str) -> str:
    """The gateway's own words when it refuses to start with ``args``."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    return done.stderr


def test_settings_that_would_leak_between_tenants_are_refused_at_start(fake: Fake, tmp_path: Path) -> None:
    keys = ("--backend-url", fake.url, "--api-key", "sk-a", "--api-key", "sk-b")
    # IDs sealed with a secret of the process's own would die with it.
    assert "--object-secret" in _refused(*keys)
    # The shipped manifests' placeholder, or anything short, seals nothing.
    shipped = yaml.safe_load((ROOT / "deploy/kubernetes/base/secret.yaml").read_text())
    placeholder = shipped["stringData"]["object-secret"]
    assert "placeholder" in _refused(*keys, "--object-secret", placeholder)
    assert "placeholder" in _refused(*keys, "--object-secret", "short")
    # Workers counting limits each in their own memory would multiply them.
    one_key = ("--backend-url", fake.url, "--api-key", "sk-a")
    assert "Redis" in _refused(*one_key, "--workers", "2", "--rate-limit", "10/minute")
    assert "Redis" in _refused(*keys, "--object-secret", OBJECT_SECRET, "--workers", "2")


# Model allowlists on uploads


def _models_or_ok(request: Request) -> Reply:
    if request.target.startswith(b"/v1/models"):
        listed = b'{"object": "list", "data": [{"id": "allowed-a", "object": "model"}, {"id": "secret-b"}]}'
        return Reply(response(200, listed))
    return Reply(response(200, b'{"text": "ok"}'))


def _form(*parts: tuple[bytes, bytes]) -> bytes:
    body = b"".join(
        b"--b\r\nContent-Disposition: form-data; " + head + b"\r\n\r\n" + value + b"\r\n"
        for head, value in parts
    )
    return body + b"--b--\r\n"


def _limited_gateway(start_gateway: GatewayFactory, tmp_path: Path, url: str) -> str:
    keys = tmp_path / "keys.yaml"
    keys.write_text('keys:\n  - name: limited\n    key: sk-limited\n    models: ["allowed-*"]\n')
    return start_gateway(api_keys=[], keys_file=str(keys), backend="vllm", backend_url=url).url


def test_an_upload_cannot_name_a_model_twice_or_in_a_way_the_gateway_skips(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    with raw_backend(_models_or_ok) as backend:
        url = _limited_gateway(start_gateway, tmp_path, backend.url)
        headers = {"authorization": "Bearer sk-limited", "content-type": "multipart/form-data; boundary=b"}
        audio = (b'name="file"; filename="a.wav"', b"RIFF" + b"\0" * 5000)

        def send(body: bytes) -> httpx.Response:
            return httpx.post(url + "/v1/audio/transcriptions", content=body, headers=headers, timeout=10)

        # Allowed first, forbidden second: a form parser that takes the last would serve it.
        twice = send(_form((b'name="model"', b"allowed-a"), audio, (b'name="model"', b"secret-b")))
        assert twice.status_code == 400
        assert twice.json()["error"]["code"] == "ambiguous_form"
        # Unquoted, as python-multipart also reads it.
        bare = send(_form((b"name=model", b"secret-b"), audio))
        assert bare.status_code == 404
        assert bare.json()["error"]["code"] == "model_not_found"
        # An upload is streamed: the first bytes of the refused one went, the whole never did.
        whole = [
            r for r in backend.requests if not r.own and len(r.body) == int(r.header(b"content-length") or 0)
        ]
        assert whole == []
        assert send(_form((b'name="model"', b"allowed-a"), audio)).status_code == 200


def test_a_name_the_key_may_use_must_still_be_one_the_runtime_serves(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    with raw_backend(_models_or_ok) as backend:
        url = _limited_gateway(start_gateway, tmp_path, backend.url)
        headers = {"authorization": "Bearer sk-limited"}
        unknown = httpx.post(url + CHAT, json={"model": "allowed-zzz"}, headers=headers)
        assert unknown.status_code == 404
        assert [r for r in backend.requests if not r.own] == []
        assert httpx.post(url + CHAT, json={"model": "allowed-a"}, headers=headers).status_code == 200


# Smaller leaks


def test_a_backends_own_gateway_header_never_reaches_the_client(start_gateway: GatewayFactory) -> None:
    forged = response(200, b"{}", (("x-gateway-backend", "admin-pool"), ("x-request-id", "theirs")))
    with raw_backend(lambda request: Reply(forged)) as backend:
        gateway = start_gateway(api_keys=["sk-test-1"], backend_url=backend.url)
        answer = httpx.post(gateway.url + CHAT, json={"model": "m"}, headers=AUTH)
        assert answer.status_code == 200
        assert answer.headers.get_list("x-gateway-backend") == ["openai"]
        assert answer.headers.get_list("x-request-id") != ["theirs"]


def test_a_list_after_an_id_in_any_spelling_is_unsealed_or_refused(
    start_gateway: GatewayFactory, objects: tuple[ObjectRuntime, str]
) -> None:
    runtime, url = objects
    gateway = start_gateway(backend="openai", backend_url=url, api_keys=["sk-one", "sk-two"])
    for query in ("%61fter=file-0001", "after=file-0001", "%61fter=file-0001&after=x"):
        answer = httpx.get(gateway.url + "/v1/files?" + query, headers={"authorization": "Bearer sk-one"})
        assert answer.status_code == 404, query
    # The raw ID never reached the runtime (the gateway's own model list reads aside).
    assert [r for r in runtime.requests if r[1].startswith("/v1/files")] == []


def test_an_answer_too_large_to_seal_is_never_sent_unsealed(
    start_gateway: GatewayFactory, objects: tuple[ObjectRuntime, str]
) -> None:
    _, url = objects
    gateway = start_gateway(
        backend="openai", backend_url=url, api_keys=["sk-one", "sk-two"], backend_max_read_bytes=1024
    )
    answer = httpx.post(
        gateway.url + "/v1/files",
        files={"file": ("x" * 2000 + ".jsonl", b"{}\n")},
        data={"purpose": "batch"},
        headers={"authorization": "Bearer sk-one"},
    )
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "answer_too_large"
    assert b"file-0001" not in answer.content


def test_a_backend_key_rotated_in_the_backends_file_is_used_after_sighup(tmp_path: Path) -> None:
    with raw_backend(_models_or_ok) as backend:
        path = tmp_path / "backends.yaml"
        entry = {"name": "only", "kind": "vllm", "url": backend.url}
        path.write_text(yaml.safe_dump({"backends": [{**entry, "api_key": "backend-key-old"}]}))
        process, url = serve("--backends", str(path), "--api-key", "sk-test-1", "--no-access-log")
        try:

            def sent_key() -> bytes | None:
                answer = httpx.post(url + CHAT, json={"model": "allowed-a"}, headers=AUTH, timeout=10)
                assert answer.status_code == 200
                return [r for r in backend.requests if not r.own][-1].header(b"authorization")

            assert sent_key() == b"Bearer backend-key-old"
            path.write_text(yaml.safe_dump({"backends": [{**entry, "api_key": "backend-key-new"}]}))
            process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: sent_key() == b"Bearer backend-key-new", timeout=10)
        finally:
            stop(process)


def test_a_backend_listing_a_model_another_serves_takes_none_of_it_unless_declared(
    runtimes: Callable[..., Runtime], fleet_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    owner, owner_url = runtimes("owner", ["m"])
    stray, stray_url = runtimes("stray", ["m", "other"])
    gateway = fleet_gateway([{"name": "owner", "url": owner_url}, {"name": "stray", "url": stray_url}])
    for _ in range(12):
        answer = httpx.post(gateway.url + CHAT, json={"model": "m"}, headers=AUTH, timeout=10)
        assert answer.headers["x-gateway-backend"] == "owner"
    assert (owner.count(CHAT), stray.count(CHAT)) == (12, 0)
    assert "the stray backend lists the model 'm', which the owner backend serves" in caplog.text
    # Its own models still go to it.
    answer = httpx.post(gateway.url + CHAT, json={"model": "other"}, headers=AUTH, timeout=10)
    assert answer.headers["x-gateway-backend"] == "stray"


def test_metrics_on_the_main_port_are_closed_to_client_keys_by_default(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(api_keys=["sk-test-1"], admin_api_keys=["sk-admin"], metrics_public=False)
    httpx.post(gateway.url + CHAT, json={"model": "fake-model"}, headers=AUTH)
    for headers in ({}, AUTH, {"x-api-key": "sk-test-1"}):
        refused = httpx.get(gateway.url + "/metrics", headers=headers)
        assert refused.status_code == 401
        assert b"key-" not in refused.content
    page = httpx.get(gateway.url + "/metrics", headers={"authorization": "Bearer sk-admin"})
    assert page.status_code == 200
    assert plain_key_name("sk-test-1") in page.text
    # Opened on purpose, or with no client keys at all, it is open.
    assert (
        httpx.get(start_gateway(api_keys=["sk-test-1"], metrics_public=True).url + "/metrics").status_code
        == 200
    )
    assert httpx.get(start_gateway(metrics_public=False).url + "/metrics").status_code == 200


def test_idle_sockets_never_blind_the_metrics_port(fake: Fake) -> None:
    port = free_port()
    process, _ = serve("--backend-url", fake.url, "--metrics-port", str(port), "--no-access-log")
    try:
        # More idle sockets than the port holds, kept open past a scrape.
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        try:
            for _ in range(3):
                assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=3).status_code == 200
        finally:
            for sock in idle:
                sock.close()
    finally:
        stop(process)


def test_the_files_a_prompt_names_are_unsealed_for_their_owner_only(
    start_gateway: GatewayFactory, objects: tuple[ObjectRuntime, str]
) -> None:
    runtime, url = objects
    gateway = start_gateway(backend="openai", backend_url=url, api_keys=["sk-one", "sk-two"])
    one, two = {"authorization": "Bearer sk-one"}, {"authorization": "Bearer sk-two"}
    files = {"file": ("doc.pdf", b"%PDF-1.4")}
    sealed = httpx.post(gateway.url + "/v1/files", files=files, data={"purpose": "user_data"}, headers=one)
    file_id = sealed.json()["id"]
    raw = file_id.split(".")[0]

    def chat(headers: dict[str, str], reference: str, key: bytes = b"file_id") -> httpx.Response:
        part = b'{"type": "file", "file": {"' + key + b'": "' + reference.encode() + b'"}}'
        body = b'{"model": "m", "messages": [{"role": "user", "content": [' + part + b"]}]}"
        return httpx.post(
            gateway.url + CHAT, content=body, headers={**headers, "content-type": "application/json"}
        )

    assert chat(one, file_id).status_code == 200
    assert runtime.chats[-1]["messages"][0]["content"][0]["file"]["file_id"] == raw
    sent = len(runtime.chats)
    # Another key's sealed ID, the runtime's own ID guessed, or the key hidden behind escapes.
    for headers, reference, key in (
        (two, file_id, b"file_id"),
        (two, raw, b"file_id"),
        (one, raw, b"file_id"),
    ):
        refused = chat(headers, reference, key)
        assert refused.status_code == 404, refused.text
    hidden = chat(two, raw, b"fil\\u0065_id")
    assert hidden.status_code == 400
    assert len(runtime.chats) == sent
