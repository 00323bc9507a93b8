"""One call, three arms: the agentic benchmark end to end through SGLang on one GPU (issue 7, part 2).

For each arm the same SGLang 0.5.23 server (portable platform, CUDA flavour; same flags, scheduler and
dummy weights) serves the scaled model m3-slice; only the sparse layers' attention differs:
  ours      m3serve's M3 plugin: sparse layers -> msa_kernels (plan/run: index top-k + sparse attention)
  upstream  SGLang's own Triton MSA kernels (m3serve's plugin excluded; e2e_arm_plugin installs only the
            KV-pool and MoE-layout hooks SGLang needs on an out-of-tree platform)
  dense     every layer dense attention (config variant with sparse_attention_freq all 0), SGLang's
            Triton attention backend: a speed reference, not M3 semantics
Per arm: start the worker (and the m3serve gateway in front when its extension is there), wait for
/health, check that greedy logprobs are finite (dummy weights), a throw-away warm-up pass (gets past
Triton's first compiles; each measured run caches its shared prefix with its own warm-up request), then `m3serve bench` at the chosen shape, then stop
the server's whole process group. The servers may start in parallel (Triton compiles overlap) but are
measured one at a time. Everything lands in --out: summary.json (every arm's full m3bench result),
summary.md (the table), logs.tar.gz (server, gateway and bench logs). The table is printed last.

Options beyond one measured run: `--concurrency 1,4,8,16` (a sweep: one bench run per level after the
warm-up, the shape's own concurrency first; levels that do not fit the budget are skipped with a reason),
`--repeats K` (K runs at the shape's concurrency: median and min/max of output throughput),
`--cuda-graph-arms ours,upstream|all` (decode CUDA graphs for those arms; the log says whether capture
worked) and `--graph-fallback` (an arm whose graph start fails is restarted once in eager mode, and says so).
Plots: benchmarks/agentic/plot_e2e.py RESULTS.json OUT_PREFIX (on the CPU machine).

    python benchmarks/agentic/gpu/run_e2e.py --out DIR [--shape full|quick|dry] [--device cuda|cpu]
        [--arms ours,upstream,dense] [--budget-s 460] [--gateway auto|on|off] [--parallel-start]
        [--concurrency 1,4,8,16] [--repeats K] [--cuda-graph-arms ARMS|all] [--graph-fallback]
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
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
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
    server_flags: list[str] = field(default_factory=list)  # the SGLang flags this arm's measured worker ran with
    cuda_graph_requested: bool = False
    # off (not requested) | on (decode capture logged its end) | failed: <reason> (capture failed, or no capture
    # logged; with --graph-fallback the numbers are then eager: see measured_mode)
    cuda_graph: str = "off"
    cuda_graph_log: dict[str, Any] = field(default_factory=dict)
    graph_fallback: str | None = None  # why the arm was restarted without graphs (--graph-fallback)
    measured_mode: str | None = None  # "cuda-graph" | "eager": the mode that produced the numbers
    runs: list[dict[str, Any]] = field(default_factory=list)  # every bench run: concurrency, repeat, summary
    repeats: dict[str, Any] | None = None  # output throughput over the runs at the shape's concurrency


# ---------------------------------------------------------------------------------------------- commands

def graph_max_bs(concurrency: int) -> int:
    """--cuda-graph-max-bs-decode for a run whose largest concurrency is `concurrency`: a power of two, >= 8."""
    return max(8, 2 ** math.ceil(math.log2(max(1, concurrency))))


def server_flags(shape: Shape, device: str, mem_fraction: float | None = None, max_concurrency: int | None = None,
                 cuda_graph: bool = False) -> list[str]:
    """SGLang flags shared by every arm (only the model variant, the plugin and the graph mode differ).

    The KV pool and --max-running-requests are sized for the largest concurrency of the run (a sweep's top
    level); the context length for one request of the shape. With `cuda_graph` decode runs in CUDA graphs
    captured up to the largest concurrency: SGLang 0.5.23 spells it --cuda-graph-max-bs-decode (a bare
    --cuda-graph-max-bs is ambiguous there and stops the server); prefill stays eager (only decode is
    meant to be capturable).
    """
    top = max(shape.concurrency, max_concurrency or 0)
    pool = max(shape.max_total_tokens, 2 ** math.ceil(math.log2(replace(shape, concurrency=top).kv_tokens_needed())))
    flags = ["--load-format", "dummy"]           # weights are initialised by SGLang (they cannot travel)
    if cuda_graph:
        flags += ["--cuda-graph-max-bs-decode", str(graph_max_bs(top)), "--cuda-graph-backend-prefill", "disabled"]
    else:
        flags += ["--disable-cuda-graph"]        # the torch-native MoE is not capturable (feasibility note 3 #5)
    flags += [
        "--max-total-tokens", str(pool),
        "--max-running-requests", str(max(16, 2 * top)),
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
                  warmup_turns: int = 1, concurrency: int | None = None, details: bool | None = None) -> list[str]:
    """`m3serve bench` (m3bench) argv.

    The warm-up pass runs other sessions (another seed, so also another shared prefix of the same length:
    m3bench seeds the prefix with the sessions; each measured run's own warm-up request caches its prefix
    before measuring). With `warmup_turns`
    equal to the shape's turns it is the measured run's twin (same exact prompt and output lengths), so
    the Triton kernels whose compile-time constants follow the sequence length (upstream's top-k kernels
    recompile every few 128-token blocks in eager mode) are compiled, and cached on disk, before
    measuring; with fewer turns it only compiles the first shapes.

    Temperature 1 by default: with dummy weights the logits are nearly uniform and greedy decoding repeats
    one token ("\n" for the tiny tokenizer), which the gateway does not stream as text (leading
    whitespace), leaving no time-to-first-token. Sampling gives visible tokens; the cost is the same in
    every arm.

    `concurrency` overrides the shape's (a sweep level); `details` (default: not for the warm-up pass) adds
    the per-request records. Note m3bench seeds the shared prefix too: another seed is another prefix,
    which the run's own warm-up request puts into the cache before measuring.
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
        "--output-tokens", str(output), "--concurrency", str(concurrency or shape.concurrency),
        "--warmup-requests", "1", "--seed", str(seed + (1000 if warmup_pass else 0)),
        "--request-timeout", str(max(30, int(timeout_s))), "--no-progress", "--temperature", str(temperature),
        "--output", str(out_json),
    ]
    if (not warmup_pass) if details is None else details:
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


