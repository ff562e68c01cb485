from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config.settings import Settings


def test_defaults() -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.backend == "openai"
    assert settings.backend_url is None
    assert settings.api_keys == []
    assert not settings.auth_enabled


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://vllm:8000", "http://vllm:8000"),
        ("http://vllm:8000/", "http://vllm:8000"),
        ("http://vllm:8000/v1", "http://vllm:8000"),
        ("http://vllm:8000/v1/", "http://vllm:8000"),
        ("https://api.example.com/openai/v1", "https://api.example.com/openai"),
    ],
)
def test_backend_url_trailing_v1_means_the_same(given: str, expected: str) -> None:
    assert Settings(backend_url=given).backend_url == expected


def test_backend_url_must_be_http() -> None:
    with pytest.raises(ValidationError, match="must start with http"):
        Settings(backend_url="vllm:8000")


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValidationError, match="unknown backend 'nope'; choose one of"):
        Settings(backend="nope")


def test_plain_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "sk-a, sk-b,,")
    monkeypatch.setenv("BACKEND", "openai")
    monkeypatch.setenv("BACKEND_URL", "http://backend:9000/v1")
    monkeypatch.setenv("BACKEND_API_KEY", "sk-backend")
    monkeypatch.setenv("GATEWAY_MAX_BODY_BYTES", "1234")
    settings = Settings()
    assert [key.get_secret_value() for key in settings.api_keys] == ["sk-a", "sk-b"]
    assert settings.backend_url == "http://backend:9000"
    assert settings.backend_api_key is not None
    assert settings.backend_api_key.get_secret_value() == "sk-backend"
    assert settings.max_body_bytes == 1234


def test_keys_never_show_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "sk-very-secret")
    settings = Settings(backend_api_key="sk-backend-secret")
    assert "sk-very-secret" not in repr(settings)
    assert "sk-backend-secret" not in repr(settings)


def test_precedence_flags_then_environment_then_file_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("port: 7001\nmax-body-bytes: 111\nbackend_timeout: 5\nbackend_url: http://file:1\n")
    monkeypatch.setenv("GATEWAY_PORT", "7002")
    monkeypatch.setenv("GATEWAY_MAX_BODY_BYTES", "222")
    settings = Settings(config=config, port=7003)
    assert settings.port == 7003  # flag beats environment and file
    assert settings.max_body_bytes == 222  # environment beats file
    assert settings.backend_timeout == 5  # file beats default
    assert settings.backend_url == "http://file:1"
    assert settings.stream_idle_timeout == 300  # default


def test_config_file_named_in_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('backend_url = "http://toml:2"\napi_keys = ["sk-1", "sk-2"]\nport = 9001\n')
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    settings = Settings()
    assert settings.backend_url == "http://toml:2"
    assert len(settings.api_keys) == 2
    assert settings.port == 9001


def test_config_file_with_unknown_key_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("prot: 1\n")
    with pytest.raises(ValidationError, match="prot"):
        Settings(config=config)


def test_config_file_must_be_a_mapping(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        Settings(config=config)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read config file"):
        Settings(config=tmp_path / "absent.yaml")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.example.com"])
def test_refuses_public_listener_without_keys(host: str) -> None:
    with pytest.raises(ValidationError, match="refusing to listen"):
        Settings(host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_loopback_without_keys_is_allowed(host: str) -> None:
    assert Settings(host=host).host == host


def test_public_listener_with_keys_or_no_auth() -> None:
    assert Settings(host="0.0.0.0", api_keys=["sk-1"]).auth_enabled
    assert not Settings(host="0.0.0.0", no_auth=True).auth_enabled


def test_tls_files_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="go together"):
        Settings(ssl_keyfile=tmp_path / "key.pem")


@pytest.mark.parametrize("field", ["max_body_bytes", "backend_timeout", "stream_idle_timeout"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValidationError):
        Settings.model_validate({field: 0})
