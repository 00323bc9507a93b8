"""A fake SGLang worker for gateway tests: speaks the parts of SGLang 0.5.23's native HTTP API the
gateway uses (POST /generate streaming and not, POST /abort_request, GET /health, GET /v1/loads),
deterministically and fast, and records what it was sent. Stop strings (`sampling_params.stop`) end
the reply as SGLang ends it: before the earliest match, reported as `finish_reason.matched`.

Behaviour is set per worker with `FakeWorker.configure(...)`: the reply text, its split into
"tokens", delays, a forced error status, a hang, cumulative or incremental streaming. It keeps a
toy prefix cache (the prompts it has seen) so `meta_info.cached_tokens` reflects routing affinity.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# sampling_params keys SGLang 0.5.23 accepts (its SamplingParams rejects unknown keys).
SGLANG_SAMPLING_KEYS = {
    "max_new_tokens",
    "stop",
    "stop_token_ids",
    "stop_regex",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "min_new_tokens",
    "n",
    "json_schema",
    "regex",
    "ebnf",
    "structural_tag",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
    "stream_interval",
    "logit_bias",
    "sampling_seed",
    "custom_params",
    "beam_width",
    "watermark",
    "choice",
}


class FakeWorker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.aborts: list[str] = []
        self.seen_prompts: list[list[int]] = []
        self.active: dict[str, threading.Event] = {}
        self.connections: set = set()
        self.config: dict[str, Any] = {}
        self.configure()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def configure(
        self,
        reply: str = "Hello from the fake worker.",
        piece_chars: int = 4,
        first_delay: float = 0.0,
        token_delay: float = 0.0,
        status: int | None = None,
        error_message: str = "forced error",
        hang: bool = False,
        incremental: bool = False,
        healthy: bool = True,
        health_delay: float = 0.0,
    ) -> None:
        with self.lock:
            self.config = dict(
                reply=reply,
                piece_chars=piece_chars,
                first_delay=first_delay,
                token_delay=token_delay,
                status=status,
                error_message=error_message,
                hang=hang,
                incremental=incremental,
                healthy=healthy,
                health_delay=health_delay,
            )

    def stop(self) -> None:
        """Die like a killed worker: stop listening and drop every open (keep-alive) connection."""
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            conns, self.connections = list(self.connections), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass

    # ---- the worker's logic -------------------------------------------------------------------

    def cached_tokens(self, ids: list[int]) -> int:
        """Longest common prefix with any earlier prompt, in whole 128-token pages."""
        best = 0
        for prev in self.seen_prompts:
            n = 0
            for a, b in zip(prev, ids, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best // 128 * 128

    def pieces(self, max_new: int, stop: list[str] | None = None) -> tuple[list[str], dict[str, Any]]:
        reply, k = self.config["reply"], max(1, self.config["piece_chars"])
        finish: dict[str, Any] = {"type": "stop", "matched": 200020}
        hits = [(reply.find(s), s) for s in stop or [] if s and s in reply]
        if hits:
            at, matched = min(hits)
            reply, finish = reply[:at], {"type": "stop", "matched": matched}
        pieces = [reply[i : i + k] for i in range(0, len(reply), k)] or [""]
        if len(pieces) > max_new:
            return pieces[:max_new], {"type": "length", "length": max_new}
        return pieces, finish

    def _handler_class(self):
        worker = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def setup(self) -> None:
                super().setup()
                with worker.lock:
                    worker.connections.add(self.connection)

            def finish(self) -> None:
                with worker.lock:
                    worker.connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def _json(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict[str, Any]:
                n = int(self.headers.get("content-length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def do_GET(self) -> None:
                if self.path == "/health":
                    if worker.config["health_delay"]:  # a worker whose event loop is busy with a long step
                        time.sleep(worker.config["health_delay"])
                    self._json(200 if worker.config["healthy"] else 503, {})
                elif self.path.startswith("/v1/loads"):
                    self._json(
                        200,
                        {
                            "loads": [
                                {"dp_rank": 0, "num_running_reqs": len(worker.active), "num_waiting_reqs": 0}
                            ]
                        },
                    )
                else:
                    self._json(404, {"detail": "not found"})

            def do_POST(self) -> None:
                body = self._body()
                if self.path == "/abort_request":
                    with worker.lock:
                        worker.aborts.append(body.get("rid", ""))
                        ev = worker.active.get(body.get("rid", ""))
                    if ev:
                        ev.set()
                    self._json(200, {})
                elif self.path == "/generate":
                    self._generate(body)
                else:
                    self._json(404, {"detail": "not found"})

            def _generate(self, body: dict[str, Any]) -> None:
                cfg = dict(worker.config)
                with worker.lock:
                    worker.requests.append(body)
                sp = body.get("sampling_params") or {}
                unknown = set(sp) - SGLANG_SAMPLING_KEYS
                if unknown:
                    self._json(400, {"error": {"message": f"unknown field `{sorted(unknown)[0]}`"}})
                    return
                if cfg["status"]:
                    self._json(cfg["status"], {"error": {"message": cfg["error_message"]}})
                    return
                ids = body.get("input_ids") or []
                rid = body.get("rid", "")
                stop = threading.Event()
                with worker.lock:
                    cached = worker.cached_tokens(ids)
                    worker.seen_prompts.append(list(ids))
                    worker.active[rid] = stop
                try:
                    if cfg["hang"]:
                        stop.wait(30)
                        return
                    if cfg["first_delay"]:
                        stop.wait(cfg["first_delay"])
                    pieces, finish = worker.pieces(int(sp.get("max_new_tokens", 128)), sp.get("stop"))
                    top_n = int(body.get("top_logprobs_num") or 0)

                    def meta(n: int, done: bool, start: int = 0) -> dict[str, Any]:
                        m: dict[str, Any] = {
                            "id": rid,
                            "prompt_tokens": len(ids),
                            "completion_tokens": n,
                            "cached_tokens": cached,
                            "finish_reason": finish if done else None,
                        }
                        if body.get("return_logprob"):
                            m["output_token_logprobs"] = [
                                [-0.1 * (i + 1), 1000 + i, pieces[i]] for i in range(start, n)
                            ]
                            m["output_top_logprobs"] = [
                                [
                                    [-0.1 * (i + 1) - j, 1000 + i + j, pieces[i] if j == 0 else f"alt{j}"]
                                    for j in range(top_n)
                                ]
                                for i in range(start, n)
                            ]
                        return m

                    if not body.get("stream"):
                        if cfg["token_delay"] and stop.wait(cfg["token_delay"] * (len(pieces) - 1)):
                            return  # aborted while "generating"
                        text = "".join(pieces)
                        self._json(
                            200,
                            {
                                "text": text,
                                "output_ids": list(range(len(pieces))),
                                "meta_info": meta(len(pieces), True),
                            },
                        )
                        return
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("connection", "close")
                    self.end_headers()
                    for n in range(1, len(pieces) + 1):
                        if stop.is_set():
                            return
                        if cfg["token_delay"] and n > 1:
                            stop.wait(cfg["token_delay"])
                        done = n == len(pieces)
                        if cfg["incremental"]:
                            ev = {
                                "text": pieces[n - 1],
                                "output_ids": [n - 1],
                                "meta_info": meta(n, done, n - 1),
                            }
                        else:
                            ev = {
                                "text": "".join(pieces[:n]),
                                "output_ids": list(range(n)),
                                "meta_info": meta(n, done),
                            }
                        self.wfile.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                    self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with worker.lock:
                        worker.active.pop(rid, None)

        return Handler

    def wait_for_abort(self, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.aborts:
                    return list(self.aborts)
            time.sleep(0.02)
        return list(self.aborts)
