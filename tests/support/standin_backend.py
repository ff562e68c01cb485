"""A stand-in for a runtime the supervisor launches: listens after --load-seconds, like a
server loading weights, and answers /v1/models and /health. Run as a script."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "standin", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--load-seconds", type=float, default=0.0)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--exit-after", type=float, default=0.0)
    parser.add_argument("--serve-for", type=float, default=0.0, help="serve, then exit with 3")
    args = parser.parse_args()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("loading weights", flush=True)
    time.sleep(args.load_seconds)
    if args.exit_after:
        print("failing on purpose", flush=True)
        time.sleep(args.exit_after)
        raise SystemExit(3)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("listening", flush=True)
    if args.serve_for:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        time.sleep(args.serve_for)
        os._exit(3)
    server.serve_forever()


if __name__ == "__main__":
    main()
