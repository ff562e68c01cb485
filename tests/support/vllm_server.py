"""A real vLLM (its CPU build, in an environment of its own) on a tiny model the tests make.

``make test`` makes the environment (``make vllm``) and names its Python in VLLM_PYTHON.
Without it these tests fail and say how to make it: they are not skipped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.fakes import free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny"
LORA_NAME = "tiny-lora"
START_TIMEOUT = 400.0
# What every vLLM of the tests is told: no hub, a small KV cache, LoRA adapters loadable at
# run time, no usage reports.
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}
# Eager mode: it serves in about 70 s here rather than 150 s. Requests logged, so that a
# test can read vLLM's own word that it aborted one ("Request <id> aborted.").
ARGS = (
    "--enforce-eager", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--enable-log-requests",
)  # fmt: skip


def vllm_python() -> str:
    python = os.environ.get("VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not os.access(python, os.X_OK):
        pytest.fail(f"vLLM's CPU build is not installed ({python}): run `make vllm` (make test does)")
    return python


@dataclass(frozen=True)
class TinyModel:
    model: Path
    lora: Path


def make_model(root: Path) -> TinyModel:
    """The tiny Llama and its LoRA, made once per directory."""
    made = TinyModel(root / "model", root / "lora")
    if not (root / "made.json").exists():
        subprocess.run(
            [vllm_python(), str(ROOT / "tests" / "support" / "make_vllm_model.py"), str(root)],
            check=True,
            capture_output=True,
            env={**os.environ, **ENV},
            timeout=300,
        )
    return made


def environment() -> dict[str, str]:
    return {**os.environ, **ENV}


@dataclass
class VllmServer:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def logged(self, text: str) -> bool:
        """Whether vLLM's log has ``text``."""
        return text in self.log.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """A metric of vLLM's own /metrics, summed over its label sets."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


def start_vllm(tiny: TinyModel, log: Path, *extra: str, env: dict[str, str] | None = None) -> VllmServer:
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                vllm_python(), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(tiny.model),
                "--served-model-name", MODEL_NAME,
                "--host", "127.0.0.1",
                "--port", str(port),
                *ARGS,
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**environment(), **(env or {})},
            # Its engine and workers share its group, and stop with it. Not a session of its
            # own: where the kernel shares the CPU between sessions (autogroup), a vLLM busy
            # on both cores starved this one, the gateway and the test in it, for up to 40 s.
            process_group=0,
        )  # fmt: skip
    server = VllmServer(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"vLLM exited with {process.returncode}:\n{server.tail()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_vllm(server)
    raise AssertionError(f"vLLM did not start in {START_TIMEOUT:.0f} s:\n{server.tail()}")


def stop_vllm(server: VllmServer) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.process.pid, signal.SIGKILL)


def group_members(group: int) -> list[str]:
    """Running processes (not zombies) of a process group: a runtime started in a group of
    its own and whatever it started (vLLM renames its engine process, so names do not tell)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        # After the command's ")": state, parent, process group, session.
        if fields[0] != "Z" and fields[2] == str(group):
            found.append(f"{entry.name}: {command[:200]}")
    return found


def children_of(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            children.append(int(entry.name))
    return children
