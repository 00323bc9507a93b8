"""A resent image through the gateway's image path: cold (cache off) vs repeat (prepared-image cache hit).

Same images as bench_images.py (same cases and seeds), sent as data: URLs, one CPU core. Per case, the
median of N runs of (cold/miss/repeat interleaved, chat_* interleaved, order rotated every run):
  preprocess_image:  m3serve._gateway.preprocess_image(bytes), bench_images.py's "Rust ms" (no hand-off), re-measured here
  cold:   Preprocessor(image_cache_bytes=0).prepare_images([url]): base64 decode + decode + resize + patchify
          + bf16 hand-off encoding, exactly the request path, cache disabled (nothing hashed or stored)
  miss:   the same with the cache on, first sight of the image (a fresh preprocessor per run): cold + BLAKE3 + insert
  repeat: the same image again with the cache on: BLAKE3 of the data: URL text + lookup
  chat_cold / chat_repeat: prepare_chat of a one-image request, cache off / the image cached; includes rendering,
          tokenization and the Python binding's JSON text of the hand-off (the server's analogue is writing it
          into the /generate body), which a hit does not remove.
The cache never touches the cold numbers: they run on a preprocessor whose cache is disabled.

Usage: python benchmarks/preprocess/bench_image_cache.py [--runs 24] [--out benchmarks/results/preprocess_images_cache]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_images import CASES, encode, natural_image, report_head, run_meta  # noqa: E402

MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/results/preprocess_images_cache")
    args = ap.parse_args(argv)

    import m3serve._gateway as g
    from m3serve.tiny_model import write_tiny_model

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    work = tempfile.TemporaryDirectory(prefix="m3-bench-image-cache-")
    ckpt = str(write_tiny_model(Path(work.name) / "tiny", seed=0))
    server_like = {"keep_pixel_values": False}  # the server keeps only the hand-off
    off = json.dumps({**server_like, "image_cache_bytes": 0})
    on = json.dumps(server_like)  # default bound (256 MiB)

    def timed(fn, arg) -> float:
        s = time.perf_counter()
        fn(arg)
        return (time.perf_counter() - s) * 1e3

    rows = []
    for name, fmt, h, w in CASES:
        data = encode(natural_image(zlib.crc32(name.encode()) % 997, h, w), fmt)  # bench_images.py's inputs
        url = f"data:{MIME[fmt]};base64," + base64.b64encode(data).decode()
        body = json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What changed on the screen?"},
                            {"type": "image_url", "image_url": {"url": url}},
                        ],
                    }
                ]
            }
        )
        cold, warm = g.Preprocessor(ckpt, off), g.Preprocessor(ckpt, on)
        grid = cold.prepare_images([url])[0]
        assert warm.prepare_images([url])[0] == grid
        assert warm.prepare_chat(body)["worker_image_data"] == cold.prepare_chat(body)["worker_image_data"]
        hits_before = warm.image_cache_stats()["hits"]
        t = {k: [] for k in ("preprocess_image", "cold", "miss", "repeat", "chat_cold", "chat_repeat")}
        # Three groups, each interleaved with its order rotated every run; kept apart because the
        # big Python objects of preprocess_image / prepare_chat leave the allocator in states that
        # shift the next call by a few ms.
        for run in range(args.runs):
            fresh = g.Preprocessor(ckpt, on)
            group = [("cold", cold.prepare_images, [url]), ("miss", fresh.prepare_images, [url])]
            group.append(("repeat", warm.prepare_images, [url]))
            k = run % len(group)
            for key, fn, arg in group[k:] + group[:k]:
                t[key].append(timed(fn, arg))
            del fresh
        for run in range(args.runs):
            group = [("chat_cold", cold.prepare_chat, body), ("chat_repeat", warm.prepare_chat, body)]
            for key, fn, arg in group[run % 2 :] + group[: run % 2]:
                t[key].append(timed(fn, arg))
        for _ in range(args.runs):
            t["preprocess_image"].append(timed(g.preprocess_image, data))
        stats = warm.image_cache_stats()
        assert stats["hits"] - hits_before == 2 * args.runs, stats  # every repeat was a hit
        assert cold.image_cache_stats()["hits"] == 0
        med = {k: round(statistics.median(v), 3) for k, v in t.items()}
        row = {
            "case": name,
            "bytes": len(data),
            "data_url_bytes": len(url),
            "grid_thw": list(grid),
            "tokens": grid[1] * grid[2] // 4,
            **{f"{k}_ms": v for k, v in med.items()},
            "repeat_speedup": round(med["cold"] / med["repeat"], 1),
            "entry_bytes": stats["bytes"],
        }
        rows.append(row)
        print(
            f"{name:22s} preprocess_image {med['preprocess_image']:6.2f}  cold {med['cold']:6.2f}  "
            f"miss {med['miss']:6.2f}  repeat {med['repeat']:6.3f} ms (x{row['repeat_speedup']})  "
            f"chat cold {med['chat_cold']:6.2f} / repeat {med['chat_repeat']:6.2f} ms",
            flush=True,
        )

    import PIL

    meta = run_meta(argv, args.runs, g.version(), pillow=PIL.__version__)
    meta.update({"wire_dtype": "bfloat16 (default)", "cache_bound_bytes": 256 << 20})
    out = Path(args.out)
    lines = [
        *report_head(out, meta, rows, "Prepared-image cache, one CPU core: a resent image, cold vs repeat"),
        "Inputs: bench_images.py's cases (same seeds) as data: URLs. Median ms; cold/miss/repeat interleaved, chat_* interleaved, order rotated.",
        "`preprocess_image`: bench_images.py's Rust function (f32 rows, no hand-off). `cold`: the request's image",
        "path with the cache disabled (base64 + decode + resize + patchify + bf16 hand-off encode). `miss`: cache on,",
        "first sight. `repeat`: the same data: URL again (BLAKE3 of the URL text + lookup). `chat_*`: a whole",
        "one-image `prepare_chat` through the Python binding (includes the hand-off's JSON text).",
        "",
        "| case | tokens | data URL KiB | preprocess_image ms | cold ms | miss ms | repeat ms | cold/repeat | "
        "chat cold ms | chat repeat ms | entry KiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['case']} | {r['tokens']} | {r['data_url_bytes'] / 1024:.0f} | {r['preprocess_image_ms']:.2f} | "
            f"{r['cold_ms']:.2f} | {r['miss_ms']:.2f} | {r['repeat_ms']:.3f} | {r['repeat_speedup']}x | "
            f"{r['chat_cold_ms']:.2f} | {r['chat_repeat_ms']:.2f} | {r['entry_bytes'] / 1024:.0f} |"
            for r in rows
        ),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out}.json and {out}.md")
    work.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
