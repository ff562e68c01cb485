"""How many tokens a request may make a runtime generate, read as the runtimes read it.

A token reservation is only as good as this reading: a field the gateway ignores, or reads
smaller than the runtime does, is tokens the key never pays for. So every field a runtime
takes for the output limit counts (the largest wins, since runtimes differ in which one they
prefer), each read as a lax JSON reader (pydantic, serde) reads it: integers, floats such
as ``100000.0`` or ``1e5``, numeric strings. Zero, null, a negative or unreadable value
means the runtime's default (vLLM and SGLang read 0 as "no limit"), never less. Each of
``n`` and ``best_of`` sequences, and each prompt of a completions request, is generated in
full. Values are clamped before any arithmetic, so no request can make the storage's
counters overflow.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from msgspec import Raw

from adapters import ADAPTERS
from gateway.core.jsonbody import prompt_count

# Fields runtimes read as the output limit: OpenAI's current and legacy names, the
# Responses API's, TGI's, and each adapter's own (llama-server's n_predict, ...).
LIMIT_FIELDS = tuple(
    dict.fromkeys(
        (
            "max_completion_tokens",
            "max_tokens",
            "max_output_tokens",
            "max_new_tokens",
            *(name for adapter in ADAPTERS.values() for name in adapter.limit_fields),
        )
    )
)
UNTIL_FULL = tuple(dict.fromkeys(name for adapter in ADAPTERS.values() for name in adapter.fills_context))
"""Flags that, set, make a runtime generate until the context is full: its default, at least."""
COPY_FIELDS = ("n", "best_of")


class Body(Protocol):
    """A request body's fields: a JSON body's (gateway.core.jsonbody) or a plain dict."""

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str, default: Any = None) -> Any: ...


LARGEST = 2**53
"""No count is taken above this: past any sane limit, and exact in a double."""


def count(value: Any) -> int | None:
    """A count as a lax reader takes it, clamped to ``LARGEST``; None when it is not a number."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return min(value, LARGEST)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value >= LARGEST:
            return LARGEST
        return math.ceil(value) if value > -LARGEST else -LARGEST
    if isinstance(value, str) and len(value) <= 64:
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return count(number)
    return None


def max_tokens(body: Body, default: int) -> int:
    """The output tokens a request may use: the largest limit it names, or ``default``."""
    largest: int | None = None
    for name in LIMIT_FIELDS:
        if name not in body:
            continue
        value = count(body.get(name))
        wanted = value if value is not None and value > 0 else default
        largest = wanted if largest is None else max(largest, wanted)
    for name in UNTIL_FULL:
        if body.get(name) is True:
            largest = default if largest is None else max(largest, default)
    return default if largest is None else largest


def copies(body: Body, prompts_listed: bool) -> int:
    """How many answers the request asks for: the larger of ``n`` and ``best_of``, times the
    prompts of a completions request that lists several."""
    wanted = 1
    for name in COPY_FIELDS:
        value = count(body.get(name))
        if value is not None and value > wanted:
            wanted = value
    if prompts_listed:
        prompt = body.get("prompt")
        # A list of strings or of token lists is several prompts; a list of ints is one.
        if isinstance(prompt, Raw):
            wanted *= prompt_count(prompt)
        elif isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
            wanted *= len(prompt)
    return min(wanted, LARGEST)


def reservation(body_size: int, body: Body, generates: bool, default: int, prompts: bool) -> int:
    """Tokens to hold for a request: its prompt, guessed from its size (about four bytes a
    token), plus what it may generate."""
    prompt = body_size // 4
    if not generates:
        return prompt
    return min(prompt + max_tokens(body, default) * copies(body, prompts), LARGEST)
