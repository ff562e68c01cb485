"""Token reservations a client cannot escape: every field a runtime reads, in every form it
reads it, multiplied by every answer asked for; through the gateway on a real redis-server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.core.jsonbody import JsonBody
from gateway.tenancy import reserve
from tests.conftest import Fake
from tests.support.processes import serve, stop
from tests.support.redis_server import RedisServer

DEFAULT = 1024


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, DEFAULT),
        ({"max_tokens": 50}, 50),
        ({"max_tokens": "100000"}, 100_000),
        ({"max_tokens": 100000.0}, 100_000),
        ({"max_tokens": "1e5"}, 100_000),
        ({"max_tokens": " 7 "}, 7),
        ({"max_tokens": 2.5}, 3),
        ({"max_tokens": True}, 1),
        ({"max_tokens": None}, DEFAULT),
        ({"max_tokens": 0}, DEFAULT),
        ({"max_tokens": -5}, DEFAULT),
        ({"max_tokens": "lots"}, DEFAULT),
        ({"max_tokens": [5]}, DEFAULT),
        # Runtimes read 0 as "no limit" and fall back to the other field: the larger counts.
        ({"max_completion_tokens": 0, "max_tokens": 100_000}, 100_000),
        ({"max_completion_tokens": 70, "max_tokens": 50}, 70),
        ({"max_output_tokens": 9}, 9),
        ({"max_new_tokens": 300}, 300),
        ({"max_tokens": 9223372036854775807}, reserve.LARGEST),
        ({"max_tokens": "9" * 60}, reserve.LARGEST),
        ({"max_tokens": 1e308}, reserve.LARGEST),
    ],
)
def test_max_tokens_as_runtimes_read_it(body: dict[str, Any], expected: int) -> None:
    assert reserve.max_tokens(body, DEFAULT) == expected


def test_every_answer_asked_for_counts() -> None:
    assert reserve.copies({"n": 4}, False) == 4
    assert reserve.copies({"n": "3", "best_of": 5}, False) == 5
    assert reserve.copies({"n": 0}, False) == 1
    assert reserve.copies({"prompt": ["a", "b", "c"], "n": 2}, True) == 6
    assert reserve.copies({"prompt": [[1, 2], [3]]}, True) == 2
    assert reserve.copies({"prompt": [1, 2, 3]}, True) == 1  # one prompt of token ids
    assert reserve.copies({"prompt": ["a", "b"]}, False) == 1  # chat has no prompt list
    assert reserve.reservation(400, {"max_tokens": 50, "n": 2}, True, DEFAULT, False) == 200
    assert reserve.reservation(400, {"max_tokens": 50}, False, DEFAULT, False) == 100


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@given(st.dictionaries(st.sampled_from([*reserve.LIMIT_FIELDS, *reserve.COPY_FIELDS, "prompt"]), JSON))
def test_a_reservation_is_never_below_what_a_runtime_may_read(body: dict[str, Any]) -> None:
    size = reserve.reservation(10, body, True, DEFAULT, True)
    assert 1 <= size <= reserve.LARGEST
    named = [reserve.count(body[name]) for name in reserve.LIMIT_FIELDS if name in body]
    # Each field as a runtime may read it: its value, or the default where it means "none".
    for value in named:
        assert size >= (value if value is not None and value > 0 else DEFAULT)
    if not named:
        assert size >= DEFAULT


def _prompts_a_runtime_takes(prompt: Any) -> bool:
    """A completions prompt in a shape a runtime serves: a string, token IDs, or a list of either."""
    if not isinstance(prompt, list):
        return True
    kinds = {type(p) for p in prompt}
    token_lists = kinds <= {list} and all(isinstance(t, int) for p in prompt for t in p)
    return kinds <= {int} or kinds <= {str} or token_lists


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*reserve.LIMIT_FIELDS, *reserve.COPY_FIELDS, "prompt"]), JSON))
def test_a_body_read_from_its_bytes_reserves_what_the_whole_document_does(body: dict[str, Any]) -> None:
    raw = msgspec.json.encode(body)  # integers of any size, as a client may send them
    document = json.loads(raw)
    assume(_prompts_a_runtime_takes(document.get("prompt")))
    read = JsonBody(raw)
    for prompts in (True, False):
        assert reserve.reservation(10, read, True, DEFAULT, prompts) == reserve.reservation(
            10, document, True, DEFAULT, prompts
        )


def test_output_limits_of_each_runtime_count() -> None:
    # llama-server prefers n_predict; text-generation-webui's flag fills the context.
    assert reserve.max_tokens(JsonBody(b'{"max_tokens": 1, "n_predict": 9000}'), DEFAULT) == 9000
    assert reserve.max_tokens(JsonBody(b'{"max_tokens": 1, "n_predict": -1}'), DEFAULT) == DEFAULT
    assert reserve.max_tokens(JsonBody(b'{"max_tokens": 1, "auto_max_new_tokens": true}'), DEFAULT) == DEFAULT
    assert reserve.max_tokens(JsonBody(b'{"max_tokens": 1, "auto_max_new_tokens": false}'), DEFAULT) == 1


# Through the gateway, counted in a real redis-server


@pytest.fixture
def limited(fake: Fake, redis: RedisServer) -> Iterator[str]:
    process, url = serve(
        "--backend-url", fake.url, "--api-key", "sk-shared", "--no-access-log",
        "--token-limit", "5000/minute", "--rate-limit-storage", redis.url, "--metrics-public",
    )  # fmt: skip
    yield url
    stop(process)


ESCAPES = [
    {"max_output_tokens": 9223372036854775807},
    {"max_tokens": 2**64},
    {"max_tokens": "100000"},
    {"max_tokens": 100000.0},
    {"max_completion_tokens": 0, "max_tokens": 100000},
    {"max_tokens": 1000, "n": 8},
    {"max_tokens": 1000, "best_of": 8},
]


@pytest.mark.parametrize("fields", ESCAPES)
def test_no_field_escapes_the_token_limit(limited: str, fake: Fake, fields: dict[str, Any]) -> None:
    headers = {"x-api-key": "sk-shared"}
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **fields}
    for _ in range(3):
        refused = httpx.post(limited + "/v1/chat/completions", json=body, headers=headers, timeout=10)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_exceeded"
        assert error["code"] == "tokens"
        assert "5000 per 1 minute" in error["message"]
        assert refused.headers["x-should-retry"] == "false"  # it can never fit
    assert fake.seen.requests == []
    # The storage never failed, and the key's whole budget is still there.
    metrics = httpx.get(limited + "/metrics").text
    assert "gateway_rate_limit_storage_errors_total 0.0" in metrics
    fits = {"model": "fake-model", "max_tokens": 4000}
    answer = httpx.post(limited + "/v1/chat/completions", json=fits, headers=headers, timeout=10)
    assert answer.status_code == 200
    assert int(answer.headers["x-ratelimit-remaining-tokens"]) < 1000


def test_completions_prompts_each_count(limited: str, fake: Fake) -> None:
    headers = {"x-api-key": "sk-shared"}
    body = {"model": "fake-model", "prompt": ["a"] * 6, "max_tokens": 1000}
    answer = httpx.post(limited + "/v1/completions", json=body, headers=headers, timeout=10)
    assert answer.status_code == 429
    assert fake.seen.requests == []
