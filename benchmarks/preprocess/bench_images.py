"""Image preprocessing on one CPU core: the Rust gateway vs the Hugging Face M3 image processor.

Both sides start from the encoded bytes and end with `pixel_values` + `image_grid_thw`:
  HF:   PIL open + convert("RGB") + MiniMaxM3VLImageProcessor (transformers' torchvision backend), 1 torch thread
  Rust: m3serve._gateway.preprocess_image (decode + smart_resize + bicubic + normalize + patchify), GIL released
Timings interleave the two, median of N runs after warm-up, process pinned to one core. Parity (max/mean
|diff| in normalized units) is measured on the same inputs.

Usage: python benchmarks/preprocess/bench_images.py [--runs 15] [--out benchmarks/results/preprocess_images]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def natural_image(seed: int, h: int, w: int) -> np.ndarray:
    """Deterministic photo-like content: gradients, band-limited texture, hard edges, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 180 + 30, y / h * 160 + 40, (x + y) / (w + h) * 200 + 20], -1)
    for octave in (64, 16, 4):
        small = np.clip(rng.normal(0, 30, (h // octave + 2, w // octave + 2, 3)) + 128, 0, 255).astype(np.uint8)
        img += np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32) - 128
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(2, w // 3 + 3)), y0 + int(rng.integers(2, h // 3 + 3))
        draw.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    arr = np.asarray(pil, np.float32) + rng.normal(0, 3, (h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


CASES = [
    ("JPEG q90 1920x1080", "JPEG", 1080, 1920),
    ("JPEG q90 1280x720", "JPEG", 720, 1280),
    ("JPEG q90 640x480", "JPEG", 480, 640),
    ("PNG 1920x1080", "PNG", 1080, 1920),
    ("WebP q90 1280x720", "WEBP", 720, 1280),
    ("GIF 800x600", "GIF", 600, 800),
]


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/preprocess_images")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl import MiniMaxM3VLImageProcessor

    import m3serve._gateway as g

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    proc = MiniMaxM3VLImageProcessor()
    rows = []
    for name, fmt, h, w in CASES:
        data = encode(natural_image(zlib.crc32(name.encode()) % 997, h, w), fmt)  # stable seed

        def hf(data=data):
            return proc(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")

        def rust(data=data):
            return g.preprocess_image(data)

        want, got = hf(), rust()
        pixels = np.frombuffer(got[0], np.float32).reshape(got[1])
        diff = np.abs(pixels - want["pixel_values"].numpy())
        assert got[2] == tuple(want["image_grid_thw"][0].tolist())
        t_hf, t_rs = [], []
        for _ in range(args.runs):
            s = time.perf_counter()
            hf()
            t_hf.append(time.perf_counter() - s)
            s = time.perf_counter()
            rust()
            t_rs.append(time.perf_counter() - s)
        med_hf, med_rs = statistics.median(t_hf) * 1e3, statistics.median(t_rs) * 1e3
        rows.append(
            {
                "case": name,
                "bytes": len(data),
                "grid_thw": list(got[2]),
                "tokens": got[2][1] * got[2][2] // 4,
                "hf_ms": round(med_hf, 2),
                "rust_ms": round(med_rs, 2),
                "speedup": round(med_hf / med_rs, 2),
                "rust_img_per_s": round(1000 / med_rs, 1),
                "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()),
            }
        )
        print(f"{name:22s} HF {med_hf:7.2f} ms  Rust {med_rs:7.2f} ms  x{med_hf / med_rs:4.2f}  max|d| {diff.max():.4f}", flush=True)

    meta = run_meta(argv, args.runs, g.version(), torch=torch.__version__, transformers=transformers.__version__,
                    pillow=Image.__version__)
    out = Path(args.out)
    lines = [
        *report_head(out, meta, rows, "Image preprocessing, one CPU core: Rust gateway vs HF MiniMaxM3VLImageProcessor"),
        "Both sides: encoded bytes -> pixel_values (float32) + image_grid_thw; median of the runs, interleaved.",
        "Parity: |Rust - HF| in normalized units (one 8-bit level = 0.015).",
        "",
        "| case | tokens | HF ms | Rust ms | speed-up | Rust img/s | max abs diff | mean abs diff |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['case']} | {r['tokens']} | {r['hf_ms']} | {r['rust_ms']} | {r['speedup']}x | {r['rust_img_per_s']} | "
            f"{r['max_abs_diff']:.4f} | {r['mean_abs_diff']:.5f} |"
            for r in rows
        ),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out}.json and {out}.md")
    return 0


def run_meta(argv: list[str] | None, runs: int, gateway_version: str, **versions: str) -> dict:
    """The header every preprocessing benchmark writes: when, how, on what, with which versions."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs), "
        f"load average {os.getloadavg()[0]:.1f}",
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        **versions,
        "gateway": gateway_version,
        "runs": runs,
        "pinned_cores": 1,
    }


def report_head(out: Path, meta: dict, rows: list[dict], title: str) -> list[str]:
    """Write `out`.json (meta + rows) and return the markdown report's first lines (title, then meta)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    return [f"# {title}", "", *(f"- {k}: {v}" for k, v in meta.items()), ""]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
