from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gateway.core.errors import AuthenticationFailed
from gateway.core.exchange import ApiKey
from gateway.tenancy.auth import Authenticator, load_keys_file, plain_key_name

auth = Authenticator.from_plain_keys(["sk-one", "sk-two"])


def test_no_keys_means_open() -> None:
    open_auth = Authenticator.from_plain_keys([])
    assert not open_auth.enabled
    assert open_auth.authenticate(None, None) is None


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "name"),
    [
        (b"Bearer sk-one", None, "sk-one"),
        (b"bearer   sk-two ", None, "sk-two"),
        (None, b"sk-two", "sk-two"),
        (b"Basic abc", b"sk-one", "sk-one"),
    ],
)
def test_accepted(authorization: bytes | None, x_api_key: bytes | None, name: str) -> None:
    key = auth.authenticate(authorization, x_api_key)
    assert key is not None
    assert key.name == plain_key_name(name)


def test_a_plain_key_is_named_by_its_digest_whatever_its_place() -> None:
    digest = hashlib.sha256(b"sk-two").hexdigest()
    assert plain_key_name("sk-two") == "key-" + digest[:8]
    alone = Authenticator.from_plain_keys(["sk-two"]).authenticate(b"Bearer sk-two", None)
    assert alone is not None
    assert alone.name == plain_key_name("sk-two")
    admin = Authenticator.from_plain_keys(["sk-two"], prefix="admin:").authenticate(b"Bearer sk-two", None)
    assert admin is not None
    assert admin.name == "admin:" + plain_key_name("sk-two")


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


def test_keys_file_with_plain_keys_hashes_and_limits(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"sk-hashed").hexdigest()
    path = tmp_path / "keys.yaml"
    path.write_text(
        "keys:\n"
        "  - name: alice\n    key: sk-alice\n"
        f"  - name: jobs\n    key: 'sha256:{digest}'\n"
        "    rate_limit: 600/minute\n    token_limit: 9000/hour\n"
    )
    keys = load_keys_file(path)
    assert [(k.name, k.rate_limit, k.token_limit) for k in keys] == [
        ("alice", None, None),
        ("jobs", "600/minute", "9000/hour"),
    ]
    combined = Authenticator.from_plain_keys(["sk-plain"], keys)
    for presented, name in (
        (b"sk-alice", "alice"),
        (b"sk-hashed", "jobs"),
        (b"sk-plain", plain_key_name("sk-plain")),
    ):
        found = combined.authenticate(None, presented)
        assert found is not None
        assert found.name == name
    with pytest.raises(AuthenticationFailed):
        combined.authenticate(None, f"sha256:{digest}".encode())  # the hash is not the key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keys: 3", "must hold a 'keys' list"),
        ("keys:\n  - key: sk-x", "needs a name"),
        ("keys:\n  - name: a", "needs a key"),
        ("keys:\n  - name: a\n    key: k\n    limit: 5/minute", "unknown fields limit"),
        ("keys:\n  - name: a\n    key: k\n    rate_limit: 5", "must be a string"),
        ("keys: [", "not valid YAML"),
        ("keys: []", "holds no keys"),
        ("keys:\n  - name: a\n    key: k\n    models: gpt-4", "models must be a list"),
    ],
)
def test_bad_keys_files_are_explained(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_keys_file(path)


def test_a_keys_file_names_the_models_a_key_may_use(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        "keys:\n  - name: a\n    key: k\n    models: ['llama-3*', qwen]\n  - name: b\n    key: j\n"
    )
    limited, free = load_keys_file(path)
    assert limited.models == ("llama-3*", "qwen")
    assert limited.may_use("llama-3.1-8b")
    assert limited.may_use("qwen")
    assert not limited.may_use("qwen2")
    assert not limited.may_use("LLAMA-3")  # names are matched as they are spelt
    assert free.models is None
    assert free.may_use("anything")


def test_key_names_are_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        Authenticator.from_plain_keys(["a"], load_keys_file_like([(plain_key_name("a"), b"x")]))


def load_keys_file_like(entries: list[tuple[str, bytes]]) -> list[ApiKey]:
    return [ApiKey(name, hashlib.sha256(key).digest()) for name, key in entries]
