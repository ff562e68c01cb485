"""One request and its answer (gateway/edge/cycle.py): the answer's head checked as uvicorn checks
it, written in one piece with a body of known length, at once for a stream or a HEAD; what a
request leaves behind is freed as it ends, not by the garbage collector."""

from __future__ import annotations

import asyncio
import gc
from typing import Any, cast

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

from gateway.edge.cycle import Signal, header_refusal
from tests.conftest import AUTH, Gateway


@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=24)), max_size=6))
def test_an_answers_headers_are_refused_exactly_where_uvicorn_refuses_them(
    headers: list[tuple[bytes, bytes]],
) -> None:
    names = b"".join(name for name, _ in headers)
    values = b"".join(value for _, value in headers)
    expected = None
    for name, value in headers:
        if HEADER_RE.search(name):
            expected = "Invalid HTTP header name."
            break
        if HEADER_VALUE_RE.search(value):
            expected = "Invalid HTTP header value."
            break
    refusal = header_refusal(names, values)
    # uvicorn stops at the first bad header; every name is looked at before any value here.
    assert (refusal is None) == (expected is None)
    if any(HEADER_RE.search(name) for name, _ in headers):
        assert refusal == "Invalid HTTP header name."


class _Transport:
    """What a cycle writes, write by write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts: list[bytes]) -> None:
        self.writes.append(b"".join(parts))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _cycle(method: str = "POST") -> tuple[Any, _Transport]:
    import logging

    from uvicorn.protocols.http.flow_control import FlowControl

    from gateway.edge.cycle import Cycle

    transport = _Transport()
    scope = {"type": "http", "method": method, "http_version": "1.1", "headers": []}
    logger = logging.getLogger("tests.protocol")
    wire = cast(asyncio.Transport, transport)
    cycle = Cycle(
        cast(Any, scope), wire, FlowControl(wire), logger, logger, False, [], asyncio.Event(), False, True,
        lambda: None,
    )  # fmt: skip
    return cycle, transport


async def test_an_answer_of_known_length_goes_in_one_write_with_its_body() -> None:
    cycle, transport = _cycle()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    await cycle.send({"type": "http.response.start", "status": 200, "headers": headers})
    assert transport.writes == []  # held for the body
    await cycle.send({"type": "http.response.body", "body": b"{}", "more_body": False})
    assert transport.writes == [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    ]
    assert cycle.response_complete


async def test_a_streamed_answers_head_goes_at_once_before_any_event() -> None:
    cycle, transport = _cycle()
    headers = [(b"content-type", b"text/event-stream")]
    await cycle.send({"type": "http.response.start", "status": 200, "headers": headers})
    assert transport.writes == [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    ]
    await cycle.send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    await cycle.send({"type": "http.response.body", "body": b"", "more_body": False})
    assert transport.writes[1:] == [b"9\r\ndata: 1\n\n\r\n", b"0\r\n\r\n"]


async def test_a_head_answer_goes_at_once_and_a_bad_header_is_refused() -> None:
    cycle, transport = _cycle("HEAD")
    await cycle.send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"]
    cycle, transport = _cycle()
    with pytest.raises(RuntimeError, match="header value"):
        await cycle.send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1\r\n2")]})
    assert transport.writes == []


async def test_the_signal_wakes_every_waiter_once_and_forgets_a_cancelled_one() -> None:
    signal = Signal()
    assert not signal.is_set()
    woken: list[int] = []

    async def waits(n: int) -> None:
        await signal.wait()
        woken.append(n)

    tasks = [asyncio.ensure_future(waits(n)) for n in range(3)]
    gone = asyncio.ensure_future(signal.wait())
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    assert signal._waiters is not None
    assert len(signal._waiters) == 3
    signal.set()
    await asyncio.gather(*tasks)
    assert sorted(woken) == [0, 1, 2]
    assert await signal.wait()  # set: at once
    signal.clear()
    assert not signal.is_set()
    late = asyncio.ensure_future(signal.wait())
    await asyncio.sleep(0)
    assert not late.done()
    signal.set()
    assert await late


def test_a_request_leaves_no_reference_cycle_of_the_gateways_own(gateway: Gateway) -> None:
    # Garbage in a cycle waits for a collection, and a collection pauses every open stream:
    # a request's cycle, scope and watch must be freed by their reference counts alone.
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    wrong = {"Authorization": "Bearer no"}
    with httpx.Client(base_url=gateway.url, headers=AUTH) as client:
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(30):
                assert client.post("/v1/chat/completions", json=body).status_code == 200
                with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
                    assert stream.status_code == 200
                    assert b"[DONE]" in stream.read()
                assert client.get("/v1/models").status_code == 200
                refused = client.post("/v1/chat/completions", json=body, headers=wrong)
                assert refused.status_code == 401
            gc.collect()
            left = [type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("gateway.")]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert left == []
