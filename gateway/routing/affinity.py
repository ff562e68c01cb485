"""Affinity: a key from the request orders the replicas the same way in every gateway process.

The key is ``x-session-id``, else the ``prompt_cache_key`` or ``user`` field, else the
prompt's leading bytes (``affinity_key``). Replicas are ordered by weighted rendezvous
hashing; the first whose requests in flight stay within (1 + ``affinity_spread``) times
the mean takes the request (``affinity_pick``), so that a hot key spills over to its next
replicas rather than swamping one.
"""

from __future__ import annotations

import hashlib
import math

import orjson
from msgspec import Raw

from gateway.core.jsonbody import JsonBody, first_element, leading_messages
from gateway.fleet.replicas import Group, Replica

AFFINITY_BLOCK = 256
AFFINITY_BYTES = 4096
"""A prompt's key is its first bytes, at most this many, cut to whole blocks."""

MASK = (1 << 64) - 1


def affinity_key(headers: list[tuple[bytes, bytes]], body: JsonBody | None) -> int | None:
    """The request's affinity key as a 64-bit number, or None when it has none."""
    key: bytes | None = None
    for name, value in headers:
        if name == b"x-session-id" and value:
            key = b"s:" + value
            break
    if key is None and body is not None:
        for field, tag in (("prompt_cache_key", b"k:"), ("user", b"u:")):
            named = body.get(field)
            if isinstance(named, str) and named:
                key = tag + named.encode("utf-8", "replace")
                break
        else:
            leading = leading_bytes(body)
            if leading:
                key = b"p:" + leading
    if key is None:
        return None
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def leading_bytes(body: JsonBody) -> bytes:
    """The start of the prompt that stays the same from one turn of a conversation to the
    next: for messages, the bytes of the system and developer messages and the first user
    message as sent; for a prompt, its first bytes (the first prompt of a list). At most
    ``AFFINITY_BYTES``, cut to whole blocks of ``AFFINITY_BLOCK`` (a shorter prompt counts
    whole). Read from the body's bytes: nothing of a long conversation is built."""
    messages = body.get("messages")
    if messages is None:
        messages = body.get("input")  # the Responses API
    data = b""
    if isinstance(messages, Raw) and memoryview(messages)[0] == ord("["):
        parts: list[bytes] = []
        size = 0
        for view in leading_messages(messages):
            parts.append(bytes(view[: AFFINITY_BYTES - size]))
            size += len(parts[-1])
            if size >= AFFINITY_BYTES:
                break
        data = b"".join(parts)
    else:
        prompt = messages if isinstance(messages, str) else body.get("prompt")
        if isinstance(prompt, Raw) and memoryview(prompt)[0] == ord("["):
            first = first_element(prompt)
            if first[:1].tobytes() == b'"':
                prompt = orjson.loads(first)
            else:  # a list of token IDs, or the first of several
                data = bytes(memoryview(first if first[:1].tobytes() == b"[" else prompt)[:AFFINITY_BYTES])
        if isinstance(prompt, str):
            data = prompt[:AFFINITY_BYTES].encode("utf-8", "replace")
    if len(data) > AFFINITY_BLOCK:
        data = data[: len(data) - len(data) % AFFINITY_BLOCK]
    return data


def replica_seed(url: str) -> int:
    """A replica's place in every key's order: from its URL, the same in every process."""
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "big")


def mix(value: int) -> int:
    """splitmix64's finaliser: every bit of the result depends on every bit of ``value``."""
    value = (value + 0x9E3779B97F4A7C15) & MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK
    return value ^ (value >> 31)


def rendezvous_order(pairs: list[tuple[Group, Replica]], key: int) -> list[tuple[Group, Replica]]:
    """The replicas in ``key``'s order of preference (weighted rendezvous hashing)."""
    weight = pairs[0][1].weight
    if all(pair[1].weight == weight for pair in pairs):
        return sorted(pairs, key=lambda pair: mix(key ^ pair[1].seed), reverse=True)

    def score(pair: tuple[Group, Replica]) -> float:
        unit = (mix(key ^ pair[1].seed) + 0.5) / 2.0**64
        return -pair[1].weight / math.log(unit)

    return sorted(pairs, key=score, reverse=True)


def affinity_pick(pairs: list[tuple[Group, Replica]], key: int, spread: float) -> tuple[Group, Replica]:
    """The first replica in the key's order whose load stays within the bound."""
    order = rendezvous_order(pairs, key)
    total = 1 + sum(pair[1].in_flight for pair in pairs)
    weights = sum(pair[1].weight for pair in pairs)
    for pair in order:
        replica = pair[1]
        bound = math.ceil((1 + spread) * total * replica.weight / weights)
        if replica.in_flight + 1 <= bound:
            return pair
    return order[0]  # not reached: some replica is at or below the mean
