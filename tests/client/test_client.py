"""The backend client against scripted servers on real sockets: framing, reuse, timeouts."""

from __future__ import annotations

import asyncio
import functools
import gc
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import uvloop

from gateway.client import (
    BadResponse,
    ConnectFailed,
    Connection,
    Disconnected,
    Origin,
    Pool,
    PoolTimeout,
    ReadTimeout,
    Response,
    TooLarge,
)

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def on_both_loops(test: Callable[[], Awaitable[None]]) -> Callable[[str], None]:
    """Run an async test on asyncio's loop and on uvloop's, whose transports differ."""

    @pytest.mark.parametrize("loop", list(LOOPS))
    @functools.wraps(test)
    def run(loop: str) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(test())  # type: ignore[arg-type]

    del run.__wrapped__  # pytest reads the signature of the wrapper, not the test's
    return run


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Script:
    """A server that answers each connection with ``handler`` and records what came in."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request: head, then a Content-Length or chunked body."""
        head = await reader.readuntil(b"\r\n\r\n")
        lower = head.lower()
        body = b""
        if b"content-length:" in lower:
            length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
        elif b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        self.requests.append(head + body)
        return head + body


@asynccontextmanager
async def scripted(handler: Handler, **options: float) -> AsyncIterator[tuple[Pool, Script]]:
    script = Script(handler)
    server = await asyncio.start_server(script.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool(Origin.from_url(f"http://127.0.0.1:{port}"), **options)  # type: ignore[arg-type]
    try:
        yield pool, script
    finally:
        await pool.close()
        server.close()


@asynccontextmanager
async def serving(*responses: bytes, **options: float) -> AsyncIterator[tuple[Pool, Script]]:
    """A server that reads a request and sends the next of ``responses``, on one connection."""
    scripts: list[Script] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            await scripts[0].read_request(reader)
            writer.write(response)
            await writer.drain()
        await reader.read()

    async with scripted(handler, **options) as (pool, script):
        scripts.append(script)
        yield pool, script


async def whole(response: Response) -> bytes:
    body, complete = await response.read_up_to(None)
    assert complete
    return body


OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


@on_both_loops
async def test_a_request_goes_out_with_host_framing_and_headers_as_given() -> None:
    async with serving(OK) as (pool, script):
        response = await pool.request("POST", "/v1/chat?x=1", [(b"x-custom", b"A b")], b'{"a":1}')
        assert response.status == 200
        assert response.header(b"content-type") == b"application/json"
        assert await whole(response) == b"{}"
        response.release()
    sent = script.requests[0]
    assert sent.startswith(b"POST /v1/chat?x=1 HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{pool.origin.port}\r\n".encode() in sent
    assert b"x-custom: A b\r\n" in sent
    assert sent.endswith(b'content-length: 7\r\n\r\n{"a":1}')
    assert b"user-agent" not in sent.lower()
    assert b"accept" not in sent.lower()


@on_both_loops
async def test_keep_alive_reuses_the_connection_and_close_does_not() -> None:
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi"
    async with serving(OK, OK, closing) as (pool, script):
        for _ in range(3):
            response = await pool.request("GET", "/", [])
            await whole(response)
            response.release()
        assert script.connections == 1
        response = await pool.request("GET", "/", [])  # the server closed: a new connection
        await whole(response)
        response.release()
        assert script.connections == 2


@on_both_loops
async def test_chunked_and_close_delimited_bodies_arrive_whole() -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    async with serving(chunked) as (pool, _):
        response = await pool.request("GET", "/", [])
        assert await whole(response) == b"hello world"
        assert response.at_eof()
        response.release()

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nall of ")
        await writer.drain()
        writer.write(b"it")
        await writer.drain()

    async with scripted(until_close) as (pool, _):
        response = await pool.request("GET", "/", [])
        assert await whole(response) == b"all of it"
        response.release()


@on_both_loops
async def test_a_body_cut_short_is_an_error_not_an_end() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()

    async with scripted(cut) as (pool, _):
        response = await pool.request("GET", "/", [])
        assert await response.read() == b"only this"
        with pytest.raises(Disconnected):
            await response.read()
        response.close()


@on_both_loops
async def test_head_interim_and_no_content_answers_end_without_a_body() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"
    async with serving(head) as (pool, _):
        response = await pool.request("HEAD", "/", [])
        assert response.status == 200
        assert await response.read() == b""
        response.release()
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\nx-a: b\r\n\r\nok"
    empty = b"HTTP/1.1 204 No Content\r\n\r\n"
    async with serving(interim, empty, OK) as (pool, script):
        response = await pool.request("POST", "/", [], b"x")
        assert response.status == 201
        assert response.raw_headers == [(b"content-length", b"2"), (b"x-a", b"b")]
        assert await whole(response) == b"ok"
        response.release()
        response = await pool.request("DELETE", "/", [])
        assert response.status == 204
        assert await response.read() == b""
        response.release()
        response = await pool.request("GET", "/", [])
        assert await whole(response) == b"{}"
        response.release()
        assert script.connections == 1


@on_both_loops
async def test_garbage_is_a_bad_response() -> None:
    async with serving(b"SSH-2.0-OpenSSH_9.6\r\n\r\n") as (pool, _):
        with pytest.raises(BadResponse):
            await pool.request("GET", "/", [])


@on_both_loops
async def test_a_closed_connection_is_freed_without_the_cycle_collector() -> None:
    # A connection closed by either side, or never made, must not wait for a full
    # collection: with thousands of open streams that is a pause of hundreds of ms.
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi"
    streaming = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n"
    gc.collect()
    gc.disable()
    try:
        async with serving(closing) as (pool, _):
            response = await pool.request("GET", "/", [])
            await whole(response)
            response.release()
        async with serving(streaming) as (pool, _):
            response = await pool.request("GET", "/", [])
            assert await response.read() == b"hi"
            response.close()  # a client that went away mid-stream
            await asyncio.sleep(0.05)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        pool = Pool(Origin.from_url(f"http://127.0.0.1:{port}"))
        with pytest.raises(ConnectFailed):
            await pool.request("GET", "/", [])
        await pool.close()
        del response, pool
        await asyncio.sleep(0.05)
        assert [obj for obj in gc.get_objects() if isinstance(obj, Connection)] == []
    finally:
        gc.enable()


@on_both_loops
async def test_nothing_listening_is_a_connect_failure() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = Pool(Origin.from_url(f"http://127.0.0.1:{port}"))
    with pytest.raises(ConnectFailed) as caught:
        await pool.request("GET", "/", [])
    assert isinstance(caught.value.os_error, ConnectionRefusedError)
    await pool.close()


@on_both_loops
async def test_silence_before_the_answer_and_between_chunks_times_out() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(5)

    async with scripted(slow, read_timeout=0.2) as (pool, _):
        with pytest.raises(ReadTimeout):
            await pool.request("GET", "/", [])

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
        await writer.drain()
        for _ in range(3):  # chunks within the timeout keep the response alive
            await asyncio.sleep(0.1)
            writer.write(b"1\r\nb\r\n")
            await writer.drain()
        await asyncio.sleep(5)

    async with scripted(stalls, read_timeout=5) as (pool, _):
        response = await pool.request("GET", "/", [])
        response.set_read_timeout(0.25)
        received = b""
        while len(received) < 4:
            received += await response.read()
        assert received == b"abbb"
        with pytest.raises(ReadTimeout):
            await response.read()
        response.close()


@on_both_loops
async def test_time_spent_away_from_reading_is_not_the_backends_silence() -> None:
    async def paced(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.write(b"1\r\nb\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with scripted(paced, read_timeout=0.3) as (pool, _):
        response = await pool.request("GET", "/", [])
        assert await response.read() == b"a"
        await asyncio.sleep(0.35)  # a slow client: the timer armed for the head has run out
        assert await response.read() == b"b"
        assert await response.read() == b""
        response.release()


@on_both_loops
async def test_the_pool_limit_queues_requests_and_hands_connections_on() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.05)
            writer.write(OK)
            await writer.drain()

    async with scripted(handler, limit=2) as (pool, script):

        async def one() -> int:
            response = await pool.request("GET", "/", [])
            await whole(response)
            response.release()
            return response.status

        assert await asyncio.gather(*(one() for _ in range(10))) == [200] * 10
        assert script.connections == 2


@on_both_loops
async def test_a_cancelled_wait_for_a_connection_gives_its_turn_away() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK)
            await writer.drain()

    async with scripted(handler, limit=1) as (pool, _):
        held = await pool.request("GET", "/", [])
        waiting = asyncio.ensure_future(pool.request("GET", "/", []))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await whole(held)
        held.release()
        response = await asyncio.wait_for(pool.request("GET", "/", []), 2)
        assert response.status == 200
        response.close()


@on_both_loops
async def test_uploads_stream_chunked_or_with_their_length() -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one,", b"", b"two"):
            yield part

    async with serving(OK, OK) as (pool, script):
        response = await pool.request("POST", "/", [], parts())
        await whole(response)
        response.release()
        response = await pool.request("POST", "/", [(b"content-length", b"7")], parts())
        await whole(response)
        response.release()
    chunked, sized = script.requests
    assert b"transfer-encoding: chunked" in chunked
    assert chunked.endswith(b"\r\n\r\none,two")
    assert b"content-length: 7\r\n" in sized
    assert sized.endswith(b"\r\n\r\none,two")


@on_both_loops
async def test_a_failing_upload_fails_the_request_and_drops_the_connection() -> None:
    class ClientLeft(Exception):
        pass

    async def parts() -> AsyncIterator[bytes]:
        yield b"partial"
        raise ClientLeft

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with scripted(handler) as (pool, _):
        with pytest.raises(Disconnected):
            await asyncio.wait_for(pool.request("POST", "/", [], parts()), 2)


@on_both_loops
async def test_a_large_body_is_read_with_backpressure() -> None:
    size = 8 * 1024 * 1024
    big = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"x" * size
    async with serving(big) as (pool, _):
        response = await pool.request("GET", "/", [])
        received = 0
        while chunk := await response.read():
            received += len(chunk)
            await asyncio.sleep(0)
        assert received == size
        response.release()


@on_both_loops
async def test_an_idle_connection_closed_by_the_server_is_not_reused() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()
        # and then close, as a server does after its keep-alive timeout

    async with scripted(once) as (pool, script):
        for _ in range(2):
            response = await pool.request("GET", "/", [])
            await whole(response)
            response.release()
            await asyncio.sleep(0.1)
        assert script.connections == 2


@on_both_loops
async def test_a_target_that_would_break_the_request_line_is_refused() -> None:
    async with serving(OK) as (pool, script):
        for target in ("/a b", "/a\r\nx-injected: 1", "no-slash"):
            with pytest.raises(ValueError, match="not a request target"):
                await pool.request("GET", target, [])
    assert script.connections == 0
    async with serving(OK) as (pool, script):
        response = await pool.request("GET", "/v1/models/mod\u00c3\u00a8le\u0085", [])  # raw bytes, latin-1
        response.close()
    assert script.requests[0].startswith(b"GET /v1/models/mod\xc3\xa8le\x85 HTTP/1.1\r\n")


def test_origins_keep_the_prefix_and_spell_the_host_header() -> None:
    origin = Origin.from_url("https://models.example:8443/prefix/")
    assert (origin.host, origin.port, origin.tls, origin.prefix) == ("models.example", 8443, True, "/prefix")
    assert origin.host_header == b"models.example:8443"
    assert Origin.from_url("http://vllm").host_header == b"vllm"
    assert Origin.from_url("http://[::1]:8000").host_header == b"[::1]:8000"
    with pytest.raises(ValueError, match="http:// or https://"):
        Origin.from_url("ftp://x")
    with pytest.raises(ValueError, match="Port"):
        Origin.from_url("http://host:notaport")


# Framing, limits, deadlines and retries on the client's own terms (tests/client/test_hostile.py
# tries the same through the whole gateway).


@on_both_loops
async def test_a_surplus_response_poisons_the_connection_and_reaches_nobody() -> None:
    surplus = b"HTTP/1.1 201 Created\r\nx-evil: 1\r\ncontent-length: 4\r\n\r\nEVIL"
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi" + surplus if first else OK)
        await reader.read()

    async with scripted(handler) as (pool, script):
        response = await pool.request("GET", "/", [])
        assert response.status == 200
        assert response.raw_headers == [(b"content-length", b"2")]
        assert await whole(response) == b"hi"
        response.release()
        response = await pool.request("GET", "/", [])  # a fresh connection, its own answer
        assert await whole(response) == b"{}"
        response.release()
        assert script.connections == 2


@on_both_loops
async def test_trailers_are_dropped_and_the_connection_kept() -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nx-injected: 1\r\n\r\n"
    async with serving(chunked, OK) as (pool, script):
        response = await pool.request("GET", "/", [])
        assert await whole(response) == b"hi"
        assert response.header(b"x-injected") is None
        response.release()
        response = await pool.request("GET", "/", [])
        assert await whole(response) == b"{}"
        response.release()
        assert script.connections == 1


@on_both_loops
async def test_statuses_outside_100_to_599_and_oversized_heads_are_bad_responses() -> None:
    many = b"HTTP/1.1 200 OK\r\n" + b"x-h: 1\r\n" * 11 + b"content-length: 0\r\n\r\n"
    big = b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 2000 + b"\r\ncontent-length: 0\r\n\r\n"
    for answer in (b"HTTP/1.1 600 X\r\ncontent-length: 0\r\n\r\n", b"HTTP/1.1 099 X\r\n\r\n", many, big):
        async with serving(answer, max_head_bytes=1024, max_headers=10) as (pool, _):
            with pytest.raises(BadResponse):
                await pool.request("GET", "/", [])


@on_both_loops
async def test_fetch_refuses_a_body_over_its_limit() -> None:
    large = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"x" * 5000
    async with serving(large, max_read_bytes=1000) as (pool, _):
        with pytest.raises(TooLarge):
            await pool.fetch("GET", "/health", [], seconds=5)


@on_both_loops
async def test_interim_answers_do_not_extend_the_deadline() -> None:
    async def hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for _ in range(20):
            writer.write(b"HTTP/1.1 103 Early Hints\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(OK)
        await reader.read()

    async with scripted(hints, read_timeout=0.3) as (pool, _):
        started = asyncio.get_running_loop().time()
        with pytest.raises(ReadTimeout):
            await pool.request("GET", "/", [])
        assert asyncio.get_running_loop().time() - started < 0.6


@on_both_loops
async def test_the_wait_for_a_free_connection_counts_against_the_deadline() -> None:
    async def holds(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await reader.read()

    async with scripted(holds, read_timeout=0.3, limit=1) as (pool, _):
        held = await pool.request("GET", "/", [])
        with pytest.raises(PoolTimeout):
            await pool.request("GET", "/", [])
        held.close()


@on_both_loops
async def test_a_dead_reused_connection_is_retried_only_when_safe() -> None:
    async def dies_on_reuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request: closed unanswered

    cases = [
        ("GET", [], None, True),
        ("POST", [(b"idempotency-key", b"k")], b"{}", True),
        ("POST", [], b"{}", False),
    ]
    for method, headers, body, retried in cases:
        async with scripted(dies_on_reuse) as (pool, script):
            response = await pool.request(method, "/", headers, body)
            await whole(response)
            response.release()
            if retried:
                response = await pool.request(method, "/", headers, body)
                assert await whole(response) == b"{}"
                response.release()
                assert pool.retries == 1
            else:
                with pytest.raises(Disconnected):
                    await pool.request(method, "/", headers, body)
                assert pool.retries == 0
            assert script.connections == (2 if retried else 1)


@on_both_loops
async def test_a_reused_connection_holds_each_request_to_its_own_deadline() -> None:
    """The connection's alarm moves from request to request: an answer in time, then one
    that never comes, then one in time again after a slower read timeout was set."""
    answered = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        while True:
            await reader.readuntil(b"\r\n\r\n")
            answered += 1
            if answered == 3:
                await asyncio.sleep(5)  # the third request is never answered
            writer.write(OK)
            await writer.drain()

    async with scripted(handler, read_timeout=0.3) as (pool, script):
        for _ in range(2):
            response = await pool.request("GET", "/", [])
            assert await whole(response) == b"{}"
            response.release()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ReadTimeout):
            await pool.request("GET", "/", [])
        assert 0.25 <= loop.time() - started < 2
        response = await pool.request("GET", "/", [])  # a fresh connection
        assert await whole(response) == b"{}"
        response.release()
        assert script.connections == 2