_CAPTURE_BEGIN_RE = re.compile(r"capture ([\w ]*?)\s*cuda graph begin", re.I)
_CAPTURE_END_RE = re.compile(r"capture ([\w ]*?)\s*cuda graph end\.?(?:[^\n]*?(?:elapsed=|time elapsed:?)\s*([\d.]+))?", re.I)
_CAPTURE_FAILED_RE = re.compile(r"capture (?:[\w ]*?)cuda graph failed:?\s*([^\n]*)", re.I)


def _last_exception(text: str) -> str | None:
    """The exception line that ends the last traceback in `text` (e.g. 'RuntimeError: ...'), if any."""
    at = text.rfind("Traceback (most recent call last)")
    if at < 0:
        return None
    for line in text[at:].splitlines()[1:]:
        if line and not line[0].isspace() and not line.startswith(("Traceback", "During handling", "The above")):
            return line.strip()[:300]
    return None


def cuda_graph_log_status(text: str, requested: bool) -> tuple[str, dict[str, Any]]:
    """Whether a worker captured its CUDA graphs, from its log: ("on" | "off" | "failed: <reason>", counts).

    SGLang 0.5.23 logs "Capture target decode CUDA graph begin. ..." / "... end. elapsed=12.3 s ..." (older
    versions "Capture cuda graph begin/end"); a capture error raises "Capture cuda graph failed: <e>".
    """
    begins = _CAPTURE_BEGIN_RE.findall(text)
    ends = _CAPTURE_END_RE.findall(text)
    failed = _CAPTURE_FAILED_RE.findall(text)
    info: dict[str, Any] = {
        "capture_begin_lines": len(begins), "capture_end_lines": len(ends),
        "captured": sorted({name.strip() or "decode" for name, _ in ends}),
        "capture_s": round(sum(float(t) for _, t in ends if t), 2),
    }
    if not requested:
        return "off", info
    decode_ends = [name for name, _ in ends if "prefill" not in name.lower()]
    if failed:
        return f"failed: {failed[-1].strip()[:300] or _last_exception(text) or 'capture failed'}", info
    if len(begins) > len(ends):  # a capture began and never ended: the worker died in it
        return f"failed: capture began but did not end ({_last_exception(text) or 'no traceback in the log'})", info
    if decode_ends:
        return "on", info
    return "failed: no decode 'Capture ... CUDA graph end' line in the worker log (graphs not used)", info


