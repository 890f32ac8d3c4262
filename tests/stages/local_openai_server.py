"""An OpenAI-compatible HTTP server on 127.0.0.1, for the recaption tests and benchmark.

Serves ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` with
the standard library's threading HTTP server. Answers come from a loaded pairsift backend
(e.g. a ``TransformersBackend`` over a tiny model built from a config: one per API, chat and
plain) or, without one, echo the prompt's last words. ``latency_s`` is added to every
answer (outside the model lock, so concurrent requests overlap as on a real server).

It counts what the client did: every request (prompt, image bytes, route) in ``requests``,
the most requests in flight at once in ``max_inflight`` (also served as JSON at ``GET
/stats``; ``GET /reset`` clears them). Markers in a prompt make faults:
``[slow]`` sleeps ``slow_s`` first, ``[flaky]`` answers 500 the first time that prompt is
seen, ``[malformed]`` answers 200 with a body that is no completion, ``[empty]`` answers an
empty completion.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalOpenAIServer:
    def __init__(self, model: str = "tiny", backends: dict | None = None, latency_s: float = 0.0,
                 slow_s: float = 3.0):
        self.model = model
        self.backends = backends or {}
        self.latency_s = latency_s
        self.slow_s = slow_s
        self.requests: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0
        self._seen: Counter = Counter()
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------
    def __enter__(self) -> "LocalOpenAIServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()  # headers and body go out as separate writes: no Nagle delay
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                elif self.path == "/stats":  # for a server in another process (the benchmark)
                    self._send(200, {"requests": len(server.requests), "max_inflight": server.max_inflight,
                                     "cpu_s": time.process_time()})
                elif self.path == "/reset":
                    server.reset()
                    self._send(200, {})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                route = self.path.rstrip("/")
                if route not in ("/v1/chat/completions", "/v1/completions"):
                    self._send(404, {"error": {"message": "not found"}})
                    return
                server._enter()
                try:
                    status, payload = server._answer(route, body)
                finally:
                    server._leave()
                try:
                    self._send(status, payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

            def _send(self, status: int, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the listen backlog: many clients connect at once
            daemon_threads = True

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_inflight = 0
            self._seen.clear()

    # -- answering -----------------------------------------------------------------------
    def _enter(self) -> None:
        with self._lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)

    def _leave(self) -> None:
        with self._lock:
            self.inflight -= 1

    def _answer(self, route: str, body: dict) -> tuple[int, dict | bytes]:
        chat = route.endswith("chat/completions")
        prompt, image, mime = _unpack(body) if chat else (body.get("prompt", ""), None, None)
        with self._lock:
            self._seen[prompt] += 1
            attempt = self._seen[prompt]
            self.requests.append({"route": route, "prompt": prompt, "image": image, "mime": mime, "body": body})
        if "[slow]" in prompt:
            time.sleep(self.slow_s)
        if self.latency_s:
            time.sleep(self.latency_s)
        if "[flaky]" in prompt and attempt == 1:
            return 500, {"error": {"message": "injected server error"}}
        if "[malformed]" in prompt:
            return 200, {"id": "x", "object": "chat.completion", "choices": "not a list of choices"}
        text = "" if "[empty]" in prompt else self._generate(chat, prompt, image, body)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            kind = "text_completion"
        return 200, {"id": f"cmpl-{len(self.requests)}", "object": kind, "created": int(time.time()),
                     "model": self.model, "choices": [choice],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    def _generate(self, chat: bool, prompt: str, image: bytes | None, body: dict) -> str:
        backend = self.backends.get(chat)
        if backend is None:
            return "echo " + " ".join(prompt.split()[-6:])
        from pairsift.stages.llm import GenRequest

        with self._model_lock:
            gen = backend.generate([GenRequest(prompt=prompt, image=image, seed=int(body.get("seed", 0)))])[0]
        if gen.error:
            raise RuntimeError(gen.error)
        return gen.text


def _unpack(body: dict) -> tuple[str, bytes | None, str | None]:
    """The last user turn's text, image (decoded from its data URL) and the image's MIME type."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content, None, None
    text, image, mime = "", None, None
    for part in content:
        if part.get("type") == "text":
            text += part["text"]
        elif part.get("type") == "image_url":
            url = part["image_url"]["url"]
            header, _, data = url.partition(",")
            assert header.startswith("data:image/") and header.endswith(";base64"), header
            image, mime = base64.b64decode(data), header[len("data:"):-len(";base64")]
    return text, image, mime
