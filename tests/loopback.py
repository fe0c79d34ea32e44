"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for tests.

    with Loopback(script) as server:      # script: a list of replies, or a function(request) -> reply
        client = OpenAIClient(server.url)
        ...
    server.requests                       # [(path, headers, parsed JSON body), ...]

A reply is `(status, body)` or `(status, body, headers)`; a dict or list body is sent as JSON,
bytes or str as is. A list script is consumed one reply per request (the last one repeats).
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(top: list[tuple[str, float]], text: str | None = None, model: str = "judge-1") -> dict:
    """A chat completion of one token whose top alternatives have these probabilities."""
    text = top[0][0] if text is None and top else (text or "")
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": text},
                     "logprobs": {"content": [{"token": text, "logprob": math.log(top[0][1]) if top else 0.0,
                                               "top_logprobs": [{"token": t, "logprob": math.log(p), "bytes": None}
                                                                for t, p in top]}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }


class Loopback:
    def __init__(self, script):
        self.script = script
        self.requests: list[tuple[str, dict, object]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    body = raw
                request = (self.path, dict(self.headers), body)
                with outer._lock:
                    outer.requests.append(request)
                    if callable(outer.script):
                        reply = outer.script(request)
                    else:
                        reply = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                status, payload, *rest = reply
                headers = rest[0] if rest else {}
                data = json.dumps(payload).encode() if isinstance(payload, (dict, list)) else (
                    payload.encode() if isinstance(payload, str) else payload)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> "Loopback":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
