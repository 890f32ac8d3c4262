"""A static HTTP server on 127.0.0.1 for the URL-list tests, with a log of every request it
answered (path and the User-Agent it came with): what a job fetched, and what it did not."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from pathlib import Path


class _LoggingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list  # set per server
    fail_first: dict  # path -> how many more requests of it get a 503
    headers_for: dict  # path -> extra response headers

    def do_GET(self):
        self.requests.append({"path": self.path, "agent": self.headers.get("User-Agent", "")})
        if self.fail_first.get(self.path, 0) > 0:
            self.fail_first[self.path] -= 1
            self.send_error(503, "try again")
            return
        super().do_GET()

    def end_headers(self):
        for name, value in self.headers_for.get(self.path, {}).items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, *args):  # keep the test output clean
        pass


@contextlib.contextmanager
def serve(folder: Path, fail_first: dict[str, int] | None = None, headers: dict[str, dict] | None = None):
    """Serve ``folder``; yields (base URL ending in /, the request log: a list of dicts).
    ``fail_first``: path -> the first n requests of it get a 503; ``headers``: path -> extra
    response headers."""
    log: list[dict] = []
    handler = type("_Handler", (_LoggingHandler,), {"requests": log, "fail_first": dict(fail_first or {}),
                                                    "headers_for": dict(headers or {})})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", log
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def requested(log: list[dict]) -> list[str]:
    """The paths requested, in order (a path twice: fetched twice)."""
    return [r["path"] for r in log]
