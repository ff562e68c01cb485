"""A backend: one kind of runtime, how to reach it and what it is called."""

from __future__ import annotations

from dataclasses import dataclass

from adapters import ADAPTERS, Adapter
from adapters.base import Route
from gateway import __version__
from gateway.config.settings import Settings

USER_AGENT = f"inference-gateway/{__version__}".encode()


@dataclass(frozen=True, slots=True)
class Backend:
    adapter: Adapter
    url: str
    """Root URL, no trailing slash and no /v1."""
    auth_header: tuple[bytes, bytes] | None
    """Header that authenticates the gateway to the backend, if it needs one."""
    label: str | None = None
    """Its name in metrics, logs and ``x-gateway-backend``; the adapter's name by default."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Backend:
        if settings.backend_url is None:
            raise ValueError("no backend URL configured")
        key = settings.backend_api_key
        auth = (b"authorization", f"Bearer {key.get_secret_value()}".encode()) if key else None
        return cls(adapter=ADAPTERS[settings.backend], url=settings.backend_url, auth_header=auth)

    @property
    def name(self) -> str:
        return self.label or self.adapter.name

    def path_for(self, route: Route, request_path: str) -> str:
        return self.adapter.paths.get(route, request_path)
