"""A small loopback HTTP server for the metrics endpoint: GET routes to functions, nothing else.

The standard library's ``ThreadingHTTPServer`` does the serving; routes answer ``(status, content type,
body)``. Any other method or path is 404/405, and a route that fails answers 500 without stopping the server.
"""

from __future__ import annotations

import http.server
import logging
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

Route = Callable[[], tuple[int, str, bytes]]


class LocalHttpServer:
    def __init__(self, listen: str, routes: Mapping[str, Route]) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        handler = _handler(dict(routes))
        # raises OSError when the address is taken or not ours: the caller disables the endpoint
        self._server = http.server.ThreadingHTTPServer((host, int(port)), handler)
        self._server.daemon_threads = True
        self.address = f"{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler(routes: dict[str, Route]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            if route is None:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")
                return
            try:
                status, ctype, body = route()
            except Exception:
                log.exception("metrics endpoint: %s failed", self.path)
                status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
            self._send(status, ctype, body)

        def _refuse(self) -> None:
            self._send(405, "text/plain; charset=utf-8", b"only GET\n")

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

        def _send(self, status: int, ctype: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("metrics endpoint: " + format, *args)

    return Handler
