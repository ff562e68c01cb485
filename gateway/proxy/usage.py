"""Token counts from the ``usage`` object at the end of a JSON body or a stream.

Only the tail of a response is looked at (a copy of its last few kilobytes): the bytes
sent to the client are never parsed or changed.
"""

from __future__ import annotations

import re

TAIL_BYTES = 4096
USAGE = b'"usage"'
PROMPT = re.compile(rb'"(?:prompt_tokens|input_tokens)"\s*:\s*(\d+)')
COMPLETION = re.compile(rb'"(?:completion_tokens|output_tokens)"\s*:\s*(\d+)')
NULL = re.compile(rb"\s*:\s*null")


def tokens_in(tail: bytes) -> tuple[int | None, int | None]:
    """Prompt and completion tokens of the last non-null ``usage`` in ``tail``."""
    end = len(tail)
    while (at := tail.rfind(USAGE, 0, end)) >= 0:
        after = at + len(USAGE)
        if not NULL.match(tail, after):
            usage = _object_after(tail, after)
            prompt = PROMPT.search(usage)
            completion = COMPLETION.search(usage)
            if prompt or completion:
                return (
                    int(prompt.group(1)) if prompt else None,
                    int(completion.group(1)) if completion else None,
                )
        end = at
    return None, None


def prompt_tokens_at_start(head: bytes) -> int | None:
    """The prompt's tokens in the first ``usage`` of ``head`` (Anthropic's streams give them in
    ``message_start`` and may not repeat them at the end)."""
    at = head.find(USAGE)
    if at < 0:
        return None
    found = PROMPT.search(_object_after(head, at + len(USAGE)))
    return int(found.group(1)) if found else None


def _object_after(data: bytes, start: int) -> bytes:
    """The JSON object that starts after ``start`` (nested one level deep, as usage's
    ``*_details`` are), or what there is of it."""
    opening = data.find(b"{", start, start + 16)
    if opening < 0:
        return b""
    at = opening + 1
    while True:
        closing = data.find(b"}", at)
        if closing < 0:
            break
        inner = data.find(b"{", at, closing)
        if inner < 0:
            return data[opening : closing + 1]
        # A nested object: it must close before another one opens.
        at = data.find(b"}", inner) + 1
        if not at or data.find(b"{", inner + 1, at) >= 0:
            break
    return data[opening : opening + 1024]
