from __future__ import annotations

import pytest

from gateway.auth import Authenticator
from gateway.errors import AuthenticationFailed

auth = Authenticator.from_plain_keys(["sk-one", "sk-two"])


def test_no_keys_means_open() -> None:
    open_auth = Authenticator.from_plain_keys([])
    assert not open_auth.enabled
    assert open_auth.authenticate(None, None) is None


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "name"),
    [
        (b"Bearer sk-one", None, "key-1"),
        (b"bearer   sk-two ", None, "key-2"),
        (None, b"sk-two", "key-2"),
        (b"Basic abc", b"sk-one", "key-1"),
    ],
)
def test_accepted(authorization: bytes | None, x_api_key: bytes | None, name: str) -> None:
    assert auth.authenticate(authorization, x_api_key) == name


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "code"),
    [
        (None, None, "missing_api_key"),
        (b"Bearer", None, "missing_api_key"),
        (b"Bearer sk-on", None, "invalid_api_key"),
        (b"Bearer sk-one-more", None, "invalid_api_key"),
        (None, b"SK-ONE", "invalid_api_key"),
    ],
)
def test_refused(authorization: bytes | None, x_api_key: bytes | None, code: str) -> None:
    with pytest.raises(AuthenticationFailed) as caught:
        auth.authenticate(authorization, x_api_key)
    assert caught.value.code == code
    assert caught.value.status == 401
    assert b"sk-" not in caught.value.body()


def test_keys_are_kept_only_as_digests() -> None:
    assert [len(key.digest) for key in auth._keys] == [32, 32]
    assert "sk-one" not in repr(auth._keys)
