"""DNS discovery: a backend whose replicas are the addresses its host name resolves to
(``discovery: dns``; a Kubernetes headless Service, Compose's ``deploy.replicas``)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in found]


async def replica_urls(url: str, resolver: Resolver) -> list[str]:
    """One URL per address of ``url``'s host, in a stable order. Raises OSError when the
    name cannot be resolved."""
    template = urlsplit(url)
    host, port = template.hostname or "", template.port or (443 if template.scheme == "https" else 80)
    addresses = sorted(set(await resolver(host, port)))
    return [
        urlunsplit((template.scheme, f"[{a}]:{port}" if ":" in a else f"{a}:{port}", template.path, "", ""))
        for a in addresses
    ]