def _metrics(s: dict[str, Any]) -> dict[str, Any]:
    """The reported numbers of one m3bench summary (bench_serving definitions)."""
    return dict(
        completed=s["completed"], failed=s["failed"],
        output_tok_s=s["output_throughput"], req_s=s["request_throughput"], total_tok_s=s["total_throughput"],
        ttft_p50=s["ttft_ms"]["p50"], ttft_p90=s["ttft_ms"]["p90"], ttft_p99=s["ttft_ms"]["p99"],
        tpot_p50=s["tpot_ms"]["p50"], tpot_p99=s["tpot_ms"]["p99"],
        itl_p50=s["itl_ms"]["p50"], itl_p99=s["itl_ms"]["p99"], itl_max=s["itl_ms"]["max"],
        e2e_p50=s["e2e_latency_ms"]["p50"], e2e_p99=s["e2e_latency_ms"]["p99"],
        cached_ratio=s["cached_token_ratio"], duration_s=s["duration_s"],
    )


def _mode(res: ArmResult) -> str:
    mode = res.measured_mode or "-"  # no worker measured (or a result from before the field)
    return f"{mode} (graph fallback)" if res.graph_fallback else mode


def summary_row(res: ArmResult) -> dict[str, Any]:
    """The headline numbers of one arm (c = the shape's concurrency) from its m3bench JSON."""
    row: dict[str, Any] = {"arm": res.arm, "status": res.status, "mode": _mode(res), "cuda_graph": res.cuda_graph}
    if res.repeats:
        row["repeats"] = res.repeats
    if not res.bench or not res.bench.get("points"):
        return row
    row.update(_metrics(res.bench["points"][0]["summary"]))
    return row


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Of the ok runs, the one whose output throughput is the median (the lower middle one for an even count)."""
    ok = sorted((r for r in runs if r.get("status") == "ok" and r.get("summary")),
                key=lambda r: r["summary"]["output_throughput"])
    return ok[(len(ok) - 1) // 2] if ok else None


def repeat_stats(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Median and min/max of output throughput over the ok runs (the repeats at one concurrency)."""
    vals = [r["summary"]["output_throughput"] for r in runs if r.get("status") == "ok" and r.get("summary")]
    if not vals:
        return None
    return {"n": len(vals), "planned": len(runs), "output_tok_s": vals, "median": statistics.median(vals),
            "min": min(vals), "max": max(vals)}


