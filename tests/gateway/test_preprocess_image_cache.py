"""The prepared-image cache (rust_gateway/src/preprocess/image_cache.rs): a resent image gives exactly
the hand-off, ids and pixels of its first preparation, counted as a hit; the key follows the content
(an http URL whose body changed is prepared again), failures are never cached, requests bringing the
same new image at once decode it once (single flight), 0 disables it, and the gateway exports the
counters in /metrics.

No timings are asserted; the benchmark (benchmarks/preprocess/bench_image_cache.py) measures them.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

g = pytest.importorskip("m3serve._gateway")


def png_bytes(seed: int, w: int = 96, h: int = 72) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def body(*urls: str, text: str = "What is on the screen?") -> dict:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"messages": [{"role": "user", "content": parts}]}


def fresh_preprocessor(ckpt, **cfg) -> g.Preprocessor:
    return g.Preprocessor(str(ckpt), json.dumps(cfg) if cfg else None)


def test_repeated_image_is_a_hit_with_identical_output(tiny_checkpoint):
    pre = fresh_preprocessor(tiny_checkpoint)
    url = data_url(png_bytes(1))
    assert pre.image_cache_stats()["hits"] == 0
    t0 = time.perf_counter()
    first = pre.prepare_chat(json.dumps(body(url)))
    t1 = time.perf_counter()
    stats = pre.image_cache_stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (0, 1, 1), stats
    assert 0 < stats["bytes"] <= stats["max_bytes"] == 256 << 20
    # The agent's next turn: the same image again, after more conversation.
    second = pre.prepare_chat(json.dumps(body(url, text="What is on the screen? Look again.")))
    t2 = time.perf_counter()
    print(f"first {1e3 * (t1 - t0):.2f} ms, second {1e3 * (t2 - t1):.2f} ms")  # informational only
    stats = pre.image_cache_stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 1, 1), stats
    assert second["worker_image_data"] == first["worker_image_data"]
    assert second["pixel_values"] == first["pixel_values"] and second["pixel_shape"] == first["pixel_shape"]
    assert second["image_grid_thw"] == first["image_grid_thw"]
    # Same placeholders: the ids differ only in the added text.
    third = pre.prepare_chat(json.dumps(body(url)))
    assert third["input_ids"] == first["input_ids"]
    assert pre.image_cache_stats()["hits"] == 2
    # And it is what a preprocessor without a cache computes.
    uncached = fresh_preprocessor(tiny_checkpoint, image_cache_bytes=0).prepare_chat(json.dumps(body(url)))
    for k in ("worker_image_data", "pixel_values", "image_grid_thw", "input_ids"):
        assert third[k] == uncached[k], k


def test_reordered_images_hit_and_each_wire_dtype_has_its_own_cache(tiny_checkpoint):
    a, b = data_url(png_bytes(2)), data_url(png_bytes(3, 140, 56))
    pre = fresh_preprocessor(tiny_checkpoint, wire_dtype="float32")
    p = pre.prepare_chat(json.dumps(body(a, b)))
    q = pre.prepare_chat(json.dumps(body(b, a)))
    assert pre.image_cache_stats()["hits"] == 2
    assert json.loads(q["worker_image_data"]) == json.loads(p["worker_image_data"])[::-1]
    assert q["image_grid_thw"] == p["image_grid_thw"][::-1]
    # Another preprocessor (bf16 wire) has its own cache and its own hand-off.
    bf16 = fresh_preprocessor(tiny_checkpoint, wire_dtype="bfloat16").prepare_chat(json.dumps(body(a, b)))
    assert ";dtype=bfloat16;" in bf16["worker_image_data"] and ";dtype=float32;" in p["worker_image_data"]


def test_failures_are_not_cached(tiny_checkpoint):
    pre = fresh_preprocessor(tiny_checkpoint)
    truncated = data_url(png_bytes(4)[:200])
    for _ in range(2):
        with pytest.raises(ValueError, match=r"^400: image 0: "):
            pre.prepare_chat(json.dumps(body(truncated)))
    stats = pre.image_cache_stats()
    assert (stats["hits"], stats["entries"], stats["bytes"]) == (0, 0, 0), stats
    # A good image after the bad ones is cached normally.
    good = data_url(png_bytes(5))
    pre.prepare_chat(json.dumps(body(good)))
    pre.prepare_chat(json.dumps(body(good)))
    assert pre.image_cache_stats()["hits"] == 1


def test_disabled_cache_never_stores(tiny_checkpoint):
    pre = fresh_preprocessor(tiny_checkpoint, image_cache_bytes=0)
    url = data_url(png_bytes(6))
    first = pre.prepare_chat(json.dumps(body(url)))
    second = pre.prepare_chat(json.dumps(body(url)))
    assert second["worker_image_data"] == first["worker_image_data"]
    assert pre.image_cache_stats() == {
        "hits": 0,
        "misses": 0,
        "coalesced": 0,
        "evictions": 0,
        "bytes": 0,
        "entries": 0,
        "max_bytes": 0,
    }


def test_concurrent_requests_for_a_new_image_decode_it_once(tiny_checkpoint):
    # Agent sessions started together, each with the same first screenshot. A large PNG, so its
    # decode (tens of ms) outlasts the threads' start: without single flight each would miss.
    n = 8
    pre = fresh_preprocessor(tiny_checkpoint)
    url = data_url(png_bytes(30, 1600, 1200))
    start = threading.Barrier(n)
    grids: list = [None] * n

    def request(i: int) -> None:
        start.wait()
        grids[i] = pre.prepare_images([url])  # releases the GIL while it works

    threads = [threading.Thread(target=request, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a request never came back"
    stats = pre.image_cache_stats()
    print(stats)  # informational: how many waited rather than arrived after the decode
    assert stats["misses"] == 1, stats  # one decode
    assert stats["hits"] + stats["coalesced"] == n - 1 and stats["entries"] == 1, stats
    assert all(g == grids[0] for g in grids) and grids[0]
    # The result everyone shared is what a preprocessor without a cache computes.
    shared = pre.prepare_chat(json.dumps(body(url)))
    uncached = fresh_preprocessor(tiny_checkpoint, image_cache_bytes=0).prepare_chat(json.dumps(body(url)))
    assert shared["worker_image_data"] == uncached["worker_image_data"]


def test_small_bound_evicts(tiny_checkpoint):
    probe = fresh_preprocessor(tiny_checkpoint)
    probe.prepare_chat(json.dumps(body(data_url(png_bytes(7)))))
    one = probe.image_cache_stats()["bytes"]
    pre = fresh_preprocessor(tiny_checkpoint, image_cache_bytes=int(2.5 * one))
    urls = [data_url(png_bytes(7 + i)) for i in range(3)]  # same size: `one` bytes each
    for u in urls:
        pre.prepare_chat(json.dumps(body(u)))
    stats = pre.image_cache_stats()
    assert (stats["entries"], stats["evictions"]) == (2, 1) and stats["bytes"] <= 2.5 * one, stats
    pre.prepare_chat(json.dumps(body(urls[0])))  # the evicted (least recently used) one
    assert pre.image_cache_stats()["hits"] == 0
    pre.prepare_chat(json.dumps(body(urls[0])))
    assert pre.image_cache_stats()["hits"] == 1


class ImageServer(BaseHTTPRequestHandler):
    """Serves `ImageServer.image` at any path; the test changes it between requests."""

    image = b""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        data = type(self).image
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def image_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/screen.png"
    srv.shutdown()
    srv.server_close()


def test_http_images_are_keyed_by_content_not_url(tiny_checkpoint, image_server):
    pre = fresh_preprocessor(tiny_checkpoint, allow_private=True)
    old, new = png_bytes(10), png_bytes(11)
    ImageServer.image = old
    first = pre.prepare_chat(json.dumps(body(image_server)))
    ImageServer.image = new  # same URL, new content: must not be served from the cache
    changed = pre.prepare_chat(json.dumps(body(image_server)))
    assert pre.image_cache_stats()["hits"] == 0
    assert changed["pixel_values"] != first["pixel_values"]
    assert (
        changed["worker_image_data"] == pre.prepare_chat(json.dumps(body(data_url(new))))["worker_image_data"]
    )
    ImageServer.image = old  # the old content again: a hit, with the first answer
    again = pre.prepare_chat(json.dumps(body(image_server)))
    assert pre.image_cache_stats()["hits"] == 1
    assert again["worker_image_data"] == first["worker_image_data"]


# --- the gateway server: the hand-off the worker receives, and /metrics ----------------------------


def chat_through(gw, messages_body: dict) -> None:
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "fake-m3", **messages_body}, timeout=30)
    assert r.status_code == 200, r.text


def test_gateway_sends_the_same_handoff_and_counts_hits(fake_workers, start_gateway, tiny_checkpoint):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url], model_mode="model", model_path=str(tiny_checkpoint))
    assert gw.metric("m3gw_image_cache_max_bytes") == 256 * 1024 * 1024
    assert gw.metric("m3gw_image_cache_hits_total") == 0
    url = data_url(png_bytes(20, 200, 150))
    chat_through(gw, body(url))
    assert gw.metric("m3gw_image_cache_misses_total") == 1
    assert gw.metric("m3gw_image_cache_hits_total") == 0
    assert gw.metric("m3gw_image_cache_entries") == 1 and gw.metric("m3gw_image_cache_bytes") > 0
    chat_through(gw, body(url, text="And now?"))
    assert gw.metric("m3gw_image_cache_hits_total") == 1
    assert gw.metric("m3gw_image_cache_misses_total") == 1
    assert gw.metric("m3gw_image_cache_coalesced_total") == 0
    first, second = w.requests[-2]["image_data"], w.requests[-1]["image_data"]
    assert len(first) == 1 and first[0].startswith("data:application/x-m3serve-pixels;v=1;dtype=bfloat16;")
    assert second == first
    # A broken image is still a 400 naming the image, and is not cached.
    bad = body("data:image/png;base64,iVBORw0K")
    for _ in range(2):
        r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "fake-m3", **bad}, timeout=30)
        assert r.status_code == 400 and "image 0" in r.json()["error"]["message"], r.text
    assert gw.metric("m3gw_image_cache_entries") == 1 and gw.metric("m3gw_image_cache_hits_total") == 1


def test_gateway_flag_disables_the_cache(fake_workers, start_gateway, tiny_checkpoint):
    (w,) = fake_workers(1)
    gw = start_gateway([w.url], "--image-cache-mb", "0", model_mode="model", model_path=str(tiny_checkpoint))
    url = data_url(png_bytes(21))
    chat_through(gw, body(url))
    chat_through(gw, body(url))
    assert w.requests[-1]["image_data"] == w.requests[-2]["image_data"]
    for name in ("hits_total", "misses_total", "coalesced_total", "entries", "bytes", "max_bytes"):
        assert gw.metric(f"m3gw_image_cache_{name}") == 0, name
