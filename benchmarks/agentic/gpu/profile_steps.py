"""Where a served agentic turn spends its GPU time, per arm: a profiled window of SGLang serving m3-slice.

Why: the end-to-end benchmark (run_e2e.py) measures time to first token and output throughput, and the
arms came out within a few percent of each other; this says, from the server's own trace, how much of an
extend step and of a decode step each kind of work takes (trace_split.py: index scoring + top-k, sparse
attention, dense attention, MoE experts, other GEMMs, other), so the reading rests on measurements.

Per arm (the same workers, flags and model as run_e2e.py): start the worker; put the shared prefix into the
radix cache (one request); run one unprofiled round of the workload (Triton compiles, graph shapes); then
start SGLang's profiler (/start_profile), run the round again with new suffixes, stop it (/stop_profile)
and split the trace. A round = `batch` requests at once, each the shared prefix + `new` unique tokens,
`decode` output tokens (ignore_eos): the kernel benchmark's "extend B=8, 2,048 new tokens on a 60k
prefix", then decode steps at that batch, as SGLang schedules them.

    python benchmarks/agentic/gpu/profile_steps.py --out DIR [--arms ours,upstream] [--device cuda|cpu]
        [--tiny] [--prefix 60000] [--new 2048] [--batch 8] [--decode 32] [--no-graphs]
Writes DIR/profile_split.json (every step, and per-group medians) and DIR/profile_split.md; prints the tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run_e2e  # noqa: E402
import trace_split  # noqa: E402


def _post(url: str, body: dict[str, Any] | None, timeout_s: float) -> bytes:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return r.read()


def usable_token_ids(model_dir: Path) -> list[int]:
    """Ordinary token ids of the checkpoint's tokenizer (no special or added tokens)."""
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    added = {t["id"] for t in tok.get("added_tokens", [])}
    return [i for i in tok["model"]["vocab"].values() if i not in added]


def make_round(ids: list[int], rng: random.Random, prefix: list[int], batch: int, new: int) -> list[list[int]]:
    return [prefix + [rng.choice(ids) for _ in range(new)] for _ in range(batch)]


def run_round(url: str, prompts: list[list[int]], decode: int, timeout_s: float) -> float:
    """All prompts at once (one thread each); wall seconds until the last answer."""
    body = lambda p: {"input_ids": p, "sampling_params": {  # noqa: E731
        "max_new_tokens": decode, "ignore_eos": True, "temperature": 1.0}}
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(lambda p: _post(url + "/generate", body(p), timeout_s), prompts))
    return time.monotonic() - t0


def wait_trace(folder: Path, timeout_s: float) -> Path:
    """The trace file SGLang writes after /stop_profile (its size stable for a second)."""
    end, last = time.monotonic() + timeout_s, None
    while time.monotonic() < end:
        found = sorted(folder.glob("*.trace.json*"))
        if found:
            size = found[-1].stat().st_size
            if size and size == last:
                return found[-1]
            last = size
        time.sleep(1.0)
    raise TimeoutError(f"no trace in {folder} after {timeout_s:.0f} s")


def profile_arm(arm: str, args: argparse.Namespace, model_dir: Path, arm_site: Path, work: Path) -> dict[str, Any]:
    from m3serve.serving.processes import ManagedProcess, free_port, wait_healthy

    shape = run_e2e.Shape(args.prefix, args.new, 0, 2, args.decode, args.batch,
                          max(65_536, 2 * (args.prefix + 2 * args.batch * (args.new + args.decode))))
    graphs = args.graphs and args.device == "cuda"
    flags = run_e2e.server_flags(shape, args.device, None, args.batch, cuda_graph=graphs)
    launch = run_e2e.worker_launch(arm, model_dir, free_port(), args.device, flags, dict(os.environ),
                                   work / f"markers_{arm}", arm_site)
    log = work / f"{arm}_worker.log"
    out: dict[str, Any] = {"arm": arm, "flags": flags, "cuda_graph": graphs}
    proc = ManagedProcess(f"worker-{arm}", launch.command, launch.env, log).start()
    try:
        t0 = time.monotonic()
        wait_healthy(launch.url, [proc], args.start_timeout_s)
        out["startup_s"] = round(time.monotonic() - t0, 1)
        rng = random.Random(args.seed)
        ids = usable_token_ids(model_dir)
        prefix = [rng.choice(ids) for _ in range(args.prefix)]
        out["prime_s"] = round(run_round(launch.url, [prefix + [ids[0]]], 1, args.request_timeout_s), 2)
        out["warm_round_s"] = round(run_round(launch.url, make_round(ids, rng, prefix, args.batch, args.new),
                                              args.decode, args.request_timeout_s), 2)
        trace_dir = work / f"trace_{arm}"
        trace_dir.mkdir(parents=True, exist_ok=True)
        _post(launch.url + "/start_profile", {
            "output_dir": str(trace_dir), "activities": ["CPU", "GPU"] if args.device == "cuda" else ["CPU"],
            "with_stack": False, "record_shapes": False, "profile_prefix": arm}, 60)
        out["profiled_round_s"] = round(run_round(launch.url, make_round(ids, rng, prefix, args.batch, args.new),
                                                  args.decode, args.request_timeout_s), 2)
        _post(launch.url + "/stop_profile", None, 120)
        trace = wait_trace(trace_dir, args.trace_timeout_s)
        out["trace"] = trace.name
        out["trace_bytes"] = trace.stat().st_size
        out["split"] = trace_split.split_trace(trace_split.load_events(trace))
        out["status"] = "ok"
    except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as e:
        out["status"], out["reason"] = "failed", f"{type(e).__name__}: {str(e)[-800:]}"
        out["log_tail"] = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    finally:
        proc.stop()
    return out


