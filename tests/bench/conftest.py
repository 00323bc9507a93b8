"""A tiny fake OpenAI-compatible streaming server for the benchmark client's tests.

It counts one token per whitespace-separated word, keeps a radix-like cache of every prompt + answer it
has seen (cached tokens = longest common prefix with any of them, as SGLang's radix cache reports), and
streams `max_tokens` words (or 3 without ignore_eos) one chunk each. Failure modes are set per request
index (0 = the first chat request, i.e. the warm-up): an HTTP 500, an error event mid-stream, or a hang.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

MODEL = "fake-model"


def prompt_words(messages: list[dict[str, Any]]) -> list[str]:
    words: list[str] = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            words += content.split()
        else:
            for part in content:
                if part["type"] == "text":
                    words += part["text"].split()
                else:
                    words.append("<image>")
    return words


def common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class FakeState:
    ttft_delay: float = 0.0
    token_delay: float = 0.0
    report_usage: bool = True
    report_cache: bool = True
    fail_on: set[int] = field(default_factory=set)  # HTTP 500
    break_on: set[int] = field(default_factory=set)  # error event after 2 tokens
    hang_on: set[int] = field(default_factory=set)  # sleep 5 s before answering
    requests: list[dict[str, Any]] = field(default_factory=list)  # payloads, in arrival order
    served: list[dict[str, Any]] = field(default_factory=list)  # per request: prompt/cached/completion tokens
    cache: list[list[str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    state: FakeState  # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _event(self, obj: Any) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        payload = f"data: {data}\n\n".encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": {"message": "not found"}})
            return
        st = self.state
        words = prompt_words(body["messages"])
        with st.lock:
            index = len(st.requests)
            st.requests.append(body)
            cached = max((common_prefix(words, c) for c in st.cache), default=0)
        if index in st.fail_on:
            self._json(500, {"error": {"message": "injected failure"}})
            return
        if index in st.hang_on:
            time.sleep(5)
        n_out = body["max_tokens"] if body.get("ignore_eos") else min(3, body["max_tokens"])
        answer = [f"w{index}x{i}" for i in range(n_out)]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": f"c{index}", "object": "chat.completion.chunk", "model": MODEL}
        self._event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        time.sleep(st.ttft_delay)
        for i, word in enumerate(answer):
            if index in st.break_on and i == 2:
                self._event({"error": {"message": "injected stream failure", "code": 500}})
                self.wfile.write(b"0\r\n\r\n")
                return
            if i:
                time.sleep(st.token_delay)
            text = word if i == 0 else " " + word
            finish = "length" if i == n_out - 1 else None
            self._event({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})
        with st.lock:
            st.cache.append(words + answer)
            st.served.append({"prompt_tokens": len(words), "cached_tokens": cached, "completion_tokens": n_out})
        if st.report_usage and (body.get("stream_options") or {}).get("include_usage"):
            usage: dict[str, Any] = {"prompt_tokens": len(words), "completion_tokens": n_out,
                                     "total_tokens": len(words) + n_out}
            if st.report_cache:
                usage["prompt_tokens_details"] = {"cached_tokens": cached}
            self._event({**base, "choices": [], "usage": usage})
        self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out and hang up (a tested case) are expected here


@dataclass
class FakeServer:
    state: FakeState
    base_url: str


@pytest.fixture
def fake_server():
    """Yields a factory: fake_server(**FakeState fields) -> FakeServer running on 127.0.0.1."""
    servers: list[ThreadingHTTPServer] = []

    def start(**kwargs: Any) -> FakeServer:
        state = FakeState(**kwargs)
        handler = type("Handler", (_Handler,), {"state": state})
        server = _QuietServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return FakeServer(state, f"http://127.0.0.1:{server.server_address[1]}/v1")

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()
