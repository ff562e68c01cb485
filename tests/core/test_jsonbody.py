"""A JSON body's fields read from its bytes (gateway/core/jsonbody.py): the values a full decoder
would give, nothing else built, and a field changed in place without touching the rest."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.errors import InvalidRequest
from gateway.core.jsonbody import READ, WHOLE_DECODE_BYTES, JsonBody, leading_messages, prompt_count

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
BODIES = st.dictionaries(st.sampled_from([*READ, "pad", "x", ""]) | st.text(max_size=6), JSON, max_size=8)


@settings(max_examples=300, deadline=None)
@given(BODIES, st.booleans())
def test_each_read_field_is_what_a_full_decoder_reads(body: dict[str, Any], spaced: bool) -> None:
    raw = json.dumps(body).encode() if spaced else msgspec.json.encode(body)
    document = json.loads(raw)
    read = JsonBody(raw)
    for name in READ:
        assert (name in read) == (name in document)
        value = read.get(name)
        if isinstance(document.get(name), list | dict):
            assert json.loads(bytes(value)) == document[name]
        else:
            assert value == document.get(name)


@settings(max_examples=300, deadline=None)
@given(BODIES, st.text(max_size=30), st.booleans())
def test_a_field_changed_in_place_leaves_the_rest_as_it_was(
    body: dict[str, Any], new: str, spaced: bool
) -> None:
    body = {**body, "model": body.get("model", "alias")}
    raw = json.dumps(body).encode() if spaced else msgspec.json.encode(body)
    changed = JsonBody(raw).replaced({"model": new})
    assert json.loads(changed) == {**json.loads(raw), "model": new}


def test_a_field_is_changed_at_the_top_level_only() -> None:
    # The same pair nested, and the top-level key written with an escape.
    raw = b'{"tools": [{"model": "alias"}], "mod\\u0065l": "alias"}'
    assert orjson.loads(JsonBody(raw).replaced({"model": "real"})) == {
        "tools": [{"model": "alias"}],
        "model": "real",
    }
    # Where its place cannot be told and the body is large, the request is refused, not guessed.
    pad = b'"' + b"x" * WHOLE_DECODE_BYTES + b'"'
    large = b'{"pad": ' + pad + b', "tools": [{"model": "alias"}], "model": "alias"}'
    with pytest.raises(InvalidRequest):
        JsonBody(large).replaced({"model": "real"})


def test_leading_messages_stop_at_the_first_user_message() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    raw = JsonBody(orjson.dumps({"messages": messages})).get("messages")
    assert [bytes(view) for view in leading_messages(raw)] == [orjson.dumps(m) for m in messages[:2]]


@pytest.mark.parametrize(
    ("prompt", "count"),
    [
        ("one", 1),
        ([1, 2, 3], 1),
        (["a", "b,c", 'd"]['], 3),
        ([[1, 2], [3]], 2),
        ([], 1),
    ],
)
def test_prompts_are_counted_on_their_bytes(prompt: Any, count: int) -> None:
    raw = JsonBody(orjson.dumps({"prompt": prompt})).field("prompt")
    assert prompt_count(raw) == count


def test_every_field_the_gateway_reads_is_decoded() -> None:
    from adapters import ADAPTERS
    from gateway.proxy.routes import ROUTES
    from gateway.tenancy import reserve

    named = {name for spec in ROUTES for name in spec.required}
    named |= {
        name for adapter in ADAPTERS.values() for names in adapter.remote_sources.values() for name in names
    }
    named |= set(reserve.LIMIT_FIELDS) | set(reserve.UNTIL_FULL) | set(reserve.COPY_FIELDS)
    assert named <= set(READ)
