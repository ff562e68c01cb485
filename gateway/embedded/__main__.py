"""``python -m gateway.embedded FD MODULE ARGS...``: run a runtime's server on a socket the
gateway bound and listens on, handed down as descriptor ``FD``.

A port picked free, released and then bound by the child can be taken by another local
process in between, which would then be sent the clients' prompts and the backend key.
Here the gateway binds first and the child never binds at all: the runtime's own
``uvicorn.run(app, host=..., port=...)`` is made to serve the inherited socket instead.
"""

from __future__ import annotations

import runpy
import socket
import sys
from typing import Any


def main() -> None:
    descriptor, module, *args = sys.argv[1:]
    listener = socket.socket(fileno=int(descriptor))

    import uvicorn

    def run(app: Any, **options: Any) -> None:
        options.pop("host", None)
        options.pop("port", None)
        uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[listener])

    uvicorn.run = run
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
