"""A backend: one runtime at one URL, as handed to the proxy."""

from __future__ import annotations

from dataclasses import dataclass

from adapters import ADAPTERS, Adapter
from gateway.settings import Settings


@dataclass(frozen=True, slots=True)
class Backend:
    adapter: Adapter
    url: str
    """Root URL, no trailing slash and no /v1."""
    auth_header: tuple[str, str] | None
    """Header that authenticates the gateway to the backend, if it needs one."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Backend:
        if settings.backend_url is None:
            raise ValueError("no backend URL configured")
        key = settings.backend_api_key
        auth = ("Authorization", f"Bearer {key.get_secret_value()}") if key else None
        return cls(adapter=ADAPTERS[settings.backend], url=settings.backend_url, auth_header=auth)

    @property
    def name(self) -> str:
        return self.adapter.name

    def path_for(self, route: str, request_path: str) -> str:
        return self.adapter.paths.get(route, request_path)
