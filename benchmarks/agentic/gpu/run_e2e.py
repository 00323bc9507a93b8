"""One call, three arms: the agentic benchmark end to end through SGLang on one GPU (issue 7, part 2).

For each arm the same SGLang 0.5.23 server (portable platform, CUDA flavour; same flags, scheduler and
dummy weights) serves the scaled model m3-slice; only the sparse layers' attention differs:
  ours      m3serve's M3 plugin: sparse layers -> msa_kernels (plan/run: index top-k + sparse attention)
  upstream  SGLang's own Triton MSA kernels (m3serve's plugin excluded; e2e_arm_plugin installs only the
            KV-pool and MoE-layout hooks SGLang needs on an out-of-tree platform)
  dense     every layer dense attention (config variant with sparse_attention_freq all 0), SGLang's
            Triton attention backend: a speed reference, not M3 semantics
Per arm: start the worker (and the m3serve gateway in front when its extension is there), wait for
/health, check that greedy logprobs are finite (dummy weights), a throw-away warm-up pass (fills the
prefix cache and gets past Triton's first compiles), then `m3serve bench` at the chosen shape, then stop
the server's whole process group. The servers may start in parallel (Triton compiles overlap) but are
measured one at a time. Everything lands in --out: summary.json (every arm's full m3bench result),
summary.md (the table), logs.tar.gz (server, gateway and bench logs). The table is printed last.

    python benchmarks/agentic/gpu/run_e2e.py --out DIR [--shape full|quick|dry] [--device cuda|cpu]
        [--arms ours,upstream,dense] [--budget-s 460] [--gateway auto|on|off] [--parallel-start]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform as host_platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
ARMS = ("ours", "upstream", "dense")
ARM_PLUGIN_ENV = {"upstream": {"M3SERVE_SPARSE_BACKEND": "upstream",
                               "SGLANG_PLUGINS": "m3serve_portable,m3serve_upstream_arm"}}
MODEL_VARIANT = {"ours": "sparse", "upstream": "sparse", "dense": "dense"}
# SGLang's /health waits for the scheduler, which blocks for seconds while Triton compiles a new shape at
# serving time (eager mode); with the gateway's default health checks (every 5 s, out after 2 failures)
# the first H100 smoke run lost its only worker mid-warm-up ("No healthy worker", HTTP 503). The benchmark
# has one worker per gateway, so eviction can only hurt: check rarely and never take it out.
GATEWAY_ARGS = ["--served-model-name", "m3-slice", "--upstream-timeout", "600",
                "--health-interval", "30", "--health-failure-threshold", "100000"]


@dataclass(frozen=True)
class Shape:
    """Traffic of one `m3serve bench` run (research/perf_anchors.md 4.1, scaled down for the time limit)."""

    prefix_tokens: int
    user_tokens: int
    tool_result_tokens: int
    turns: int
    output_tokens: int
    concurrency: int
    max_total_tokens: int  # KV pool per server (tokens): must hold the prefix + every session's history

    def kv_tokens_needed(self) -> int:
        per_session = self.user_tokens + self.turns * self.output_tokens + (self.turns - 1) * (
            self.tool_result_tokens + 64)  # + chat-template tokens per turn, generously
        return self.prefix_tokens + self.concurrency * per_session


SHAPES: dict[str, Shape] = {
    # agentic-60k-c8: 60k shared prefix, 8 sessions; 3 turns (not 8) so three arms fit one 10-minute call
    # (the H100 smoke ran eager decode at ~60-80 ms a step at c8: 768 steps per arm is about a minute).
    "full": Shape(60_000, 1_024, 1_536, 3, 256, 8, 262_144),
    # smoke: the same pipeline at 8k prefix, 2 turns.
    "quick": Shape(8_000, 512, 512, 2, 64, 8, 65_536),
    # CPU dry run of the whole pipeline (tiny model).
    "dry": Shape(600, 64, 64, 2, 8, 2, 8_192),
}


@dataclass
class ArmResult:
    arm: str
    status: str = "not run"  # ok | failed | skipped | not run
    reason: str | None = None
    base_url: str | None = None
    via_gateway: bool = False
    gateway_note: str | None = None
    startup_s: float | None = None
    probe: dict[str, Any] | None = None
    warmup_s: float | None = None
    bench_s: float | None = None
    bench_rc: int | None = None
    bench: dict[str, Any] | None = None  # m3bench's JSON
    plugin_markers: list[dict] = field(default_factory=list)
    server_log_stats: dict[str, Any] = field(default_factory=dict)
    worker_command: list[str] = field(default_factory=list)
    bench_command: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- commands

def server_flags(shape: Shape, device: str, mem_fraction: float | None = None) -> list[str]:
    """SGLang flags shared by every arm (only the model variant and the plugin differ between arms)."""
    flags = [
        "--load-format", "dummy",           # weights are initialised by SGLang (they cannot travel)
        "--disable-cuda-graph",              # the torch-native MoE is not capturable (feasibility note 3 #5)
        "--max-total-tokens", str(shape.max_total_tokens),
        "--max-running-requests", str(max(16, 2 * shape.concurrency)),
        "--context-length", str(max(32_768, 2 ** math.ceil(math.log2(shape.kv_tokens_needed())))),
        "--enable-cache-report",             # usage.prompt_tokens_details.cached_tokens
        "--random-seed", "0",
        "--served-model-name", "m3-slice",
        "--log-level", "info",
    ]
    if device == "cuda":
        flags += ["--mem-fraction-static", str(mem_fraction if mem_fraction is not None else 0.85)]
    return flags


def worker_launch(arm: str, model_dir: Path, port: int, device: str, flags: list[str],
                  base_env: dict[str, str], marker_dir: Path, arm_site: Path):
    """The m3serve worker launch (command + env) of one arm."""
    from m3serve.serving.worker import build_launch

    argv = ["--model-path", str(model_dir), "--device", device, "--host", "127.0.0.1", "--port", str(port), *flags]
    launch = build_launch(argv, dict(base_env))
    env = launch.env
    # The arm plugin module and its entry-point dist-info (both inert unless the upstream arm selects them).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(arm_site), str(HERE), env.get("PYTHONPATH")) if p)
    env["M3SERVE_PLUGIN_MARKER_DIR"] = str(marker_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(ARM_PLUGIN_ENV.get(arm, {}))
    return launch


def write_arm_dist(site: Path) -> Path:
    """A dist-info that registers e2e_arm_plugin as the SGLang plugin `m3serve_upstream_arm`."""
    di = site / "m3serve_e2e_arm-0.1.0.dist-info"
    di.mkdir(parents=True, exist_ok=True)
    (di / "METADATA").write_text("Metadata-Version: 2.1\nName: m3serve-e2e-arm\nVersion: 0.1.0\n")
    (di / "entry_points.txt").write_text("[sglang.srt.plugins]\nm3serve_upstream_arm = e2e_arm_plugin:register\n")
    return site


def bench_command(base_url: str, tokenizer_dir: Path, shape: Shape, out_json: Path, timeout_s: float,
                  warmup_pass: bool = False, seed: int = 0, temperature: float = 1.0,
                  warmup_turns: int = 1) -> list[str]:
    """`m3serve bench` (m3bench) argv.

    The warm-up pass runs other sessions (another seed) over the same shared prefix. With `warmup_turns`
    equal to the shape's turns it is the measured run's twin (same exact prompt and output lengths), so
    the Triton kernels whose compile-time constants follow the sequence length (upstream's top-k kernels
    recompile every few 128-token blocks in eager mode) are compiled, and cached on disk, before
    measuring; with fewer turns it only fills the prefix cache and compiles the first shapes.

    Temperature 1 by default: with dummy weights the logits are nearly uniform and greedy decoding repeats
    one token ("\n" for the tiny tokenizer), which the gateway does not stream as text (leading
    whitespace), leaving no time-to-first-token. Sampling gives visible tokens; the cost is the same in
    every arm.
    """
    if warmup_pass and warmup_turns < shape.turns:
        turns, output = max(1, warmup_turns), min(16, shape.output_tokens)
    else:
        turns, output = shape.turns, shape.output_tokens
    cmd = [
        sys.executable, "-m", "m3bench.cli",
        "--base-url", base_url, "--tokenizer", str(tokenizer_dir),
        "--prefix-tokens", str(shape.prefix_tokens), "--user-tokens", str(shape.user_tokens),
        "--tool-result-tokens", str(shape.tool_result_tokens), "--turns", str(turns),
        "--output-tokens", str(output), "--concurrency", str(shape.concurrency),
        "--warmup-requests", "1", "--seed", str(seed + (1000 if warmup_pass else 0)),
        "--request-timeout", str(max(30, int(timeout_s))), "--no-progress", "--temperature", str(temperature),
        "--output", str(out_json),
    ]
    if not warmup_pass:
        cmd.append("--output-details")
    return cmd


# ---------------------------------------------------------------------------------------------- parsing

_COMPILE_RE = re.compile(r"Triton kernel '?(\w+)'? took ([\d.]+) ?s to compile")
_GEN_RE = re.compile(r"gen throughput \(token/s\): ([\d.]+)")


def server_log_stats(text: str) -> dict[str, Any]:
    """What the server log says: Triton compiles after start-up, decode throughput lines, errors."""
    compiles = _COMPILE_RE.findall(text)
    gens = [float(x) for x in _GEN_RE.findall(text)]
    busy = sorted(g for g in gens if g > 0)
    return {
        "triton_compiles_logged": len(compiles),
        "triton_compile_s": round(sum(float(s) for _, s in compiles), 2),
        "gen_throughput_lines": len(gens),
        "gen_throughput_median": busy[len(busy) // 2] if busy else None,
        "gen_throughput_max": busy[-1] if busy else None,
        "tracebacks": text.count("Traceback (most recent call last)"),
        "m3serve_lines": sorted({ln.strip() for ln in text.splitlines() if ln.startswith("[m3serve")})[:20],
    }


def summary_row(res: ArmResult) -> dict[str, Any]:
    """The headline numbers of one arm (c = the shape's concurrency) from its m3bench JSON."""
    row: dict[str, Any] = {"arm": res.arm, "status": res.status}
    if not res.bench or not res.bench.get("points"):
        return row
    s = res.bench["points"][0]["summary"]
    row.update(
        completed=s["completed"], failed=s["failed"],
        output_tok_s=s["output_throughput"], req_s=s["request_throughput"], total_tok_s=s["total_throughput"],
        ttft_p50=s["ttft_ms"]["p50"], ttft_p90=s["ttft_ms"]["p90"], ttft_p99=s["ttft_ms"]["p99"],
        tpot_p50=s["tpot_ms"]["p50"], tpot_p99=s["tpot_ms"]["p99"],
        itl_p50=s["itl_ms"]["p50"], itl_p99=s["itl_ms"]["p99"], itl_max=s["itl_ms"]["max"],
        e2e_p50=s["e2e_latency_ms"]["p50"], e2e_p99=s["e2e_latency_ms"]["p99"],
        cached_ratio=s["cached_token_ratio"], duration_s=s["duration_s"],
    )
    return row


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def format_table(rows: list[dict[str, Any]], baseline: str = "upstream") -> str:
    """Markdown table of the arms, with output throughput relative to `baseline` where both ran."""
    base = next((r.get("output_tok_s") for r in rows if r["arm"] == baseline), None)
    head = ["arm", "status", "ok/failed", "out tok/s", f"vs {baseline}", "req/s", "TTFT p50/p90/p99 ms",
            "TPOT p50/p99 ms", "ITL p50/p99/max ms", "E2E p50/p99 ms", "cached"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "output_tok_s" not in r:
            lines.append(f"| {r['arm']} | {r['status']} |" + " - |" * (len(head) - 2))
            continue
        ratio = f"{r['output_tok_s'] / base:.2f}x" if base else "-"
        lines.append("| " + " | ".join([
            r["arm"], r["status"], f"{r['completed']}/{r['failed']}", _fmt(r["output_tok_s"]), ratio,
            _fmt(r["req_s"], 3),
            "/".join(_fmt(r[k], 0) for k in ("ttft_p50", "ttft_p90", "ttft_p99")),
            "/".join(_fmt(r[k], 1) for k in ("tpot_p50", "tpot_p99")),
            "/".join(_fmt(r[k], 1) for k in ("itl_p50", "itl_p99", "itl_max")),
            "/".join(_fmt(r[k], 0) for k in ("e2e_p50", "e2e_p99")),
            "-" if r["cached_ratio"] is None else f"{r['cached_ratio']:.1%}",
        ]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- running

def probe_finite(worker_url: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Greedy /generate with logprobs: with dummy weights the activations must stay finite."""
    body = {"text": "The agent reads the repository and plans the change.",
            "sampling_params": {"max_new_tokens": 4, "temperature": 0.0},
            "return_logprob": True}
    req = urllib.request.Request(worker_url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        out = json.loads(r.read())
    meta = out.get("meta_info", {})
    logprobs = [x[0] for x in meta.get("output_token_logprobs", []) if x and x[0] is not None]
    return {"finite": bool(logprobs) and all(math.isfinite(v) for v in logprobs),
            "logprobs": logprobs, "text": out.get("text"), "seconds": round(time.monotonic() - t0, 2)}


def _device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "host": host_platform.node(), "python": sys.version.split()[0]}
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            info["card"] = torch.cuda.get_device_name(0)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    for dist in ("triton", "sglang", "transformers", "tokenizers", "xgrammar"):
        try:  # metadata only: importing sglang in the driver would run its CUDA checks unshimmed
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    return info


def card_slug(info: dict[str, Any]) -> str:
    """'h100' / 'h200' / 'cpu' for file names."""
    name = (info.get("card") or info.get("nvidia_smi") or "").lower()
    for slug in ("h200", "h100", "a100", "l40", "b200"):
        if slug in name:
            return slug
    return "cpu" if info.get("device") == "cpu" else (name.split()[-1] if name else "gpu")


def gateway_available() -> tuple[bool, str]:
    try:
        import m3serve._gateway  # noqa: F401
    except ImportError as e:
        return False, f"m3serve._gateway does not import ({e})"
    return True, "m3serve._gateway imports"


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_arms(args: argparse.Namespace) -> dict[str, Any]:
    from slice_model import SLICE_SIZES, TINY_SIZES, write_slice_model

    from m3serve.serving.processes import ManagedProcess, free_port, wait_healthy

    deadline = Deadline(args.budget_s)
    shape = SHAPES[args.shape]
    work = Path(args.work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sizes = TINY_SIZES if args.tiny else SLICE_SIZES
    models = {v: write_slice_model(work / f"model_{v}", v, sizes) for v in {MODEL_VARIANT[a] for a in args.arms}}
    arm_site = write_arm_dist(work / "arm_site")
    flags = server_flags(shape, args.device, args.mem_fraction) + args.server_arg
    use_gateway, gw_note = (False, "off (--gateway off)") if args.gateway == "off" else gateway_available()
    if args.gateway == "on" and not use_gateway:
        raise SystemExit(f"--gateway on: {gw_note}")
    warmup_turns = shape.turns if args.warmup_turns == "same" else int(args.warmup_turns)
    results = {a: ArmResult(a) for a in args.arms}
    servers: dict[str, tuple[Any, ManagedProcess]] = {}

    def start(arm: str) -> None:
        launch = worker_launch(arm, models[MODEL_VARIANT[arm]], free_port(), args.device, flags, dict(os.environ),
                               work / f"markers_{arm}", arm_site)
        results[arm].worker_command = launch.command
        print(f"[e2e] {arm}: starting worker {launch.url}", flush=True)
        proc = ManagedProcess(f"worker-{arm}", launch.command, launch.env, logs / f"{arm}_worker.log").start()
        servers[arm] = (launch, proc)

    t_start: dict[str, float] = {}
    if args.parallel_start:
        for arm in args.arms:
            t_start[arm] = time.monotonic()
            start(arm)
    try:
        for arm in args.arms:
            res = results[arm]
            if deadline.left() < args.min_arm_s:
                res.status, res.reason = "skipped", f"only {deadline.left():.0f} s of the budget left"
                continue
            if arm not in servers:
                t_start[arm] = time.monotonic()
                start(arm)
            launch, proc = servers[arm]
            gateway = None
            try:
                wait_healthy(launch.url, [proc], max(10.0, deadline.left() - 30))
                res.startup_s = round(time.monotonic() - t_start[arm], 1)
                print(f"[e2e] {arm}: worker up after {res.startup_s} s", flush=True)
                res.probe = probe_finite(launch.url, timeout_s=max(10.0, deadline.left() - 30))
                print(f"[e2e] {arm}: probe finite={res.probe['finite']} logprobs={res.probe['logprobs']}", flush=True)
                base = launch.url + "/v1"
                if use_gateway:
                    from m3serve.gateway import gateway_command

                    gport = free_port()
                    cmd = gateway_command([launch.url], str(models[MODEL_VARIANT[arm]]), "127.0.0.1", gport,
                                          GATEWAY_ARGS)
                    gateway = ManagedProcess(f"gateway-{arm}", cmd, dict(os.environ), logs / f"{arm}_gateway.log").start()
                    try:
                        wait_healthy(f"http://127.0.0.1:{gport}", [gateway], 30.0)
                        base, res.via_gateway, res.gateway_note = f"http://127.0.0.1:{gport}/v1", True, gw_note
                    except (RuntimeError, TimeoutError) as e:
                        res.gateway_note = f"gateway did not come up, measured the worker directly: {str(e)[:300]}"
                        gateway.stop()
                        gateway = None
                else:
                    res.gateway_note = gw_note
                res.base_url = base
                tok_dir = models[MODEL_VARIANT[arm]]
                if args.warmup_pass:
                    t0 = time.monotonic()
                    cmd = bench_command(base, tok_dir, shape, work / f"{arm}_warmup.json", deadline.left(), True,
                                        temperature=args.temperature, warmup_turns=warmup_turns)
                    with open(logs / f"{arm}_warmup_bench.log", "wb") as f:
                        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_bench_env(),
                                       timeout=max(10.0, deadline.left() - 20), check=False)
                    res.warmup_s = round(time.monotonic() - t0, 1)
                    print(f"[e2e] {arm}: warm-up pass {res.warmup_s} s", flush=True)
                t0 = time.monotonic()
                out_json = work / f"{arm}.json"
                cmd = bench_command(base, tok_dir, shape, out_json, deadline.left(), temperature=args.temperature)
                res.bench_command = cmd
                with open(logs / f"{arm}_bench.log", "wb") as f:
                    done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_bench_env(),
                                          timeout=max(10.0, deadline.left() - 15), check=False)
                res.bench_s, res.bench_rc = round(time.monotonic() - t0, 1), done.returncode
                if out_json.exists():
                    res.bench = json.loads(out_json.read_text())
                res.status = "ok" if done.returncode == 0 and res.bench else "failed"
                if res.status != "ok":
                    res.reason = f"m3serve bench exited {done.returncode}: {_tail(logs / f'{arm}_bench.log')}"
                print(f"[e2e] {arm}: bench {res.status} in {res.bench_s} s", flush=True)
            except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired, ValueError) as e:
                res.status, res.reason = "failed", f"{type(e).__name__}: {str(e)[-1500:]}"
                print(f"[e2e] {arm}: FAILED {res.reason[:400]}", flush=True)
            finally:
                if gateway is not None:
                    gateway.stop()
                proc.stop()
                servers.pop(arm, None)
                from m3serve.plugin import marker

                res.plugin_markers = marker.read_all(str(work / f"markers_{arm}"))
                log = logs / f"{arm}_worker.log"
                res.server_log_stats = server_log_stats(log.read_text(errors="replace") if log.exists() else "")
    finally:
        for _, proc in servers.values():
            proc.stop()
    return {"shape": asdict(shape), "shape_name": args.shape, "server_flags": flags,
            "parallel_start": args.parallel_start, "gateway_args": GATEWAY_ARGS if use_gateway else None,
            "bench_temperature": args.temperature, "warmup_turns": warmup_turns if args.warmup_pass else 0,
            "arms": {a: asdict(r) for a, r in results.items()}}


def _bench_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "benchmarks"), env.get("PYTHONPATH")) if p)
    return env


def _tail(path: Path, chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def write_outputs(out: Path, work: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """summary.json + summary.md + logs.tar.gz in `out` (the device returns at most 8 files)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [summary_row(ArmResult(**{**r, "bench": r.get("bench")})) for r in report["arms"].values()]
    report["table_rows"] = rows
    js = out / "summary.json"
    js.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = out / "summary.md"
    env = report.get("environment", {})
    lines = [f"# agentic e2e ({report['shape_name']}) on {env.get('card') or env.get('device')}", "",
             f"date {report.get('date')}; sglang {env.get('sglang')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, transformers {env.get('transformers')}; python {env.get('python')}", "",
             f"shape: {json.dumps(report['shape'])}", "", f"server flags (all arms): `{' '.join(report['server_flags'])}`",
             "", format_table(rows), ""]
    for arm, r in report["arms"].items():
        probe = r.get("probe") or {}
        lines.append(f"- {arm}: {r['status']}" + (f" ({r['reason'][:300]})" if r.get("reason") else "")
                     + f"; start {r.get('startup_s')} s, warm-up {r.get('warmup_s')} s, bench {r.get('bench_s')} s; "
                     f"finite logprobs {probe.get('finite')}; via gateway {r.get('via_gateway')}; "
                     f"triton compiles logged {r.get('server_log_stats', {}).get('triton_compiles_logged')}")
    md.write_text("\n".join(lines) + "\n")
    logs = work / "logs"
    if logs.is_dir():
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for p in sorted(logs.iterdir()):
                tar.add(p, arcname=p.name)
    return js, md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="results folder ($OUT on the device)")
    p.add_argument("--work", help="scratch folder (models, logs); default: OUT/../e2e_work")
    p.add_argument("--shape", choices=sorted(SHAPES), default="full")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="CPU-sized model of m3-slice's structure (dry runs)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    p.add_argument("--budget-s", type=float, default=460.0, help="wall-clock budget for everything")
    p.add_argument("--min-arm-s", type=float, default=45.0, help="skip an arm when less than this is left")
    p.add_argument("--gateway", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--parallel-start", action="store_true", help="start every arm's server at once")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the bench requests")
    p.add_argument("--no-warmup-pass", dest="warmup_pass", action="store_false")
    p.add_argument("--warmup-turns", default="1",
                   help="turns of the warm-up pass: a number, or 'same' (the measured run's twin: compiles "
                        "every sequence-length-dependent Triton kernel before measuring; doubles the time)")
    p.add_argument("--mem-fraction", type=float, default=None, help="--mem-fraction-static (cuda; default 0.85)")
    p.add_argument("--server-arg", action="append", default=[], help="extra SGLang flag (repeatable, all arms)")
    args = p.parse_args(argv)
    if args.warmup_turns != "same" and not (args.warmup_turns.isdigit() and int(args.warmup_turns) >= 1):
        p.error(f"--warmup-turns: a positive number or 'same', got {args.warmup_turns!r}")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms:
        p.error(f"--arms: unknown {bad}; choose from {ARMS}")
    args.work = args.work or str(Path(args.out).resolve().parent / "e2e_work")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env_info = _device_info(args.device)
    print(f"[e2e] {json.dumps(env_info)}", flush=True)
    report: dict[str, Any] = {"benchmark": "agentic-e2e", "date": dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds"), "command": [sys.executable, *sys.argv], "environment": env_info,
        "model": "m3-slice" + (" (tiny)" if args.tiny else ""), "weights": "dummy (SGLang --load-format dummy)"}
    try:
        report.update(run_arms(args))
    finally:
        if "arms" not in report:
            report.update(shape=asdict(SHAPES[args.shape]), shape_name=args.shape, server_flags=[], arms={})
        js, md = write_outputs(Path(args.out), work, report)
    print(md.read_text(), flush=True)
    return 0 if report["arms"] and all(r["status"] == "ok" for r in report["arms"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
