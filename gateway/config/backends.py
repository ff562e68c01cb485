"""The backends a gateway routes to, as configured: ``--backends FILE`` or ``backends:`` in ``--config``.

Each entry is one backend (a runtime serving some models) with one or more replicas. This
module only reads and checks the configuration; ``gateway.routing.router`` runs it.
"""

from __future__ import annotations

import enum
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from adapters import ADAPTERS
from gateway.client import Origin


class Strategy(enum.StrEnum):
    """How a backend's replicas share requests (``strategy:``, ``--balance``); one balancer each."""

    LEAST_OUTSTANDING = "least-outstanding"
    ROUND_ROBIN = "round-robin"
    QUEUE = "queue"
    AFFINITY = "affinity"


class BackendConfig(BaseModel):
    """One backend: a kind of runtime, its replicas, the models it serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: str = "openai"
    url: str | None = None
    urls: list[str] | None = None
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    models: list[str] | None = None
    """The models it serves; without them, its own /v1/models is read at start and refreshed."""
    aliases: dict[str, str] = Field(default_factory=dict)
    """Client-facing model name -> the name this backend knows the model by."""
    weight: float = Field(1.0, gt=0)
    default: bool = False
    """Takes requests that name no model (uploads, GET /v1/responses/{id})."""
    discovery: Literal["static", "dns"] = "static"
    """dns: ``url``'s host name is resolved every few seconds and each address is a replica
    (a Kubernetes headless Service, Compose's ``deploy.replicas``)."""

    strategy: Strategy | None = None
    """How its replicas share requests; without it, ``--balance`` decides."""
    scrape_interval: float = Field(1.0, ge=0.05, le=60)
    """``strategy: queue``: seconds between reads of each replica's metrics (jittered)."""
    affinity_spread: float = Field(0.25, gt=0, le=10)
    """``strategy: affinity``: a replica with more than (1 + this) x the mean of this
    gateway's requests in flight passes a request on to the key's next replica."""
    eject_after: int | None = Field(None, ge=0)
    """Failures in a row that eject a replica (0: never ejected); ``--eject-after`` by default."""
    eject_seconds: float | None = Field(None, gt=0)
    """How long a first ejection lasts; ``--eject-seconds`` by default."""
    probe_interval: float | None = Field(None, ge=0)
    """Seconds between active probes of each replica (0: none); ``--probe-interval`` by default."""
    max_concurrency: int | Literal["auto"] | None = Field(None)
    """Requests of this gateway each replica runs at once; more wait in the gateway, by
    priority and fair share (flow control). ``auto``: learnt from each replica's own reports
    (``strategy: queue``), so that several gateways need no coordination. None: no limit."""
    queue_size: int | None = Field(None, gt=0)
    """Requests that may wait for its replicas; ``--queue-size`` by default."""
    queue_timeout: float | None = Field(None, gt=0)
    """Seconds a request may wait for its replicas; ``--queue-timeout`` by default."""

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ADAPTERS:
            raise ValueError(f"unknown kind {value!r}; choose one of {', '.join(sorted(ADAPTERS))}")
        return value

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        return None if value is None else normalise_url(value)

    @field_validator("urls")
    @classmethod
    def _valid_urls(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        urls = [normalise_url(url) for url in value]
        if not urls:
            raise ValueError("urls is empty")
        if len(set(urls)) != len(urls):
            raise ValueError("a URL is listed twice")
        return urls

    @field_validator("api_key")
    @classmethod
    def _printable_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().isprintable():
            raise ValueError("api_key must be printable text (no line breaks)")
        return value

    @field_validator("max_concurrency")
    @classmethod
    def _positive(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value <= 0:
            raise ValueError("max_concurrency must be above 0, or 'auto'")
        return value

    @model_validator(mode="after")
    def _one_of_each(self) -> BackendConfig:
        if (self.url is None) == (self.urls is None):
            raise ValueError("give url or urls, not both and not neither")
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise ValueError(f"api_key_env names {self.api_key_env}, which is not set")
        if self.max_concurrency == "auto" and self.strategy != Strategy.QUEUE:
            raise ValueError(
                "max_concurrency: auto learns from the replicas' own reports: it needs strategy: queue"
            )
        if self.discovery == "dns" and self.url is None:
            raise ValueError("discovery: dns resolves the host of url, so give url, not urls")
        return self

    @property
    def replica_urls(self) -> list[str]:
        return [self.url] if self.url is not None else list(self.urls or ())

    def key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env is not None:
            return os.environ.get(self.api_key_env)
        return None


def normalise_url(value: str) -> str:
    """A root URL: no trailing slash, no trailing /v1, and a host (and port) that parse."""
    url = value.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"a backend URL must start with http:// or https://, got {value!r}")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    Origin.from_url(url)
    return url


def parse_backends(entries: Any, source: str) -> list[BackendConfig]:
    """Check a list of backend entries; errors name ``source``, the entry and the field."""
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: 'backends' must be a non-empty list of backends")
    backends = []
    for index, entry in enumerate(entries):
        where = f"{source}: backends[{index}]"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            where += f" ({entry['name']})"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: each backend is a mapping of fields")
        try:
            backends.append(BackendConfig.model_validate(entry))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'entry'}: {error['msg']}"
                for error in exc.errors()
            )
            raise ValueError(f"{where}: {problems}") from None
    names = [backend.name for backend in backends]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"{source}: two backends are named {name!r}")
    defaults = [backend.name for backend in backends if backend.default]
    if len(defaults) > 1:
        raise ValueError(f"{source}: only one backend may be the default, not {', '.join(defaults)}")
    return backends


def load_backends_file(path: Path) -> list[BackendConfig]:
    """A YAML or TOML file whose top level is ``backends:`` (in TOML, ``[[backends]]`` tables)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read backends file {path}: {exc.strerror}") from None
    try:
        data: Any = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"backends file {path} is not valid: {exc}") from None
    if not isinstance(data, dict) or "backends" not in data:
        raise ValueError(f"backends file {path} must have a top-level 'backends' key")
    extra = sorted(set(data) - {"backends"})
    if extra:
        raise ValueError(f"backends file {path}: unknown top-level keys {', '.join(extra)}")
    return parse_backends(data["backends"], str(path))
