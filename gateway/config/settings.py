"""The one settings object: flags, then environment, then a config file, then defaults."""

from __future__ import annotations

import ipaddress
import re
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

from limits import parse_many
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from adapters import ADAPTERS
from gateway.config.backends import BackendConfig, Strategy, load_backends_file, normalise_url, parse_backends
from gateway.config.sources import ConfigFileSource

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Everything the gateway can be told. Field descriptions are the CLI's help text."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        case_sensitive=False,
        extra="forbid",
        populate_by_name=True,
        frozen=True,
    )

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    backend: str = Field(
        "openai",
        validation_alias=AliasChoices("backend", "gateway_backend"),
        description="Kind of backend runtime: " + ", ".join(sorted(ADAPTERS)) + ".",
    )
    backend_url: str | None = Field(
        None,
        validation_alias=AliasChoices("backend_url", "gateway_backend_url"),
        description="Root URL of the backend runtime, e.g. http://vllm:8000 (a trailing /v1 is "
        "accepted and means the same).",
    )
    backends: Annotated[list[BackendConfig] | None, NoDecode] = Field(
        None,
        validation_alias=AliasChoices("backends", "gateway_backends"),
        description="YAML or TOML file listing several backends, each with its replicas and models "
        "(docs/routing.md); instead of --backend-url. In the --config file, a 'backends' list.",
    )
    backends_file: Path | None = Field(None, description="Where --backends was read from (set by it).")
    balance: Strategy = Field(
        Strategy.LEAST_OUTSTANDING,
        description="How a backend's replicas share requests, unless its 'strategy' says otherwise: "
        "least-outstanding (the less busy of two random replicas; streams count until they end), "
        "round-robin, queue (the less loaded of two by the runtimes' own queue metrics) or affinity "
        "(a session or prompt prefix keeps to one replica, within a bound on its load); weights apply.",
    )
    retry_budget: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Share of requests that may be sent again to another replica when the first failed "
        "before answering (a burst of 10 is allowed beyond it).",
    )
    eject_after: int = Field(
        3,
        ge=1,
        description="Consecutive timeouts or 5xx answers after which a replica is ejected (a refused "
        "connection ejects at once); 4xx answers never count. A backend's own eject_after wins.",
    )
    eject_seconds: float = Field(
        2.0,
        gt=0,
        description="How long a first ejection lasts; it doubles with each ejection in a row, up to 64 "
        "times, until an active probe finds the replica ready.",
    )
    probe_interval: float = Field(
        5.0,
        gt=0,
        description="Seconds between active health probes of each replica (with --backends); a "
        "backend's own probe_interval wins.",
    )
    discovery_interval: float = Field(
        5.0, gt=0, description="Seconds between DNS lookups of backends with 'discovery: dns'."
    )
    max_concurrency: int | None = Field(
        None,
        gt=0,
        description="Requests of this gateway each replica of the one backend (--backend-url, the "
        "embedded one) runs at once; more wait in the gateway (flow control). A backend entry has "
        "its own, or 'auto'. Shared between --workers: each takes its part.",
    )
    queue_size: int = Field(
        100, gt=0, description="Requests that may wait for a backend with a capacity (more: 503 queue_full)."
    )
    queue_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a request may wait for a backend with a capacity (then 503 queue_timeout).",
    )
    slow_start: float = Field(
        10.0,
        ge=0,
        description="Seconds over which a replica back from ejection ramps up to its full share.",
    )
    backend_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("backend_api_key", "gateway_backend_api_key"),
        description="Key sent to the backend as 'Authorization: Bearer'.",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("api_keys", "gateway_api_keys"),
        description="Key a client must present (repeatable).",
    )
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("admin_api_keys", "gateway_admin_api_keys"),
        description="Key for the runtime's admin routes (LoRA load/unload), repeatable; with none, "
        "those routes do not exist. Client keys never open them.",
    )
    keys_file: Path | None = Field(
        None, description="YAML file of named keys (or their sha256: hashes), each with its own limits."
    )
    rate_limit: str | None = Field(
        None, description="Requests each key may make, e.g. '60/minute;1000/day' (default: no limit)."
    )
    global_rate_limit: str | None = Field(None, description="Requests all keys together may make.")
    token_limit: str | None = Field(
        None,
        description="Tokens each key may use, e.g. '20000/minute'; a request reserves its max_tokens plus "
        "its prompt's estimate up front and is charged its real usage at the end.",
    )
    default_max_tokens: int = Field(
        1024, ge=0, description="Tokens reserved for a generation whose request names no max_tokens."
    )
    rate_limit_strategy: Literal["moving-window", "fixed-window", "sliding-window-counter"] = Field(
        "moving-window",
        description="How request limits count: moving-window, fixed-window, sliding-window-counter.",
    )
    rate_limit_storage: str = Field(
        "memory://",
        description="Where limits are counted: memory:// (this process), redis://host:port or rediss:// "
        "(shared by every replica).",
    )
    object_secret: SecretStr | None = Field(
        None,
        description="Secret that seals the IDs of files, batches and stored responses to the key that "
        "made them: required with several client keys, at least 16 characters and no placeholder; "
        "give every gateway replica the same one, and keep it across restarts.",
    )
    rate_limit_fail_closed: bool = Field(
        False,
        description="Refuse requests (503) when the rate-limit storage fails, instead of admitting them.",
    )
    no_auth: bool = Field(
        False, description="Allow listening on a non-loopback address with no API keys configured."
    )
    trust_forwarded: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Address or network (CIDR) of a proxy in front, such as an ingress, whose "
        "X-Forwarded-For, X-Forwarded-Proto, Forwarded and X-Real-IP are passed on (repeatable; "
        "comma-separated in the environment). From anyone else they are replaced by the peer's address.",
    )
    max_body_bytes: int = Field(
        32 * MiB, gt=0, description="Largest request body accepted, in bytes (an upload's, at most)."
    )
    max_json_bytes: int = Field(
        16 * MiB,
        gt=0,
        description="Largest JSON request body accepted, in bytes (at most max_body_bytes): the one "
        "kind of body the gateway reads through before forwarding it.",
    )
    backend_timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds to wait for the backend's status line, counted from the end of the upload "
        "and covering the wait for a free connection; interim (1xx) answers do not extend it. For a "
        "non-streaming request this is the whole generation.",
    )
    stream_idle_timeout: float = Field(
        300.0,
        gt=0,
        description="Seconds a response may go without a byte from the backend once it has started.",
    )
    backend_connect_timeout: float = Field(
        10.0, gt=0, description="Seconds to open a connection to the backend."
    )
    backend_max_connections: int = Field(
        4096, ge=0, description="Most connections open to the backend at once (0: no limit)."
    )
    backend_keepalive_timeout: float = Field(
        4.0,
        ge=0,
        description="Seconds an idle connection to the backend is kept for reuse; keep it below the "
        "backend's own idle timeout (5 s for uvicorn-based runtimes and llama-server).",
    )
    backend_max_header_bytes: int = Field(
        64 * 1024, gt=0, description="Largest backend response head, in bytes (larger: 502)."
    )
    backend_max_headers: int = Field(
        100, gt=0, description="Most header lines in a backend response (more: 502)."
    )
    backend_max_read_bytes: int = Field(
        MiB,
        gt=0,
        description="Largest backend body the gateway reads whole for itself: health probes, model "
        "lists, error bodies it brings to the OpenAI shape (a larger error body is relayed as it is).",
    )
    max_header_bytes: int = Field(
        64 * 1024,
        gt=0,
        description="Largest client request head (request line and headers), in bytes "
        "(larger: 431 and the connection is closed).",
    )
    max_headers: int = Field(100, gt=0, description="Most header lines in a client request (more: 431).")
    client_header_timeout: float = Field(
        60.0, gt=0, description="Seconds a client has to send a whole request head (then 408, closed)."
    )
    client_body_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a client may go without sending a byte of a request body it has begun "
        "(then 408, or the connection is closed).",
    )
    client_body_deadline: float = Field(
        300.0,
        gt=0,
        description="Seconds a client has to send a whole request body, however steadily it sends "
        "(then 408, or the connection is closed); the rest of a body the answer did not wait for "
        "has client_body_timeout seconds in all.",
    )
    client_write_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a client may go without taking a byte of an answer it has let pile up "
        "(then the connection is cut, and the backend request with it).",
    )
    ready_timeout: float = Field(5.0, gt=0, description="Seconds the readiness probe waits for the backend.")
    model: str | None = Field(
        None,
        description="With no backend URL: the GGUF file the embedded llama.cpp backend loads (default: "
        "the bundled Gemma 3 270M), or the model an embedded vLLM serves (--backend vllm).",
    )
    model_alias: str | None = Field(
        None,
        description="Model name the embedded backend answers to (default: gemma-3-270m, or the file's name).",
    )
    context_size: int | None = Field(
        None,
        gt=0,
        description="Context length of the embedded backend, in tokens (default: 4096 for llama.cpp; "
        "the model's own for vLLM, which is told nothing unless this is set).",
    )
    backend_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="An argument added to the embedded backend's command line, e.g. "
        "--backend-arg=--enforce-eager (repeatable; or everything after a lone --; shell-quoted "
        "in the environment).",
    )
    runtime_python: str | None = Field(
        None,
        description="The Python that runs the embedded backend, e.g. a virtual environment of its "
        "own for vLLM, which pins its dependencies (default: the gateway's).",
    )
    threads: int | None = Field(None, gt=0, description="CPU threads of the embedded llama.cpp backend.")
    chat_format: str | None = Field(
        None,
        description="llama-cpp-python chat format of the embedded backend (default: the GGUF's own "
        "template; 'gemma' for the bundled model).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origin a browser app may call the gateway from, e.g. https://app.example.com "
        "(repeatable; comma-separated in the environment; * for any, without --cors-credentials). "
        "None: no CORS headers at all.",
    )
    cors_credentials: bool = Field(
        False, description="Let browsers send cookies and HTTP auth with cross-origin calls (CORS)."
    )
    access_log: bool = Field(True, description="Write one JSON line per request to stdout.")
    docs: bool = Field(
        True, description="Serve /openapi.json and /docs (Swagger UI from bundled assets, no CDN)."
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token /metrics requires. Default: on the main port, with client keys "
        "configured, /metrics needs this token or an admin key; otherwise it is open.",
    )
    allow_remote_model_sources: bool = Field(
        False, description="Let /v1/models/load name URLs a runtime downloads from (LocalAI's url, files)."
    )
    metrics_public: bool = Field(
        False,
        description="Serve /metrics on the main port to anyone, client keys configured or not (it "
        "names tenants' keys, models, token totals and replica URLs).",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve /metrics on this port instead of the main one."
    )
    otlp_traces_endpoint: str | None = Field(
        None,
        description="Export traces by OTLP to this URL (e.g. http://collector:4318/v1/traces). "
        "OpenTelemetry's own OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT turn "
        "tracing on as well; the other OTEL_* variables apply either way.",
    )
    otel_service_name: str = Field(
        "inference-gateway", description="The traces' service.name where OTEL_SERVICE_NAME sets none."
    )
    metrics_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Model names the metrics' model label may take besides those the backend lists "
        "(comma-separated in the environment).",
    )
    workers: int = Field(
        1,
        ge=1,
        description="Worker processes (metrics are aggregated across them); needs --backend-url or "
        "--backends, and with limits or several keys, Redis storage.",
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, seconds in-flight requests and open streams get to finish before they "
        "are cut.",
    )
    shutdown_delay: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM, seconds to keep accepting (with /ready at 503) before closing the listener, "
        "so that load balancers stop sending first.",
    )
    ssl_keyfile: Path | None = Field(
        None, description="TLS private key file; serve HTTPS with --ssl-certfile."
    )
    ssl_certfile: Path | None = Field(None, description="TLS certificate file.")
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
    config: Path | None = Field(None, description="YAML or TOML file holding any of these settings.")

    @field_validator(
        "api_keys", "admin_api_keys", "metrics_models", "cors_origins", "trust_forwarded", mode="before"
    )
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="before")
    @classmethod
    def _load_backends(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        key = next((k for k in ("backends", "gateway_backends") if k in data), None)
        value = data.get(key) if key else None
        if key is None or value is None or value == "":
            return data
        data = dict(data)
        if isinstance(value, str | Path):
            # Kept, so that SIGHUP (and each new worker) reads the file again.
            data["backends_file"] = Path(value)
            data[key] = load_backends_file(Path(value))
        elif isinstance(value, list) and not all(isinstance(entry, BackendConfig) for entry in value):
            data[key] = parse_backends(value, "the config file")
        return data

    @field_validator("backend_args", mode="before")
    @classmethod
    def _split_args(cls, value: Any) -> Any:
        return shlex.split(value) if isinstance(value, str) else value

    @field_validator("trust_forwarded")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(
                    f"--trust-forwarded takes an address or a CIDR network: {network!r}"
                ) from None
        return value

    @field_validator("cors_origins")
    @classmethod
    def _valid_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+/?", origin):
                raise ValueError(
                    f"a CORS origin is a scheme and a host, like https://app.example.com: {origin!r}"
                )
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ADAPTERS:
            raise ValueError(f"unknown backend {value!r}; choose one of {', '.join(sorted(ADAPTERS))}")
        return value

    @field_validator("backend_url")
    @classmethod
    def _normalise_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return normalise_url(value)

    @field_validator("backend_api_key")
    @classmethod
    def _printable_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().isprintable():
            raise ValueError("backend API key must be printable text (no line breaks)")
        return value

    @field_validator("rate_limit", "global_rate_limit", "token_limit")
    @classmethod
    def _valid_limit(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            try:
                parse_many(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not a limit like '60/minute' or '100/second;5000/day'"
                ) from None
        return value

    @field_validator("rate_limit_storage")
    @classmethod
    def _known_storage(cls, value: str) -> str:
        if not value.startswith(
            ("memory://", "redis://", "rediss://", "redis+sentinel://", "redis+cluster://")
        ):
            raise ValueError(f"rate-limit storage must be memory:// or redis://host:port, got {value!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError(f"unknown log level {value!r}")
        return value

    @model_validator(mode="after")
    def _refuse_open_public_listener(self) -> Settings:
        if not self.auth_enabled and not self.no_auth and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} with no API keys: set API_KEYS (or --api-key), "
                "or pass --no-auth to run an open gateway on purpose"
            )
        if self.cors_credentials and "*" in self.cors_origins:
            raise ValueError("--cors-origin '*' cannot go with --cors-credentials: name the origins")
        if self.backends is not None and self.backend_url is not None:
            raise ValueError("give --backend-url (one backend) or --backends (several), not both")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("--ssl-keyfile and --ssl-certfile go together")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys) or self.keys_file is not None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, ConfigFileSource(settings_cls)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
