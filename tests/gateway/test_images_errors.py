"""Bad images and image URLs get a clear client error (400) and never take the preprocessor down.

Covers: invalid base64, truncated files, unsupported formats, decompression bombs and absurd
dimensions (refused from the header, before any pixel is decoded), too many images, and the URL
fetcher's SSRF guard (loopback/private refused, also after redirects), size, time and redirect limits.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

g = pytest.importorskip("m3serve._gateway")


def png_bytes(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(w: int, h: int) -> bytes:
    """A valid PNG of w x h black pixels: tiny on disk, w*h*3 bytes once decoded."""
    comp = zlib.compressobj(1)
    row = b"\0" * (1 + 3 * w)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def chat(url: str | list[str]) -> str:
    urls = [url] if isinstance(url, str) else url
    parts = [{"type": "text", "text": "look"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return json.dumps({"messages": [{"role": "user", "content": parts}]})


@pytest.fixture(scope="module")
def pre(tiny_checkpoint):
    return g.Preprocessor(str(tiny_checkpoint))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,!!!not-base64!!!", "invalid base64"),
        ("data:image/png,rawbytes", "must be base64"),
        (data_url(png_bytes()[:-40]), "truncated PNG"),
        (data_url(png_bytes()[:200]), "truncated PNG"),
        (data_url(jpeg_bytes()[:300]), "truncated JPEG"),
        (data_url(b"BM" + b"\0" * 100, "image/bmp"), r"unsupported image format \(BMP\)"),
        (data_url(b"II*\0" + b"\0" * 100, "image/tiff"), r"unsupported image format \(TIFF\)"),
        (data_url(b"just some text"), r"unsupported image format \(unknown\)"),
        (data_url(b""), "empty image data"),
        (data_url(png_bomb(20_000, 1)), "20000x1 pixels; the limit"),
        (data_url(png_bytes(3000, 10)), "aspect ratio must be at most 200"),
        ("ftp://example.com/a.png", "only http, https and data:"),
        ("file:///etc/passwd", "only http, https and data:"),
    ],
    ids=["base64", "not-base64", "png-tail", "png-head", "jpeg", "bmp", "tiff", "text", "empty", "wide", "aspect", "ftp", "file"],
)
def test_bad_images_are_400_with_a_clear_message(pre, url, message):
    with pytest.raises(ValueError, match=rf"^400: image 0.*{message}"):
        pre.prepare_chat(chat(url))


def test_decompression_bomb_refused_from_the_header(pre):
    bomb = png_bomb(8000, 8000)  # 192 MB of pixels in ~190 kB
    assert len(bomb) < 1_000_000
    start = time.perf_counter()
    with pytest.raises(ValueError, match="8000x8000 pixels; the limit is 16384 per side and 50000000 pixels"):
        pre.prepare_chat(chat(data_url(bomb)))
    assert time.perf_counter() - start < 2.0, "the bomb was decoded before being refused"


def test_too_many_images(pre):
    with pytest.raises(ValueError, match="17 images in one request; the limit is 16"):
        pre.prepare_chat(chat([data_url(png_bytes())] * 17))


def test_second_image_error_names_its_index(pre):
    with pytest.raises(ValueError, match="image 1: .*invalid base64"):
        pre.prepare_chat(chat([data_url(png_bytes()), "data:image/png;base64,@@"]))


def test_still_works_after_errors(pre):
    for bad in ["data:image/png;base64,@@", data_url(png_bomb(20_000, 1))]:
        with pytest.raises(ValueError):
            pre.prepare_chat(chat(bad))
    out = pre.prepare_chat(chat(data_url(png_bytes())))
    assert out["image_grid_thw"] == [(1, 4, 4)]


def test_text_only_model_refuses_images(tmp_path, tiny_checkpoint):
    """A tokenizer without M3's image tokens cannot take images: 400, not a crash."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}"}))
    pre = g.Preprocessor(str(tmp_path))
    with pytest.raises(ValueError, match="does not accept images"):
        pre.prepare_chat(chat(data_url(png_bytes())))


# --- http(s) fetching -------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    image = png_bytes()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes = {
            "/img.png": lambda: self.send(200, self.image),
            "/redirect-local": lambda: self.redirect(f"http://localhost:{port}/img.png"),
            "/redirect-same": lambda: self.redirect(f"http://127.0.0.1:{port}/img.png"),
            "/big": lambda: self.send(200, b"\x89PNG" + b"\0" * 3_000_000),
            "/slow": lambda: (time.sleep(2.5), self.send(200, self.image)),
            "/missing": lambda: self.send(404, b"no"),
        }
        routes.get(self.path, lambda: self.send(404, b"no"))()

    def send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def fetch(url: str, **cfg) -> bytes:
    return g.fetch_image(url, json.dumps(cfg) if cfg else None)


def test_loopback_refused_by_default(server):
    with pytest.raises(ValueError, match="127.0.0.1 is a private, loopback or link-local address"):
        fetch(server + "/img.png")
    port = server.rsplit(":", 1)[1]
    with pytest.raises(ValueError, match="localhost resolves to a private, loopback or link-local address"):
        fetch(f"http://localhost:{port}/img.png")
    for url in ["http://169.254.169.254/latest/meta-data", "http://[::1]/x", "http://10.0.0.1/x"]:
        with pytest.raises(ValueError, match="not allowed"):
            fetch(url, timeout_s=1)


def test_allowed_when_configured(server):
    assert fetch(server + "/img.png", allow_private=True) == Handler.image
    assert fetch(server + "/img.png", allow_hosts=["127.0.0.1"]) == Handler.image


def test_redirect_to_private_address_refused(server):
    # 127.0.0.1 is allowed explicitly; its redirect to "localhost" resolves to loopback and is not.
    assert fetch(server + "/redirect-same", allow_hosts=["127.0.0.1"]) == Handler.image
    with pytest.raises(ValueError, match="localhost resolves to a private"):
        fetch(server + "/redirect-local", allow_hosts=["127.0.0.1"])


def test_redirect_limit(server):
    with pytest.raises(ValueError, match="more than 0 redirects"):
        fetch(server + "/redirect-same", allow_private=True, max_redirects=0)


def test_size_time_and_status_limits(server):
    with pytest.raises(ValueError, match="more than the limit of 1000000"):
        fetch(server + "/big", allow_private=True, max_bytes=1_000_000)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="timed out"):
        fetch(server + "/slow", allow_private=True, timeout_s=0.5)
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ValueError, match="HTTP 404"):
        fetch(server + "/missing", allow_private=True)


def test_url_images_through_the_preprocessor(server, tiny_checkpoint):
    pre = g.Preprocessor(str(tiny_checkpoint), json.dumps({"allow_private": True}))
    by_url = pre.prepare_chat(chat(server + "/img.png"))
    by_data = pre.prepare_chat(chat(data_url(Handler.image)))
    assert by_url["input_ids"] == by_data["input_ids"]
    assert by_url["pixel_values"] == by_data["pixel_values"]
    strict = g.Preprocessor(str(tiny_checkpoint))
    with pytest.raises(ValueError, match=r"400: image 0: could not fetch http://127\.0\.0\.1.*not allowed"):
        strict.prepare_chat(chat(server + "/img.png"))
