"""Streamed /generate from a real worker, cumulative events (SGLang's default) against deltas
(`--incremental-streaming-output`, what `m3serve worker` sets): bytes on the wire and wall time per reply.

Each mode starts one worker (`m3serve worker` on the tiny model, CPU unless --device says otherwise) and streams
greedy replies of each length with ignore_eos, interleaving nothing else. Results: markdown + JSON + a plot.

Run from the repository root:
  .venv/bin/python benchmarks/gateway/bench_stream_mode.py --tokens 250 1000 2000 --reps 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))

from m3serve.serving.processes import ManagedProcess, free_port, wait_healthy  # noqa: E402
from m3serve.serving.worker import build_launch  # noqa: E402

FLAG = "--incremental-streaming-output"


def stream_once(url: str, tokens: int) -> dict:
    """One streamed greedy reply of `tokens` tokens: bytes received, events, wall seconds."""
    body = json.dumps({"input_ids": list(range(1, 9)), "stream": True,
                       "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True, "temperature": 0}})
    req = urllib.request.Request(url + "/generate", data=body.encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    nbytes = events = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            nbytes += len(line)
            events += line.startswith(b"data:")
    return {"bytes": nbytes, "events": events, "wall_s": time.perf_counter() - t0}


def run_mode(model: str, incremental: bool, lengths: list[int], reps: int, device: str, log_dir: Path) -> list[dict]:
    launch = build_launch(["--model-path", model, "--device", device, "--port", str(free_port()),
                           "--max-total-tokens", "16384"], dict(os.environ))
    command = [a for a in launch.command if a != FLAG] + ([FLAG] if incremental else [])
    mode = "deltas" if incremental else "cumulative"
    proc = ManagedProcess(f"worker-{mode}", command, launch.env, log_dir / f"worker_{mode}.log").start()
    rows = []
    try:
        wait_healthy(launch.url, [proc], 600)
        stream_once(launch.url, 8)  # warm-up
        for n in lengths:
            runs = []
            for r in range(reps):
                runs.append(stream_once(launch.url, n))
                print(f"  {mode:>10} {n:>5} tokens, rep {r + 1}: {runs[-1]['bytes']:>10} B "
                      f"{runs[-1]['wall_s']:.2f} s", flush=True)
            rows.append({"mode": mode, "tokens": n, "bytes": runs[0]["bytes"], "events": runs[0]["events"],
                         "wall_s_median": statistics.median(x["wall_s"] for x in runs),
                         "wall_s": [round(x["wall_s"], 3) for x in runs]})
    finally:
        proc.stop()
    return rows


def write_results(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/gateway/bench_stream_mode.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()} ({os.cpu_count()} logical CPUs), load average {os.getloadavg()}",
            "device": args.device, "model": "tiny M3 (m3serve tiny-model)", "python": platform.python_version()}
    (out / "worker_stream_mode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Streamed /generate: cumulative events against deltas", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| tokens | cumulative bytes | delta bytes | ratio | cumulative wall s | delta wall s |",
              "|---:|---:|---:|---:|---:|---:|"]
    by = {(r["mode"], r["tokens"]): r for r in rows}
    for n in args.tokens:
        c, d = by[("cumulative", n)], by[("deltas", n)]
        lines.append(f"| {n} | {c['bytes']:,} | {d['bytes']:,} | {c['bytes'] / d['bytes']:.1f}x | "
                     f"{c['wall_s_median']:.2f} | {d['wall_s_median']:.2f} |")
    (out / "worker_stream_mode.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode in ("cumulative", "deltas"):
        xs = [r["tokens"] for r in rows if r["mode"] == mode]
        a.plot(xs, [r["bytes"] / 1e6 for r in rows if r["mode"] == mode], "o-", label=mode)
        b.plot(xs, [r["wall_s_median"] for r in rows if r["mode"] == mode], "o-", label=mode)
    a.set(xlabel="reply tokens", ylabel="MB streamed", title="bytes per reply")
    b.set(xlabel="reply tokens", ylabel="seconds", title=f"wall time per reply ({args.device}, tiny M3)")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "worker_stream_mode.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[250, 1000, 2000])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        from m3serve.tiny_model import write_tiny_model

        model = write_tiny_model(Path(tmp) / "tiny")
        rows = []
        for incremental in (False, True):
            rows += run_mode(str(model), incremental, args.tokens, args.reps, args.device, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(rows, args, args.out)
    print((args.out / "worker_stream_mode.md").read_text())


if __name__ == "__main__":
    main()
