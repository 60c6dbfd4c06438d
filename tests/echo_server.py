"""A real HTTP listener on 127.0.0.1 for the reliability tests: records every request's headers and
answers with a chosen status whose body (and one response header) echoes the request headers back,
as a careless or hostile judge server does. ``GET .../models`` lists one model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class EchoServer:
    """``with EchoServer(status=500) as srv: ... srv.url ... srv.requests``.

    ``status``: an int, or a callable ``(n, request) -> int`` for the n-th request (0-based)."""

    def __init__(self, status: int | Callable[[int, dict], int] = 500):
        self.status = status
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def _answer(self):
                n_bytes = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n_bytes) if n_bytes else b""
                req = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                       "authorization": self.headers.get("authorization"), "body": body.decode("utf-8", "replace")}
                with outer._lock:
                    n = len(outer.requests)
                    outer.requests.append(req)
                if self.command == "GET" and self.path.rstrip("/").endswith("/models"):
                    status, payload = 200, {"object": "list", "data": [{"id": "echo-model", "object": "model"}]}
                else:
                    status = outer.status(n, req) if callable(outer.status) else outer.status
                    payload = {"error": {"message": f"echoing your request headers: {dict(self.headers.items())}",
                                         "type": "echo", "headers": dict(self.headers.items())}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("x-echo-authorization", self.headers.get("authorization") or "")
                self.send_header("retry-after", "0")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> EchoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