def report_md(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Served step split: {meta['card']}", "",
             f"- date (UTC): {meta['date']}",
             f"- command: `{meta['command']}`",
             f"- versions: {meta['versions']}",
             f"- workload per round: {meta['batch']} requests at once, each a {meta['prefix']:,}-token shared prefix "
             f"(cached) + {meta['new']:,} new tokens, {meta['decode']} output tokens; the profiled round follows "
             "an unprofiled one with other suffixes",
             "- µs per step, median over the steps of each group; kinds from `trace_split.py`; 'kernels busy' sums "
             "kernel times, 'GPU span' runs from a step's first kernel start to its last kernel end", ""]
    for r in results:
        if r.get("status") != "ok":
            lines += [f"**{r['arm']}**: {r.get('status')} ({r.get('reason', '')})", ""]
            continue
        lines += [trace_split.format_groups(r["split"]["groups"],
                                            f"{r['arm']} (round {r['profiled_round_s']} s, "
                                            f"CUDA graphs {'on' if r['cuda_graph'] else 'off'})"), ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--work", type=Path, help="scratch (model, logs, traces); default OUT/../profile_work")
    p.add_argument("--arms", default="ours,upstream")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="the CPU-sized model (dry runs)")
    p.add_argument("--prefix", type=int, default=60_000)
    p.add_argument("--new", type=int, default=2_048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-graphs", dest="graphs", action="store_false")
    p.add_argument("--start-timeout-s", type=float, default=300.0)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--trace-timeout-s", type=float, default=120.0)
    a = p.parse_args(argv)
    for arm in a.arms.split(","):
        if arm not in run_e2e.ARMS:
            p.error(f"--arms: {arm!r} is not one of {', '.join(run_e2e.ARMS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from slice_model import SLICE_SIZES, TINY_SIZES, write_slice_model

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out.parent / "profile_work"
    work.mkdir(parents=True, exist_ok=True)
    sizes = TINY_SIZES if args.tiny else SLICE_SIZES
    arm_site = run_e2e.write_arm_dist(work / "arm_site")
    info = run_e2e._device_info(args.device)
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "command": "python benchmarks/agentic/gpu/profile_steps.py " + " ".join(argv or sys.argv[1:]),
            "card": info.get("card") or info.get("nvidia_smi") or args.device, "device_info": info,
            "versions": ", ".join(f"{k} {info.get(k)}" for k in ("python", "torch", "triton", "sglang")),
            "prefix": args.prefix, "new": args.new, "batch": args.batch, "decode": args.decode,
            # switches the workers inherit (e.g. M3SERVE_FUSED_OPS=0 for the native-ops A/B)
            "m3serve_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("M3SERVE_")}}
    models = {}
    results = []
    for arm in args.arms.split(","):
        variant = run_e2e.MODEL_VARIANT[arm]
        if variant not in models:
            models[variant] = write_slice_model(work / f"model_{variant}", variant, sizes)
        print(f"[profile] {arm}: starting", flush=True)
        r = profile_arm(arm, args, models[variant], arm_site, work)
        print(f"[profile] {arm}: {r['status']} {r.get('reason', '')}", flush=True)
        results.append(r)
        # after every arm: a call cut off by its time limit keeps the arms it finished
        (args.out / "profile_split.json").write_text(json.dumps({"meta": meta, "arms": results}, indent=1))
        md = report_md(results, meta)
        (args.out / "profile_split.md").write_text(md + "\n")
    print(md)
    return 0 if all(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
