"""Plots of an end-to-end agentic result (benchmarks/agentic/gpu/run_e2e.py's summary.json), on this machine.

    python benchmarks/agentic/plot_e2e.py RESULTS.json OUT_PREFIX

writes OUT_PREFIX_throughput.png (output tokens/s against concurrency, one line per arm) and
OUT_PREFIX_latency.png (TTFT p50 and TPOT p50 against concurrency), e.g.
`benchmarks/agentic/plot_e2e.py benchmarks/results/agentic_e2e_h100_sweep.json benchmarks/results/agentic_e2e_h100_sweep`.
Each point is one arm at one concurrency level (the median run where the level ran more than once); arms
measured in CUDA graphs are labelled so. Results without a sweep give one point per arm. matplotlib is
used headless (Agg); the GPU bundle does not carry it, so plot here from the returned JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

from run_e2e import sweep_points  # noqa: E402

STYLE = {"ours": ("C0", "o"), "upstream": ("C1", "s"), "dense": ("C2", "^")}


def _series(points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        if p.get("output_tok_s") is not None:
            by_arm.setdefault(p["arm"], []).append(p)
    return {a: sorted(ps, key=lambda p: p["concurrency"]) for a, ps in by_arm.items()}


def _label(report: dict[str, Any], arm: str) -> str:
    mode = (report.get("arms", {}).get(arm) or {}).get("measured_mode")
    return f"{arm} ({mode})" if mode and mode != "eager" else arm


def plot_results(report: dict[str, Any], prefix: str | Path) -> list[Path]:
    """Write PREFIX_throughput.png and PREFIX_latency.png; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(sweep_points(report))
    if not series:
        raise ValueError("no arm has a successful bench run in these results")
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    env = report.get("environment") or {}
    title = (f"agentic e2e ({report.get('shape_name')}) on {env.get('card') or env.get('device') or '?'}, "
             f"prefix {(report.get('shape') or {}).get('prefix_tokens')}")
    levels = sorted({p["concurrency"] for ps in series.values() for p in ps})
    paths = []

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _lines(ax, series, "output_tok_s", report)
    ax.set(xlabel="concurrency (sessions)", ylabel="output tokens / s", title="output throughput")
    _axes(ax, levels)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths.append(Path(f"{prefix}_throughput.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axs = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, name in zip(axs, ("ttft_p50", "tpot_p50"), ("time to first token p50", "time per output token p50")):
        _lines(ax, series, key, report)
        ax.set(xlabel="concurrency (sessions)", ylabel="ms", title=name)
        _axes(ax, levels)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths.append(Path(f"{prefix}_latency.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def _lines(ax: Any, series: dict[str, list[dict[str, Any]]], key: str, report: dict[str, Any]) -> None:
    """One line per arm: `key` against concurrency."""
    for arm, ps in series.items():
        color, marker = STYLE.get(arm, (None, "o"))
        ax.plot([p["concurrency"] for p in ps], [p[key] for p in ps], marker=marker, color=color,
                label=_label(report, arm))


def _axes(ax: Any, levels: list[int]) -> None:
    if len(levels) > 1 and max(levels) / min(levels) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(levels)
    ax.set_xticklabels([str(c) for c in levels])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="summary.json of run_e2e.py (e.g. benchmarks/results/agentic_e2e_h100_full.json)")
    p.add_argument("prefix", help="output path prefix: PREFIX_throughput.png, PREFIX_latency.png")
    args = p.parse_args(argv)
    report = json.loads(Path(args.results).read_text())
    for path in plot_results(report, args.prefix):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