def sweep_points(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per arm and concurrency level (the median run where a level ran more than once).

    Works on results without a sweep too (before --concurrency existed: the arm's one run at the shape's
    concurrency).
    """
    rows = []
    shape_c = (report.get("shape") or {}).get("concurrency")
    for arm, r in report.get("arms", {}).items():
        runs = r.get("runs") or []
        if not runs and (r.get("bench") or {}).get("points"):
            runs = [{"concurrency": shape_c, "status": "ok", "summary": r["bench"]["points"][0]["summary"]}]
        levels: dict[int, list[dict[str, Any]]] = {}
        for run in runs:
            levels.setdefault(run["concurrency"], []).append(run)
        for c in sorted(levels):
            best = _median_run(levels[c])
            row: dict[str, Any] = {"arm": arm, "concurrency": c, "mode": r.get("measured_mode"),
                                   "runs": sum(1 for x in levels[c] if x.get("status") == "ok")}
            if best is None:
                last = levels[c][-1]
                row.update(status=last.get("status"), reason=last.get("reason"))
            else:
                row.update(status="ok", **_metrics(best["summary"]))
            rows.append(row)
    return rows


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
            "TPOT p50/p99 ms", "ITL p50/p99/max ms", "E2E p50/p99 ms", "cached", "mode"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "output_tok_s" not in r:
            lines.append(f"| {r['arm']} | {r['status']} |" + " - |" * (len(head) - 3) + f" {r.get('mode', '-')} |")
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
            r.get("mode") or "-",
        ]) + " |")
    return "\n".join(lines)


def format_repeats(rows: list[dict[str, Any]]) -> str:
    """Output throughput over the repeats at the shape's concurrency (only arms with more than one run)."""
    lines = ["| arm | runs ok/planned | out tok/s median | min | max | spread (max-min)/median |", "|---|---|---|---|---|---|"]
    for r in rows:
        st = r.get("repeats")
        if not st:
            continue
        if not st.get("n"):  # every repeat failed or was skipped
            lines.append(f"| {r['arm']} | 0/{st.get('planned', '-')} | - | - | - | - |")
            continue
        spread = (st["max"] - st["min"]) / st["median"] if st["median"] else float("nan")
        lines.append(f"| {r['arm']} | {st['n']}/{st['planned']} | {_fmt(st['median'])} | {_fmt(st['min'])} | "
                     f"{_fmt(st['max'])} | {spread:.1%} |")
    return "\n".join(lines)


def format_sweep(points: list[dict[str, Any]], baseline: str = "upstream") -> str:
    """Markdown: per arm x concurrency (ordered by concurrency), with output throughput relative to `baseline`
    at the same level; then output tok/s pivoted (one column per arm)."""
    base = {p["concurrency"]: p.get("output_tok_s") for p in points if p["arm"] == baseline}
    head = ["c", "arm", "status", "ok/failed", "out tok/s", f"vs {baseline}", "req/s", "TTFT p50/p99 ms",
            "TPOT p50 ms", "ITL p50/p99 ms", "E2E p50 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in sorted(points, key=lambda p: (p["concurrency"], ARMS.index(p["arm"]) if p["arm"] in ARMS else 9)):
        if "output_tok_s" not in p:
            why = f" ({p['reason'][:120]})" if p.get("reason") else ""
            lines.append(f"| {p['concurrency']} | {p['arm']} | {p['status']}{why} |" + " - |" * (len(head) - 3))
            continue
        b = base.get(p["concurrency"])
        lines.append("| " + " | ".join([
            str(p["concurrency"]), p["arm"], p["status"], f"{p['completed']}/{p['failed']}", _fmt(p["output_tok_s"]),
            f"{p['output_tok_s'] / b:.2f}x" if b else "-", _fmt(p["req_s"], 3),
            "/".join(_fmt(p[k], 0) for k in ("ttft_p50", "ttft_p99")), _fmt(p["tpot_p50"]),
            "/".join(_fmt(p[k], 1) for k in ("itl_p50", "itl_p99")), _fmt(p["e2e_p50"], 0),
        ]) + " |")
    arms = [a for a in dict.fromkeys(p["arm"] for p in points)]
    levels = sorted({p["concurrency"] for p in points})
    tput = {(p["arm"], p["concurrency"]): p.get("output_tok_s") for p in points}
    ratio = "ours" in arms and baseline in arms
    pivot = ["", "output tok/s by concurrency:", "",
             "| c | " + " | ".join(arms) + (f" | ours/{baseline} |" if ratio else " |"),
             "|---|" + "---|" * (len(arms) + ratio)]
    for c in levels:
        cells = [_fmt(tput.get((a, c))) for a in arms]
        if ratio:
            o, u = tput.get(("ours", c)), tput.get((baseline, c))
            cells.append(f"{o / u:.2f}x" if o and u else "-")
        pivot.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines + pivot)


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


def estimate_run_s(concurrency: int, done: list[dict[str, Any]]) -> float | None:
    """Seconds a bench run at `concurrency` should take, from an arm's finished runs (None: nothing to go by).

    A level at or below a measured one: as long as the nearest measured level above it (decode steps per
    session do not change with concurrency, so lower levels are not slower). Above every measured level:
    the largest one scaled by sqrt(c / c_measured) (more prefill per turn, longer decode steps).
    """
    timed = [r for r in done if r.get("bench_s")]
    if not timed:
        return None
    above = [r for r in timed if r["concurrency"] >= concurrency]
    if above:
        nearest = min(r["concurrency"] for r in above)
        return max(r["bench_s"] for r in above if r["concurrency"] == nearest)
    ref = max(timed, key=lambda r: (r["concurrency"], r["bench_s"]))
    return ref["bench_s"] * math.sqrt(concurrency / ref["concurrency"])


def measure_plan(plan: list[tuple[int, int, int]], run_one: Any, deadline: Deadline, later_arms: int = 0,
                 arm_overhead_s: float = 0.0, margin_s: float = 10.0) -> list[dict[str, Any]]:
    """Run an arm's bench runs [(concurrency, repeat, seed)] in order; never raises for the budget.

    The first run is the headline (it runs whatever the estimate; `run_one(c, repeat, seed, timeout_s)` gets
    the whole budget less 15 s). Each later run goes only where its estimate (`estimate_run_s` + margin)
    fits into the budget less what the `later_arms` arms still need (each: `arm_overhead_s` + this arm's
    first run), and is otherwise recorded as skipped with the reason; its timeout keeps that reserve too.
    """
    done: list[dict[str, Any]] = []
    for i, (c, rep, seed) in enumerate(plan):
        base = {"concurrency": c, "repeat": rep, "seed": seed}
        if i == 0:
            done.append({**base, **run_one(c, rep, seed, max(10.0, deadline.left() - 15))})
            continue
        first_s = done[0].get("bench_s") or 0.0
        reserve = later_arms * (arm_overhead_s + first_s + margin_s) if later_arms else 0.0
        est = estimate_run_s(c, done)
        need = (est if est is not None else first_s) + margin_s
        left = deadline.left()
        if left - reserve < need:
            kept = f", {reserve:.0f} s kept for {later_arms} later arm(s)" if reserve else ""
            done.append({**base, "status": "skipped",
                         "reason": f"budget: {left:.0f} s left{kept}; this run needs ~{need:.0f} s"})
            continue
        done.append({**base, **run_one(c, rep, seed, max(10.0, left - reserve - 5))})
    return done


def bring_up(res: ArmResult, graphs: bool, up: Any, restart_eager: Any, graph_state: Any, fallback: Any) -> bool:
    """Wait for an arm's worker and probe it (`up()`); return whether it runs CUDA graphs.

    Where a graph worker fails that (it died, timed out, its log shows a failed capture, the probe failed)
    and `fallback` (a bool, or a callable asked at that moment: is there budget left?) holds, the arm is restarted once without graphs (`restart_eager()`, then `up()` again),
    `res.graph_fallback` says why (`graph_state()`: the capture state from the graph worker's log) and
    False is returned; otherwise the error propagates (the arm fails).
    """
    try:
        up()
        return graphs
    except (RuntimeError, TimeoutError, OSError, ValueError) as e:
        if not (graphs and (fallback() if callable(fallback) else fallback)):
            raise
        state = graph_state()
        res.graph_fallback = (state if state.startswith("failed:") and "no decode" not in state else
                              f"graph start failed: {type(e).__name__}: {str(e)[-300:]}")
        print(f"[e2e] {res.arm}: {res.graph_fallback[:300]}; restarting without CUDA graphs", flush=True)
        restart_eager()
        up()
        return False


def finish_graph_fields(res: ArmResult, graph_log: str) -> None:
    """`cuda_graph`, `cuda_graph_log` and `measured_mode` of an arm once its worker stopped (`graph_log`: the
    log of the worker started in the requested mode)."""
    res.cuda_graph, res.cuda_graph_log = cuda_graph_log_status(graph_log, res.cuda_graph_requested)
    if res.measured_mode == "cuda-graph" and res.cuda_graph != "on":
        res.measured_mode = "cuda-graph (unconfirmed)"  # graphs requested and started, no capture logged
    if res.graph_fallback:
        if not res.cuda_graph.startswith("failed"):
            res.cuda_graph = f"failed: {res.graph_fallback.removeprefix('failed: ')}"
        if res.measured_mode == "eager":
            res.cuda_graph += "; eager fallback measured"


def run_arms(args: argparse.Namespace) -> dict[str, Any]:
    from slice_model import SLICE_SIZES, TINY_SIZES, write_slice_model

    from m3serve.serving.processes import ManagedProcess, free_port, wait_healthy

    deadline = Deadline(args.budget_s)
    shape = SHAPES[args.shape]
    levels = run_levels(shape, args.concurrency)
    top = max(levels)
    work = Path(args.work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (work / "bench").mkdir(exist_ok=True)
    sizes = TINY_SIZES if args.tiny else SLICE_SIZES
    models = {v: write_slice_model(work / f"model_{v}", v, sizes) for v in {MODEL_VARIANT[a] for a in args.arms}}
    arm_site = write_arm_dist(work / "arm_site")
    flag_sets = {g: server_flags(shape, args.device, args.mem_fraction, top, cuda_graph=g) + args.server_arg
                 for g in (False, True)}
    flags = flag_sets[False]
    use_gateway, gw_note = (False, "off (--gateway off)") if args.gateway == "off" else gateway_available()
    if args.gateway == "on" and not use_gateway:
        raise SystemExit(f"--gateway on: {gw_note}")
    warmup_turns = shape.turns if args.warmup_turns == "same" else int(args.warmup_turns)
    results = {a: ArmResult(a, cuda_graph_requested=a in args.cuda_graph_arms) for a in args.arms}
    servers: dict[str, tuple[Any, ManagedProcess, Path, bool]] = {}
    # The headline (shape's concurrency) K times, seeds 0..K-1 (another seed is another prefix too: each
    # run's warm-up request caches it), then the other levels in the order given, seed 0 (m3bench salts
    # the sessions with the concurrency, so no level reuses another's sessions).
    plan = [(shape.concurrency, r, r) for r in range(args.repeats)] + [(c, 0, 0) for c in levels[1:]]

    def start(arm: str, graphs: bool) -> None:
        launch = worker_launch(arm, models[MODEL_VARIANT[arm]], free_port(), args.device, flag_sets[graphs],
                               dict(os.environ), work / f"markers_{arm}", arm_site)
        res = results[arm]
        res.worker_command, res.server_flags = launch.command, flag_sets[graphs]
        log = logs / (f"{arm}_worker.log" if graphs == res.cuda_graph_requested else f"{arm}_worker_eager.log")
        print(f"[e2e] {arm}: starting worker {launch.url} ({'cuda graphs' if graphs else 'eager'})", flush=True)
        proc = ManagedProcess(f"worker-{arm}", launch.command, launch.env, log).start()
        servers[arm] = (launch, proc, log, graphs)

    def wait_up(arm: str, timeout_s: float) -> None:
        """/health, failing early where the log shows a failed graph capture (the worker may hang on)."""
        launch, proc, log, graphs = servers[arm]
        end = time.monotonic() + timeout_s
        while True:
            try:
                wait_healthy(launch.url, [proc], max(1.0, min(5.0, end - time.monotonic())))
                return
            except TimeoutError:
                if graphs and log.exists():
                    state, _ = cuda_graph_log_status(log.read_text(errors="replace"), True)
                    if state.startswith("failed:") and "did not end" not in state and "no decode" not in state:
                        raise RuntimeError(f"CUDA graph capture {state}") from None
                if time.monotonic() >= end:
                    raise

    def graph_state(arm: str) -> tuple[str, dict[str, Any]]:
        log = logs / f"{arm}_worker.log"
        return cuda_graph_log_status(log.read_text(errors="replace") if log.exists() else "", True)

    t_start: dict[str, float] = {}
    if args.parallel_start:
        for arm in args.arms:
            t_start[arm] = time.monotonic()
            start(arm, results[arm].cuda_graph_requested)
    try:
        for idx, arm in enumerate(args.arms):
            res = results[arm]
            if deadline.left() < args.min_arm_s:
                res.status, res.reason = "skipped", f"only {deadline.left():.0f} s of the budget left"
                continue
            if arm not in servers:
                t_start[arm] = time.monotonic()
                start(arm, res.cuda_graph_requested)
            gateway = None
            try:
                def up(arm: str = arm, res: ArmResult = res) -> None:
                    wait_up(arm, max(10.0, deadline.left() - 30))
                    res.startup_s = round(time.monotonic() - t_start[arm], 1)
                    print(f"[e2e] {arm}: worker up after {res.startup_s} s", flush=True)
                    res.probe = probe_finite(servers[arm][0].url, timeout_s=max(10.0, deadline.left() - 30))

                def restart_eager(arm: str = arm) -> None:
                    servers.pop(arm)[1].stop()
                    start(arm, False)

                graphs = bring_up(res, servers[arm][3], up, restart_eager, lambda arm=arm: graph_state(arm)[0],
                                  lambda: args.graph_fallback and deadline.left() >= args.min_arm_s)
                launch, proc = servers[arm][0], servers[arm][1]
                res.measured_mode = "cuda-graph" if graphs else "eager"  # graphs: confirmed from the log below
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

                def run_one(c: int, rep: int, seed: int, timeout_s: float, arm: str = arm, base: str = base,
                            tok_dir: Path = tok_dir, proc: Any = proc) -> dict[str, Any]:
                    name = f"{arm}_c{c}_r{rep}"
                    out_json, log = work / "bench" / f"{name}.json", logs / f"{name}_bench.log"
                    if not proc.alive():
                        return {"status": "failed", "reason": f"worker exited ({proc.proc.returncode}) before this run"}
                    first = c == shape.concurrency and rep == 0
                    cmd = bench_command(base, tok_dir, shape, out_json, timeout_s, seed=seed,
                                        temperature=args.temperature, concurrency=c, details=first)
                    if first:
                        results[arm].bench_command = cmd
                    t0 = time.monotonic()
                    try:
                        with open(log, "wb") as f:
                            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_bench_env(),
                                                  timeout=timeout_s, check=False)
                    except subprocess.TimeoutExpired:
                        return {"status": "failed", "bench_s": round(time.monotonic() - t0, 1),
                                "reason": f"m3serve bench timed out after {timeout_s:.0f} s"}
                    run: dict[str, Any] = {"bench_s": round(time.monotonic() - t0, 1), "bench_rc": done.returncode,
                                           "json": f"bench/{out_json.name}"}
                    bench = json.loads(out_json.read_text()) if out_json.exists() else None
                    run["summary"] = bench["points"][0]["summary"] if bench and bench.get("points") else None
                    run["status"] = "ok" if done.returncode == 0 and run["summary"] else "failed"
                    if run["status"] != "ok":
                        run["reason"] = f"m3serve bench exited {done.returncode}: {_tail(log)}"
                    print(f"[e2e] {arm}: c={c} run {rep}: {run['status']} in {run['bench_s']} s"
                          + (f", {run['summary']['output_throughput']:.1f} out tok/s" if run["summary"] else ""),
                          flush=True)
                    return run

                overhead = (res.warmup_s or 0.0) + (0.0 if args.parallel_start else (res.startup_s or 0.0)) + 15
                res.runs = measure_plan(plan, run_one, deadline, later_arms=len(args.arms) - idx - 1,
                                        arm_overhead_s=overhead)
                head = [r for r in res.runs if r["concurrency"] == shape.concurrency]
                first = res.runs[0]
                res.bench_s, res.bench_rc = first.get("bench_s"), first.get("bench_rc")
                chosen = _median_run(head)
                if chosen is not None:
                    res.bench = json.loads((work / chosen["json"]).read_text())
                    res.status = "ok"
                else:
                    res.status, res.reason = "failed", first.get("reason") or "no successful run"
                if args.repeats > 1:
                    res.repeats = repeat_stats(head) or {"n": 0, "planned": len(head)}
                print(f"[e2e] {arm}: {res.status}; {sum(r['status'] == 'ok' for r in res.runs)}/{len(res.runs)} "
                      "runs ok", flush=True)
            except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired, ValueError) as e:
                res.status, res.reason = "failed", f"{type(e).__name__}: {str(e)[-1500:]}"
                print(f"[e2e] {arm}: FAILED {res.reason[:400]}", flush=True)
            finally:
                if gateway is not None:
                    gateway.stop()
                if arm in servers:
                    servers.pop(arm)[1].stop()
                from m3serve.plugin import marker

                res.plugin_markers = marker.read_all(str(work / f"markers_{arm}"))
                log = logs / f"{arm}_worker.log"
                text = log.read_text(errors="replace") if log.exists() else ""
                finish_graph_fields(res, text)
                eager = logs / f"{arm}_worker_eager.log"
                if res.graph_fallback and eager.exists():
                    text = eager.read_text(errors="replace")
                res.server_log_stats = server_log_stats(text)
    finally:
        for _, proc, _, _ in servers.values():
            proc.stop()
    return {"shape": asdict(shape), "shape_name": args.shape, "server_flags": flags,
            "server_flags_cuda_graph": flag_sets[True] if any(r.cuda_graph_requested for r in results.values())
            else None,
            "concurrency_levels": levels, "repeats": args.repeats, "graph_fallback": args.graph_fallback,
            "parallel_start": args.parallel_start, "gateway_args": GATEWAY_ARGS if use_gateway else None,
            "bench_temperature": args.temperature, "warmup_turns": warmup_turns if args.warmup_pass else 0,
            "arms": {a: asdict(r) for a, r in results.items()}}


