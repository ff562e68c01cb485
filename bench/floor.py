"""The floor under the gateway's cost: the same request through uvicorn as the gateway runs it
(uvloop, httptools) and the gateway's own HTTP client, with nothing else: no key, no rate
limit, no metrics, no access log, no routing, no checks of the request or the answer. The
bench measures it beside the gateway: what is left between the two is the cost of the
gateway's own features, and what the floor adds to a direct call no change to them removes.

    python -m bench.floor --port 9200 --backend-url http://127.0.0.1:9100
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.types import Receive, Scope, Send

from gateway.client import Origin, Pool
from gateway.edge.server import tune_garbage_collector


class Floor:
    """An ASGI proxy of a request's body to one origin, its answer read whole and sent on."""

    def __init__(self, backend_url: str) -> None:
        self.origin = Origin.from_url(backend_url)
        self.pool: Pool | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if self.pool is None:
            self.pool = Pool(self.origin)
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        response = await self.pool.request(
            scope["method"], scope["path"], [(b"content-type", b"application/json")], b"".join(chunks)
        )
        body = await response.read()
        response.release()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend-url", required=True)
    args = parser.parse_args()
    config = uvicorn.Config(
        Floor(args.backend_url),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
    )
    tune_garbage_collector()
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
