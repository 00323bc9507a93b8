"""Stacked bars of where a served step's GPU time goes, per arm, from profile_steps.py results.

    python benchmarks/agentic/plot_step_split.py OUT.png LABEL=RESULTS.json [LABEL=RESULTS.json ...]

One panel per step kind (the largest extend step of the round, and decode), one bar per (label, arm): kernel
time by kind (trace_split.KINDS), with the step's GPU span (first kernel start to last kernel end) marked; the
gap between the bar and the mark is time the GPU waited on the host.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

from trace_split import KINDS  # noqa: E402


def _pick(groups: list[dict], mode: str) -> dict | None:
    rows = [g for g in groups if g["mode"] == mode]
    return max(rows, key=lambda g: (g["tokens"] or 0, g["batch"])) if rows else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("runs", nargs="+", help="LABEL=profile_split.json")
    a = p.parse_args()
    bars = []  # (name, {mode: group})
    for spec in a.runs:
        label, path = spec.split("=", 1)
        for arm in json.loads(Path(path).read_text())["arms"]:
            if arm.get("status") == "ok":
                groups = arm["split"]["groups"]
                bars.append((f"{arm['arm']}\n{label}", {m: _pick(groups, m) for m in ("EXTEND", "DECODE")}))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, mode in zip(axes, ("EXTEND", "DECODE")):
        scale = 1e3  # µs -> ms
        for x, (_, steps) in enumerate(bars):
            g = steps[mode]
            if g is None:
                continue
            bottom = 0.0
            for i, kind in enumerate(KINDS):
                h = g["kernel_us"][kind] / scale
                ax.bar(x, h, bottom=bottom, color=f"C{i}", label=kind if x == 0 else None)
                bottom += h
            ax.plot([x - 0.4, x + 0.4], [g["gpu_span_us"] / scale] * 2, color="black", lw=2,
                    label="GPU span" if x == 0 else None)
        some = next((s[mode] for _, s in bars if s[mode]), None)
        what = (f"extend step, batch {some['batch']}, {some['tokens']:,} new tokens" if mode == "EXTEND" and some
                else "decode step, batch 8")
        ax.set_title(what)
        ax.set_ylabel("ms per step")
        ax.set_xticks(range(len(bars)), [name for name, _ in bars], fontsize=8)
    axes[0].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
