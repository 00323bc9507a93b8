"""Template + tokenization when agent sessions start together on one long shared prefix.

8 requests (default) arrive at once, each the same new ~60k-token conversation (system prompt, tools, history)
followed by its own user message: the start of an agentic benchmark round. Measured on every core of this
machine, as the gateway runs them (one blocking task per request):
  * "single flight": the segment cache as served; the first request to miss a segment encodes it and the
    others wait for its ids;
  * "every request encodes": the cache off, which is what a burst of concurrent misses cost before single
    flight (the cache was empty for all of them).
Wall time until all are prepared, and per-request latency. Writes benchmarks/results/preprocess_template_burst.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_template as bt  # noqa: E402


def burst(pre, requests: list[str]) -> dict:
    """Prepare every request on its own thread, all released together; wall and per-request ms."""
    barrier = threading.Barrier(len(requests) + 1)
    latency: list[float] = [0.0] * len(requests)
    ids: list[list[int]] = [[] for _ in requests]

    def one(i: int) -> None:
        barrier.wait()
        t = time.perf_counter()
        ids[i] = pre.prepare_chat(requests[i])["input_ids"]
        latency[i] = (time.perf_counter() - t) * 1e3

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = (time.perf_counter() - t0) * 1e3
    return {"wall_ms": wall, "p50_ms": statistics.median(latency), "max_ms": max(latency), "ids": ids}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=60000)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/preprocess_template_burst")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import m3serve._gateway as g
    from m3serve.tiny_model import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-burst-"))
    rows = {"single flight": [], "every request encodes": []}
    try:
        ckpt = bt.build_checkpoint(Path(write_tiny_model(work / "tiny", seed=0)), work / "ckpt32k")
        probe = g.Preprocessor(str(ckpt), json.dumps({"cache_max_tokens": 0}))
        for r in range(args.rounds):
            # A new shared prefix each round (other seed), so the served cache starts cold every round.
            body = bt.conversation(args.tokens, lambda b: len(probe.prepare_chat(json.dumps(b))["input_ids"]),
                                   seed=100 + r)
            requests = []
            for s in range(args.sessions):
                b = json.loads(json.dumps(body))
                b["messages"].append({"role": "user", "content": f"Session {s}: continue with step {r}."})
                requests.append(json.dumps(b))
            want = [probe.prepare_chat(q)["input_ids"] for q in requests]
            for name, cfg in (("single flight", {}), ("every request encodes", {"cache_max_tokens": 0})):
                pre = g.Preprocessor(str(ckpt), json.dumps(cfg))
                res = burst(pre, requests)
                assert res.pop("ids") == want, f"{name}: ids differ from a cold encode"
                if name == "single flight":
                    res["cache_stats"] = pre.cache_stats()
                rows[name].append(res)
            print(f"round {r}: " + ", ".join(f"{n} {v[-1]['wall_ms']:.0f} ms" for n, v in rows.items()), flush=True)
        prompt_tokens = len(want[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {name: {k: round(statistics.median(x[k] for x in v), 1) for k in ("wall_ms", "p50_ms", "max_ms")}
               for name, v in rows.items()}
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()} ({os.cpu_count()} logical CPUs), load average {os.getloadavg()[0]:.1f}",
        "python": platform.python_version(),
        "gateway": g.version(),
        "sessions": args.sessions,
        "rounds": args.rounds,
        "prompt_tokens": prompt_tokens,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "rounds": rows}, indent=1) + "\n")
    md = ["# Template + tokenization of a burst of sessions on one new shared prefix", ""]
    md += [f"- {k}: {v}" for k, v in meta.items()]
    md += ["", f"{args.sessions} requests at once, each ~{prompt_tokens:,} tokens of which all but the last user "
           "message are shared; median over the rounds (a new prefix each round).", "",
           "| cache | wall ms (all prepared) | per-request p50 ms | per-request max ms |", "|---|---|---|---|"]
    for name, s in summary.items():
        md.append(f"| {name} | {s['wall_ms']} | {s['p50_ms']} | {s['max_ms']} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
