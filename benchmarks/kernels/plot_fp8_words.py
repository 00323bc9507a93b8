"""Plot round 12's fp8 decode A/B (benchmarks/results/msa_kernels_r12_fp8_words.json): the fp8 layer's ratio to our
bf16 layer per bench_msa run against the 1.7x target, and fp8 decode attention time per batch, K/V loaded as bytes
or as 32-bit words, per card.

    .venv/bin/python benchmarks/kernels/plot_fp8_words.py benchmarks/results/msa_kernels_r12_fp8_words.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CASES = ["B=1 N=60000 fp8", "B=8 N=60000 shared fp8", "B=32 N=60000 fp8"]


def main(path: str) -> None:
    doc = json.loads(Path(path).read_text())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    runs = [r for r in doc["bench_msa_fp8"] if r["heads"] == "64/4" and "H100" in r["card"]]
    for i, setting in enumerate(("bytes", "words")):
        ratios = [r["ratio"] for r in runs if r["setting"] == setting]
        ax1.scatter([i] * len(ratios), ratios, s=40, label=f"{setting} ({len(ratios)} runs)")
    ax1.axhline(1.7, color="red", ls="--", lw=1, label="target 1.7x")
    ax1.set_xticks([0, 1], ["bytes", "words"])
    ax1.set_xlim(-0.6, 1.6)
    ax1.set_ylabel("fp8 layer speedup over our bf16 layer")
    ax1.set_title("bench_msa fp8, B=32 x 60k, 64/4 heads, H100")
    ax1.legend(fontsize=8)
    width = 0.2
    for j, (card, setting) in enumerate([("H100", "fp8 bytes"), ("H100", "fp8 words"), ("H200", "fp8 bytes"),
                                         ("H200", "fp8 words")]):
        ys = []
        for case in CASES:
            vals = [p["attn_us"] for p in doc["profile_decode"]
                    if card in p["card"] and p["setting"] == setting and p["case"] == case]
            ys.append(statistics.median(vals) if vals else float("nan"))
        ax2.bar([k + (j - 1.5) * width for k in range(len(CASES))], ys, width, label=f"{card} {setting}")
    ax2.set_xticks(range(len(CASES)), [c.replace(" fp8", "").replace("N=60000", "60k") for c in CASES])
    ax2.set_ylabel("decode attention, µs (median, CUDA graph)")
    ax2.set_title("fp8 decode attention: bytes vs words")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
