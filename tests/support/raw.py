"""Raw sockets on both sides of the gateway: a scripted backend and a hand-written client.

``RawBackend`` answers each request with whatever bytes its script returns, so a test can
play a broken or hostile runtime: extra responses, trailers, huge heads, odd statuses,
early closes. ``RawClient`` writes whatever bytes a test gives it and reads what comes back.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class Request:
    head: bytes
    body: bytes
    connection: int
    """Which connection, counted from 1, carried it."""
    index: int
    """Which request on that connection, counted from 1."""

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None

    @property
    def own(self) -> bool:
        """One of the gateway's own requests (model list, probes), not a client's."""
        return (self.header(b"user-agent") or b"").startswith(b"inference-gateway/")

    @property
    def target(self) -> bytes:
        return self.head.split(b" ", 2)[1]


class Reply:
    """What the script does with one request: bytes to send, then keep the connection or not."""

    def __init__(self, *parts: bytes | float, close: bool = False) -> None:
        self.parts = parts
        """Bytes to send, with pauses (seconds, as floats) between them."""
        self.close = close


Script = Callable[[Request], Reply]


@dataclass
class RawBackend:
    script: Script = field(repr=False)
    requests: list[Request] = field(default_factory=list, repr=False)
    connections: int = 0

    def __post_init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        buffer = b""
        index = 0
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                body, buffer = self._read_body(sock, head, buffer)
                index += 1
                request = Request(head, body, number, index)
                with self._lock:
                    self.requests.append(request)
                reply = self.script(request)
                for part in reply.parts:
                    if isinstance(part, float):
                        time.sleep(part)
                    elif part:
                        sock.sendall(part)
                if reply.close:
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    @staticmethod
    def _read_body(sock: socket.socket, head: bytes, buffer: bytes) -> tuple[bytes, bytes]:
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            body = b""
            while True:
                while b"\r\n" not in buffer:
                    buffer += _recv(sock)
                line, _, buffer = buffer.partition(b"\r\n")
                size = int(line, 16)
                while len(buffer) < size + 2:
                    buffer += _recv(sock)
                body += buffer[:size]
                buffer = buffer[size + 2 :]
                if size == 0:
                    return body, buffer
        length = 0
        for line in lower.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        while len(buffer) < length:
            data = sock.recv(65536)
            if not data:
                break
            buffer += data
        return buffer[:length], buffer[length:]


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise OSError("closed in the middle of a body")
    return data


@contextlib.contextmanager
def raw_backend(script: Script) -> Iterator[RawBackend]:
    backend = RawBackend(script)
    try:
        yield backend
    finally:
        backend.close()


def response(
    status: int = 200, body: bytes = b"", headers: tuple[tuple[str, str], ...] = (), reason: str = "OK"
) -> bytes:
    """A well-formed response with a Content-Length."""
    lines = [f"HTTP/1.1 {status} {reason}", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


JSON_OK = response(200, b'{"ok":true}', (("content-type", "application/json"),))


class RawClient:
    """One connection to the gateway, written to and read from as bytes."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)

    def send(self, data: bytes) -> bool:
        """Write; False once the gateway has closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def read_all(self, timeout: float = 10.0) -> bytes:
        """Everything until the gateway closes the connection (or ``timeout``)."""
        self.sock.settimeout(timeout)
        chunks = []
        with contextlib.suppress(OSError):
            while data := self.sock.recv(65536):
                chunks.append(data)
        return b"".join(chunks)

    def is_closed_by_peer(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536) == b""
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def peak_rss_kib(pid: int) -> int:
    """The process's high-water resident set (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def current_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
