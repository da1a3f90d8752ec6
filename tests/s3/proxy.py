"""A small HTTP proxy in front of the RADOS Gateway that injects faults into what the store answers.

Requests pass through unchanged (Host included, so their SigV4 signatures hold); ``faults`` is a list of
rules tried in order on each request, each ``(kind, count, match)``: ``count`` requests (-1: every one)
whose method and path ``match`` (a substring, "" for any) get the fault instead of the store's answer:

- ``"503"`` (or any status): that status with an S3 error body (SlowDown for 503), never reaching the store;
- ``"slow"``: the store's answer, held back ``delay`` seconds first (past the client's timeout);
- ``"truncate"``: the store's headers, then half the body, then the connection closed;
- ``"shift"``: the Range asked for moved 4 KiB on (the store answers that range, honestly labelled);
- ``"norange"``: the Range dropped (a 200 with the whole object);
- ``"down"``: the connection closed without an answer.

``bytes_out`` counts the body bytes of GET answers sent to the client: what a reader fetched.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Rule:
    kind: str
    count: int = 1
    match: str = ""


@dataclass
class FaultProxy:
    upstream_host: str
    upstream_port: int
    delay: float = 3.0
    faults: list[Rule] = field(default_factory=list)
    bytes_out: int = 0
    requests: int = 0
    injected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: socketserver.ThreadingTCPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, kind: str, count: int = 1, match: str = "") -> None:
        with self.lock:
            self.faults.append(Rule(kind, count, match))

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def take(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests += 1
            for rule in self.faults:
                if rule.count != 0 and rule.match in f"{method} {path}":
                    if rule.count > 0:
                        rule.count -= 1
                    self.injected += 1
                    return rule.kind
        return None

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy.take(self.command, self.path)
                headers = {k: v for k, v in self.headers.items()}
                if fault == "down":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault and fault.isdigit():
                    code = fault.encode()
                    err = b"SlowDown" if fault == "503" else b"InternalError"
                    payload = b"<?xml version='1.0'?><Error><Code>" + err + b"</Code><Message>injected " + code + \
                        b"</Message></Error>"
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "shift" and "Range" in headers:
                    lo, _, hi = headers["Range"].removeprefix("bytes=").partition("-")
                    headers["Range"] = f"bytes={int(lo) + 4096}-{int(hi) + 4096}"
                if fault == "norange":
                    headers.pop("Range", None)
                if fault == "slow":
                    time.sleep(proxy.delay)
                try:
                    conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    conn.close()
                except OSError:
                    self.close_connection = True
                    self.connection.close()
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault == "truncate":
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data)
                if self.command == "GET":
                    with proxy.lock:
                        proxy.bytes_out += len(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
