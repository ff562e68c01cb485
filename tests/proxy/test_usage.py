from __future__ import annotations

import pytest

from gateway.proxy.usage import tokens_in


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (b'{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}', (12, 30)),
        (b'{"usage": {"prompt_tokens": 7, "total_tokens": 7}}', (7, None)),  # embeddings
        (
            b'data: {"choices":[{"delta":{}}],"usage":null}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9}}\n\ndata: [DONE]\n\n',
            (3, 9),
        ),
        (b'data: {"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\ndata: {"usage":null}\n\n', (1, 1)),
        (
            b'{"usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":0},"output_tokens":8}}',
            (5, 8),
        ),  # the Responses API
        (b'{"choices":[{"message":{"content":"usage"}}]}', (None, None)),
        (b"", (None, None)),
        (b'"usage":{"prompt_tokens":', (None, None)),
    ],
)
def test_tokens_in(tail: bytes, expected: tuple[int | None, int | None]) -> None:
    assert tokens_in(tail) == expected