def run_levels(shape: Shape, concurrency: list[int] | None) -> list[int]:
    """The concurrency levels of a run: the shape's own first (the headline), then the others in order."""
    return [shape.concurrency] + [c for c in dict.fromkeys(concurrency or []) if c != shape.concurrency]


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
    """summary.json + summary.md + logs.tar.gz (logs and every run's m3bench JSON) in `out` (the device
    returns at most 8 files)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [summary_row(ArmResult(**{**r, "bench": r.get("bench")})) for r in report["arms"].values()]
    report["table_rows"] = rows
    points = sweep_points(report)
    report["sweep_rows"] = points
    js = out / "summary.json"
    js.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = out / "summary.md"
    env = report.get("environment", {})
    graph_flags = report.get("server_flags_cuda_graph")
    graph_arms = [a for a, r in report["arms"].items() if r.get("cuda_graph_requested")]
    lines = [f"# agentic e2e ({report['shape_name']}) on {env.get('card') or env.get('device')}", "",
             f"date {report.get('date')}; sglang {env.get('sglang')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, transformers {env.get('transformers')}; python {env.get('python')}", "",
             f"shape: {json.dumps(report['shape'])}", ""]
    if graph_flags:
        lines += [f"server flags, eager arms: `{' '.join(report['server_flags'])}`", "",
                  f"server flags, CUDA-graph arms ({', '.join(graph_arms)}): `{' '.join(graph_flags)}`", ""]
    else:
        lines += [f"server flags (all arms): `{' '.join(report['server_flags'])}`", ""]
    levels = report.get("concurrency_levels") or [report["shape"].get("concurrency")]
    lines += [f"headline: concurrency {report['shape'].get('concurrency')}"
              + (f" (each arm's median run of {report['repeats']}; for an even count the lower middle one)"
                 if (report.get("repeats") or 1) > 1 else ""),
              "", format_table(rows), ""]
    if any(r.get("repeats") for r in rows):
        lines += ["output throughput over the repeats at the headline concurrency:", "", format_repeats(rows), ""]
    if len(levels) > 1:
        lines += [f"concurrency sweep ({', '.join(map(str, levels))}; levels run in this order, after the warm-up):",
                  "", format_sweep(points), ""]
    for arm, r in report["arms"].items():
        probe = r.get("probe") or {}
        lines.append(f"- {arm}: {r['status']}" + (f" ({r['reason'][:300]})" if r.get("reason") else "")
                     + f"; start {r.get('startup_s')} s, warm-up {r.get('warmup_s')} s, bench {r.get('bench_s')} s; "
                     f"finite logprobs {probe.get('finite')}; via gateway {r.get('via_gateway')}; "
                     f"triton compiles logged {r.get('server_log_stats', {}).get('triton_compiles_logged')}; "
                     f"cuda graph {r.get('cuda_graph', 'off')}; measured {r.get('measured_mode')}")
        for run in r.get("runs") or []:
            if run.get("status") != "ok":
                lines.append(f"  - c={run['concurrency']} run {run['repeat']}: {run['status']}: "
                             f"{(run.get('reason') or '')[:300]}")
    md.write_text("\n".join(lines) + "\n")
    logs = work / "logs"
    bench = work / "bench"
    if logs.is_dir() or bench.is_dir():
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            for p in sorted(logs.iterdir()) if logs.is_dir() else []:
                tar.add(p, arcname=p.name)
            for p in sorted(bench.iterdir()) if bench.is_dir() else []:
                tar.add(p, arcname=f"bench/{p.name}")
    return js, md


def _int_list(text: str) -> list[int]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals or not all(v.isdigit() and int(v) >= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"a comma list of integers >= 1, got {text!r}")
    return [int(v) for v in vals]


def _arm_list(text: str, flag: str, p: argparse.ArgumentParser, empty_ok: bool = False) -> list[str]:
    if text.strip() == "all":
        return list(ARMS)
    arms = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not (arms or empty_ok):
        p.error(f"{flag}: unknown {bad}; choose from {ARMS}" + (" or 'all'" if empty_ok else ""))
    return arms


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
    p.add_argument("--concurrency", type=_int_list, default=None,
                   help="sweep: comma list of concurrency levels (e.g. 1,4,8,16), one bench run each after the "
                        "warm-up, the shape's own concurrency (the headline) always first, then the others in "
                        "this order; KV pool and --max-running-requests sized for the largest. Default: the "
                        "shape's concurrency only")
    p.add_argument("--repeats", type=int, default=1,
                   help="bench runs at the shape's concurrency per arm (median, min, max of output tok/s)")
    p.add_argument("--cuda-graph-arms", default="",
                   help="arms (comma list, or 'all') whose worker runs decode in CUDA graphs (no "
                        "--disable-cuda-graph; --cuda-graph-max-bs-decode = the largest concurrency rounded up to "
                        "a power of two, >= 8). Default: none (eager everywhere)")
    p.add_argument("--graph-fallback", action="store_true",
                   help="an arm whose CUDA-graph worker fails to start (or to answer the probe) is restarted "
                        "once in eager mode; its result says so (graph_fallback, measured_mode)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats: at least 1, got {args.repeats}")
    if args.warmup_turns != "same" and not (args.warmup_turns.isdigit() and int(args.warmup_turns) >= 1):
        p.error(f"--warmup-turns: a positive number or 'same', got {args.warmup_turns!r}")
    args.arms = _arm_list(args.arms, "--arms", p)
    args.cuda_graph_arms = _arm_list(args.cuda_graph_arms, "--cuda-graph-arms", p, empty_ok=True)
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
            report.update(shape=asdict(SHAPES[args.shape]), shape_name=args.shape, server_flags=[], arms={},
                          concurrency_levels=run_levels(SHAPES[args.shape], args.concurrency), repeats=args.repeats)
        js, md = write_outputs(Path(args.out), work, report)
    print(md.read_text(), flush=True)
    return 0 if report["arms"] and all(r["status"] == "ok" for r in report["arms"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
