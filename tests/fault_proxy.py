"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real OpenAI-compatible server.

``FaultProxy(upstream_base_url, choose)`` forwards every request to the upstream server unless
``choose(request) -> str | None`` names a fault for it. ``request`` is a dict with ``n`` (0-based
request number), ``path``, ``body`` (parsed JSON), ``prompt`` (the last user message) and
``attempt`` (how many times this same body was seen before). Faults:

  timeout      hold the connection open without answering (the client's timeout fires)
  429          HTTP 429 with ``Retry-After: <retry_after>`` and an OpenAI-style error body
  500, 503     HTTP 500 / 503 with an error body
  reset        close the TCP connection with a RST, no response
  truncated    the upstream answer cut in half (a valid HTTP response whose JSON is cut)
  malformed    HTTP 200 with a body that is not JSON
  out_of_range the upstream answer with its score rewritten out of range (tool-call score 150;
               top-logprob number tokens rewritten to "150")
  refusal      the upstream answer rewritten to a refusal (tool-call refusal=true; first
               top-logprob token "REFUSAL" with nearly all the probability)

Every request is recorded in ``proxy.log`` (n, path, fault, authorization header).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import urllib.parse
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

FAULTS = ("timeout", "429", "500", "503", "reset", "truncated", "malformed", "out_of_range", "refusal")


def _error_body(status: int) -> bytes:
    return json.dumps({"error": {"message": f"injected HTTP {status}", "type": "server_error", "code": status}}).encode()


def rewrite_out_of_range(payload: dict) -> dict:
    for ch in payload.get("choices", []):
        msg = ch.get("message") or {}
        for tc in msg.get("tool_calls") or []:
            fn = tc.get("function") or {}
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except json.JSONDecodeError:
                args = {}
            args["score"] = 150
            fn["arguments"] = json.dumps(args)
        if isinstance(msg.get("content"), str) and not msg.get("tool_calls"):
            try:
                args = json.loads(msg["content"])
                if isinstance(args, dict):
                    args["score"] = 150
                    msg["content"] = json.dumps(args)
            except json.JSONDecodeError:
                pass
        lp = ch.get("logprobs") or {}
        for c in lp.get("content") or []:
            for i, t in enumerate(c.get("top_logprobs") or []):
                t["token"] = str(150 + i)
            c["token"] = "150"
    return payload


def rewrite_refusal(payload: dict) -> dict:
    for ch in payload.get("choices", []):
        msg = ch.get("message") or {}
        for tc in msg.get("tool_calls") or []:
            fn = tc.get("function") or {}
            fn["arguments"] = json.dumps({"score": 0, "refusal": True, "rationale": "The answer refuses."})
        lp = ch.get("logprobs") or {}
        for c in lp.get("content") or []:
            c["token"] = "REFUSAL"
            c["logprob"] = -0.01
            tops = c.get("top_logprobs") or []
            if tops:
                tops[0] = {"token": "REFUSAL", "logprob": -0.01, "bytes": None}
                for t in tops[1:]:
                    t["logprob"] = min(float(t.get("logprob") or -20.0), -8.0)
    return payload


class FaultProxy:
    def __init__(self, upstream: str, choose: Callable[[dict], str | None] | None = None, *,
                 retry_after: str = "1", hold_seconds: float = 120.0):
        u = urllib.parse.urlparse(upstream)
        self.up_host, self.up_port = u.hostname, u.port or 80
        self.up_prefix = u.path.rstrip("/")  # e.g. /v1
        self.choose = choose or (lambda req: None)
        self.retry_after = retry_after
        self.hold_seconds = hold_seconds
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                outer._handle(self, None)

            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                outer._handle(self, self.rfile.read(n))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{self.up_prefix}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    # -- helpers -----------------------------------------------------------------------------
    def faults_seen(self) -> list[str | None]:
        with self.lock:
            return [r["fault"] for r in self.log]

    def _forward(self, method: str, path: str, body: bytes | None, headers) -> tuple[int, list, bytes]:
        conn = HTTPConnection(self.up_host, self.up_port, timeout=600)
        hdrs = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length", "connection",
                                                                        "accept-encoding")}
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        out_headers = [(k, v) for k, v in r.getheaders()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")]
        conn.close()
        return r.status, out_headers, data

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, data: bytes, headers=(), ctype="application/json") -> None:
        h.send_response(status)
        sent = {k.lower() for k, _ in headers}
        for k, v in headers:
            h.send_header(k, v)
        if "content-type" not in sent:
            h.send_header("content-type", ctype)
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()

    def _handle(self, h: BaseHTTPRequestHandler, raw: bytes | None) -> None:
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = None
        prompt = ""
        if isinstance(body, dict):
            msgs = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
            prompt = str(msgs[-1].get("content", "")) if msgs else ""
        key = json.dumps(body, sort_keys=True) if body is not None else h.path
        with self.lock:
            attempt = self._seen.get(key, 0)
            self._seen[key] = attempt + 1
            n = len(self.log)
        req = {"n": n, "path": h.path, "body": body, "prompt": prompt, "attempt": attempt}
        fault = self.choose(req) if h.command == "POST" else None
        with self.lock:
            self.log.append({"n": n, "path": h.path, "fault": fault, "prompt": prompt, "attempt": attempt,
                             "authorization": h.headers.get("authorization"), "t": time.monotonic()})
        if fault == "timeout":
            self._stop.wait(self.hold_seconds)  # the client gives up first
            h.close_connection = True
            return
        if fault == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        if fault == "429":
            self._send(h, 429, _error_body(429), [("Retry-After", self.retry_after)])
            return
        if fault in ("500", "503"):
            self._send(h, int(fault), _error_body(int(fault)))
            return
        if fault == "malformed":
            self._send(h, 200, b"<html>this is not JSON {")
            return
        status, headers, data = self._forward(h.command, h.path, raw, h.headers)
        if fault == "truncated":
            data = data[: max(1, len(data) // 2)]
        elif fault in ("out_of_range", "refusal") and status == 200:
            payload = json.loads(data)
            payload = rewrite_out_of_range(payload) if fault == "out_of_range" else rewrite_refusal(payload)
            data = json.dumps(payload).encode()
        self._send(h, status, data, headers)
