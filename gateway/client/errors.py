"""What can go wrong between the gateway and a backend, as one tree.

    UpstreamError
    ├── ConnectFailed      the connection was refused or could not be made (an OSError)
    ├── ConnectTimeout     no connection within the connect timeout
    ├── PoolTimeout        no connection became free before the request's deadline
    ├── ReadTimeout        the backend sent nothing for the read timeout
    │   └── HeadTimeout    the final status line did not come before the deadline
    ├── Disconnected       the backend closed the connection before the answer was whole
    └── BadResponse        bytes that are not an HTTP/1.x response the gateway accepts
        └── TooLarge       a body read whole is larger than the gateway accepts

The client raises nothing else for a backend's doing: socket errors and timeouts are
mapped to this tree where they happen, inside the client, so callers catch
``UpstreamError`` alone. A malformed request from the caller is a ``ValueError``.
"""

from __future__ import annotations


class UpstreamError(Exception):
    """Anything that went wrong between the gateway and the backend."""


class ConnectFailed(UpstreamError):
    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error) or type(error).__name__)
        self.os_error = error


class ConnectTimeout(UpstreamError):
    """No connection within the connect timeout."""


class PoolTimeout(UpstreamError):
    """No connection to the backend became free before the request's deadline."""


class ReadTimeout(UpstreamError):
    """The backend sent nothing for the read timeout."""


class HeadTimeout(ReadTimeout):
    """The backend's final status line did not come before the request's deadline."""


class Disconnected(UpstreamError):
    """The backend closed the connection before the response was complete."""


class BadResponse(UpstreamError):
    """The backend's bytes are not an HTTP/1.x response, or not one the gateway accepts."""


class TooLarge(BadResponse):
    """A body the gateway reads whole for itself is larger than it accepts."""
