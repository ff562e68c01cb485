"""``gateway serve`` as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config.flags import FLAG_NAMES, NOT_FLAGS
from gateway.config.settings import Settings
from gateway.main import build_parser, load_settings, parse_flags
from tests.conftest import Fake
from tests.support.processes import serve, stop


def run_gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_help_explains_every_setting() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr,index]
    for name in Settings.model_fields.keys() - NOT_FLAGS:
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        assert flag in help_text, flag
    for env in ("API_KEYS", "ADMIN_API_KEYS", "BACKEND_URL", "BACKEND_API_KEY", "GATEWAY_MAX_BODY_BYTES"):
        assert env in help_text


def test_the_embedded_backends_own_flags_pass_through() -> None:
    command, flags = parse_flags(
        ["serve", "--backend", "vllm", "--model", "m", "--backend-arg=--enforce-eager",
         "--", "--dtype", "bfloat16", "--port", "9"]
    )  # fmt: skip
    assert command == "serve"
    settings = load_settings(flags)
    assert settings.backend_args == ["--enforce-eager", "--dtype", "bfloat16", "--port", "9"]
    assert settings.port == 8000  # a flag after -- is the backend's, not the gateway's


def test_console_help_runs() -> None:
    result = run_gateway("serve", "--help")
    assert result.returncode == 0
    assert "--backend-url" in result.stdout


def test_refuses_public_address_without_keys() -> None:
    result = run_gateway("serve", "--host", "0.0.0.0", "--backend-url", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "--no-auth" in result.stderr


def test_invalid_setting_is_explained() -> None:
    result = run_gateway("serve", "--port", "nope", "--backend-url", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "port" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def served(fake: Fake) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    process, url = serve(
        "--api-key", "sk-cli", env={"BACKEND_URL": fake.url + "/v1", "GATEWAY_LOG_LEVEL": "info"}
    )
    yield process, url
    stop(process, signal.SIGKILL)


def test_serves_and_stops_cleanly_on_sigterm(served: tuple[subprocess.Popen[bytes], str]) -> None:
    process, url = served
    response = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "fake-model", "messages": []},
        headers={"x-api-key": "sk-cli"},
    )
    assert response.status_code == 200
    assert httpx.get(url + "/ready").status_code == 200
    stderr = stop(process)
    assert process.returncode == 0
    assert "sk-cli" not in stderr


def test_open_gateway_says_so_at_start_up(fake: Fake) -> None:
    process, _ = serve("--backend-url", fake.url)
    stderr = stop(process, signal.SIGINT)
    assert process.returncode == 0
    assert "no API keys configured" in stderr


def test_a_worker_process_tunes_its_collector_as_a_single_process_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Each worker builds its own app: without this, its collector keeps Python's defaults
    # and pauses every open stream for hundreds of ms while streams pile up.
    import gc

    from gateway.main import WORKER_SETTINGS, _settings_json, worker_app

    handed = tmp_path / "settings.json"
    handed.write_text(_settings_json(Settings(backend_url="http://127.0.0.1:9")))
    monkeypatch.setenv(WORKER_SETTINGS, str(handed))
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        worker_app()
        assert gc.get_threshold() == (1_000, 20, 1_000)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_workers_get_their_settings_without_secrets_in_the_environment(fake: Fake) -> None:
    process, url = serve(
        "--backend-url", fake.url, "--workers", "2", "--api-key", "sk-secret-1234", "--no-access-log",
        "--backend-api-key", "backend-secret-5678",
    )  # fmt: skip
    try:
        answer = httpx.get(url + "/v1/models", headers={"x-api-key": "sk-secret-1234"}, timeout=10)
        assert answer.status_code == 200
        children = subprocess.check_output(["pgrep", "-P", str(process.pid)]).split()
        assert len(children) >= 2
        for pid in [process.pid, *map(int, children)]:
            environment = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"sk-secret-1234" not in environment
            assert b"backend-secret-5678" not in environment
    finally:
        stop(process)
