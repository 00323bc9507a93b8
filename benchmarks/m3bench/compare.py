"""`m3serve bench compare`: several result JSONs (the arms of one experiment) side by side.

    m3serve bench compare ours.json upstream.json dense.json [--labels ours,upstream,dense]
        [--markdown out.md] [--plot-dir DIR] [--baseline upstream]

Writes a markdown table (one row per arm and concurrency, with the output-throughput ratio against the
baseline arm at the same concurrency) and plots with one line per arm.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    ("out tok/s", "output_throughput", None, 1),
    ("req/s", "request_throughput", None, 3),
    ("total tok/s", "total_throughput", None, 1),
    ("TTFT p50", "ttft_ms", "p50", 1),
    ("TTFT p90", "ttft_ms", "p90", 1),
    ("TTFT p99", "ttft_ms", "p99", 1),
    ("TPOT p50", "tpot_ms", "p50", 2),
    ("TPOT p99", "tpot_ms", "p99", 2),
    ("ITL p50", "itl_ms", "p50", 2),
    ("ITL p99", "itl_ms", "p99", 2),
    ("ITL max", "itl_ms", "max", 2),
    ("E2E p50", "e2e_latency_ms", "p50", 1),
    ("E2E p99", "e2e_latency_ms", "p99", 1),
)


def load(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("benchmark") != "m3bench-agentic" or "points" not in data:
        raise ValueError(f"{path} is not an m3bench result (no 'benchmark': 'm3bench-agentic' with points)")
    return data


def _cell(summary: dict[str, Any], key: str, stat: str | None, digits: int) -> str:
    v = summary[key] if stat is None else summary[key][stat]
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(arms: dict[str, dict[str, Any]], baseline: str | None = None) -> str:
    """Rows: arm x concurrency. Times in ms. `vs <baseline>` = output throughput ratio at equal concurrency."""
    base = {p["concurrency"]: p["summary"]["output_throughput"] for p in arms[baseline]["points"]} if baseline else {}
    head = ["arm", "conc", *(c[0] for c in COLUMNS), "cached", "failed"]
    if baseline:
        head.append(f"vs {baseline}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, result in arms.items():
        for p in result["points"]:
            s = p["summary"]
            ratio = s["cached_token_ratio"]
            row = [label, str(p["concurrency"]), *(_cell(s, k, st, d) for _, k, st, d in COLUMNS),
                   "-" if ratio is None else f"{ratio:.1%}", str(s["failed"])]
            if baseline:
                b = base.get(p["concurrency"])
                row.append(f"{s['output_throughput'] / b:.2f}x" if b else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_arms(arms: dict[str, dict[str, Any]], out_dir: str | Path, prefix: str = "compare_") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    panels = (("output_throughput", None, "output tokens / s"), ("ttft_ms", "p50", "TTFT p50 (ms)"),
              ("tpot_ms", "p50", "TPOT p50 (ms)"), ("e2e_latency_ms", "p50", "E2E p50 (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for ax, (key, stat, label) in zip(axes, panels):
        for name, result in arms.items():
            conc = [p["concurrency"] for p in result["points"]]
            vals = [p["summary"][key] if stat is None else p["summary"][key][stat] for p in result["points"]]
            ax.plot(conc, [float("nan") if v is None else v for v in vals], "o-", label=name)
        ax.set(xlabel="concurrency", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / f"{prefix}sweep.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="m3serve bench compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="result JSONs written by `m3serve bench --output`")
    p.add_argument("--labels", help="comma-separated arm names (default: the file names)")
    p.add_argument("--baseline", help="arm to compare output throughput against")
    p.add_argument("--markdown", help="write the table here (default: print it)")
    p.add_argument("--plot-dir", help="write compare_sweep.png here")
    args = p.parse_args(list(argv))
    labels = args.labels.split(",") if args.labels else [Path(r).stem for r in args.results]
    if len(labels) != len(args.results):
        p.error(f"--labels names {len(labels)} arms but {len(args.results)} result files were given")
    if len(set(labels)) != len(labels):
        p.error(f"arm labels must be distinct, got {labels}")
    if args.baseline and args.baseline not in labels:
        p.error(f"--baseline {args.baseline!r} is not one of the arms {labels}")
    try:
        arms = {label: load(path) for label, path in zip(labels, args.results)}
    except (OSError, ValueError) as exc:
        p.error(str(exc))
    table = markdown_table(arms, args.baseline)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
        print(f"table: {args.markdown}")
    else:
        print(table)
    if args.plot_dir:
        for path in plot_arms(arms, args.plot_dir):
            print(f"plot: {path}")
    return 0
