"""Throughput and latency against concurrency, as PNGs (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_sweep(points: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "", prefix: str = "") -> list[Path]:
    """Write {prefix}throughput.png and {prefix}latency.png into `out_dir`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or CI
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conc = [p["concurrency"] for p in points]
    s = [p["summary"] for p in points]

    def series(metric: str, stat: str | None = None) -> list[float]:
        vals = [x[metric] if stat is None else x[metric][stat] for x in s]
        return [float("nan") if v is None else v for v in vals]

    paths = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(conc, series("output_throughput"), "o-")
    ax[0].set(xlabel="concurrency", ylabel="output tokens / s", title="output throughput")
    ax[1].plot(conc, series("request_throughput"), "o-")
    ax[1].set(xlabel="concurrency", ylabel="requests / s", title="request throughput")
    for a in ax:
        a.set_xticks(conc)
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out / f"{prefix}throughput.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for a, metric, label in zip(ax, ("ttft_ms", "tpot_ms", "e2e_latency_ms"),
                                ("time to first token", "time per output token", "end-to-end latency")):
        for stat in ("p50", "p90", "p99"):
            a.plot(conc, series(metric, stat), "o-", label=stat)
        a.set(xlabel="concurrency", ylabel="ms", title=label)
        a.set_xticks(conc)
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out / f"{prefix}latency.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
