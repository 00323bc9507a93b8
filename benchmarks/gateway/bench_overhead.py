"""Gateway overhead per request: the same streamed generation through the Rust gateway
(/v1/chat/completions) and straight to the worker (/generate), at several concurrencies.

The worker is `fast_fake_worker.py` (identical upstream timing for both paths), the gateway runs in
its test prompt mode (bytes as token ids, so no checkpoint is needed; the chat template and
tokenizer cost is benchmarked separately by the preprocessing benchmarks). Reported per level:
p50/p99 of time to first token and of total request time on each path, and their differences.

Run from the repository root:
  .venv/bin/python benchmarks/gateway/bench_overhead.py --concurrency 1 4 16 64 256
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MODEL = "bench-m3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready")


async def one_request(
    session: aiohttp.ClientSession, url: str, body: dict, token_marker: bytes
) -> tuple[float, float]:
    """(time to first token, total time) in seconds for one streamed request."""
    t0 = time.perf_counter()
    ttft = None
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if ttft is None and token_marker in line:
                ttft = time.perf_counter() - t0
            if line.startswith(b"data: [DONE]"):
                break
    total = time.perf_counter() - t0
    return (ttft if ttft is not None else total), total


async def run_level(url: str, make_body, marker: bytes, concurrency: int, n_requests: int) -> dict:
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    ttfts, totals = [], []
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as s:
        queue = list(range(n_requests))

        async def worker() -> None:
            while queue:
                i = queue.pop()
                a, b = await one_request(s, url, make_body(i), marker)
                ttfts.append(a)
                totals.append(b)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = lambda xs, q: float(np.percentile(np.array(xs) * 1000.0, q))  # noqa: E731
    return {
        "requests": n_requests,
        "wall_s": wall,
        "req_per_s": n_requests / wall,
        "ttft_p50_ms": ms(ttfts, 50),
        "ttft_p99_ms": ms(ttfts, 99),
        "total_p50_ms": ms(totals, 50),
        "total_p99_ms": ms(totals, 99),
    }


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg_at_start": load,
        "python": platform.python_version(),
    }


async def main_async(a: argparse.Namespace) -> dict:
    from m3serve import _gateway
    from m3serve.gateway import gateway_command

    wport, gport = free_port(), free_port()
    procs = []
    logs = open(a.out.with_suffix(".log"), "w")  # noqa: SIM115 - closed at the end
    try:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "fast_fake_worker.py"),
                    "--port",
                    str(wport),
                    "--tokens",
                    str(a.tokens),
                    "--token-interval",
                    str(a.token_interval),
                ],
                stdout=logs,
                stderr=subprocess.STDOUT,
            )
        )
        worker = f"http://127.0.0.1:{wport}"
        cmd = gateway_command(
            [worker],
            str(ROOT),
            "127.0.0.1",
            gport,
            [
                "--tokenizer-mode",
                "bytes",
                "--served-model-name",
                MODEL,
                "--log-level",
                "warn",
                "--max-inflight-per-worker",
                "4096",
            ],
        )
        procs.append(subprocess.Popen(cmd, stdout=logs, stderr=subprocess.STDOUT))
        gateway = f"http://127.0.0.1:{gport}"
        await wait_ready(worker + "/health")
        await wait_ready(gateway + "/health")

        content = "Summarize the plan in one line. " * 4
        prompt = f"<|user|>\n{content}\n<|assistant|>\n"  # what the gateway's test mode sends

        def direct_body(i: int) -> dict:
            return {
                "rid": uuid.uuid4().hex,
                "input_ids": list(prompt.encode()),
                "stream": True,
                "sampling_params": {"max_new_tokens": a.tokens, "skip_special_tokens": False},
            }

        def gateway_body(i: int) -> dict:
            return {
                "model": MODEL,
                "stream": True,
                "max_tokens": a.tokens,
                "messages": [{"role": "user", "content": content}],
            }

        paths = {
            "direct": (worker + "/generate", direct_body, b'"text"'),
            "gateway": (gateway + "/v1/chat/completions", gateway_body, b'"content":"tok'),
        }
        for url, body, marker in paths.values():  # warm up connections and caches
            await run_level(url, body, marker, 4, 40)
        levels = []
        gw_proc = psutil.Process(procs[1].pid)
        for c in a.concurrency:
            n = max(a.min_requests, c * a.requests_per_stream)
            row: dict = {"concurrency": c}
            for name, (url, body, marker) in paths.items():
                cpu0 = sum(gw_proc.cpu_times()[:2])
                row[name] = await run_level(url, body, marker, c, n)
                if name == "gateway":
                    # CPU the gateway process itself spent per request: its cost independent of how
                    # busy the shared cores were.
                    row["gateway_cpu_ms_per_request"] = (sum(gw_proc.cpu_times()[:2]) - cpu0) * 1000.0 / n
            row["overhead_ttft_p50_ms"] = row["gateway"]["ttft_p50_ms"] - row["direct"]["ttft_p50_ms"]
            row["overhead_ttft_p99_ms"] = row["gateway"]["ttft_p99_ms"] - row["direct"]["ttft_p99_ms"]
            row["overhead_total_p50_ms"] = row["gateway"]["total_p50_ms"] - row["direct"]["total_p50_ms"]
            row["overhead_total_p99_ms"] = row["gateway"]["total_p99_ms"] - row["direct"]["total_p99_ms"]
            print(json.dumps(row), flush=True)
            levels.append(row)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return {
            "benchmark": "gateway_overhead",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "git_commit": commit,
            "machine": machine(),
            "versions": {"m3serve_gateway": _gateway.version(), "aiohttp": aiohttp.__version__},
            "setup": {
                "tokens_per_request": a.tokens,
                "token_interval_s": a.token_interval,
                "worker": "benchmarks/gateway/fast_fake_worker.py (aiohttp, 1 process)",
                "gateway_prompt_mode": "bytes (test mode; no template/tokenizer cost)",
                "client": "aiohttp, same process for both paths",
            },
            "levels": levels,
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Gateway overhead per request (streamed, fake worker)",
        "",
        f"- date: {r['date']}, commit {r['git_commit']}",
        f"- machine: {m['cpu']} x{m['cpus']} CPUs, {m['platform']}, load average at start {m['loadavg_at_start']}",
        f"- versions: m3serve gateway {r['versions']['m3serve_gateway']}, aiohttp {r['versions']['aiohttp']}, "
        f"python {m['python']}",
        f"- command: `{r['command']}`",
        f"- setup: {r['setup']['tokens_per_request']} tokens per request, {r['setup']['token_interval_s']} s between "
        f"tokens; worker {r['setup']['worker']}; gateway prompt mode {r['setup']['gateway_prompt_mode']}; "
        f"client {r['setup']['client']}",
        "",
        "Overhead = gateway path minus direct path (ms). TTFT = time to the first generated token.",
        "",
        "| streams | requests | direct TTFT p50 / p99 | gateway TTFT p50 / p99 | overhead TTFT p50 / p99 "
        "| direct total p50 / p99 | gateway total p50 / p99 | overhead total p50 / p99 | gateway req/s "
        "| gateway CPU ms/request |",
        "|---:|---:|---|---|---|---|---|---|---:|---:|",
    ]
    for row in r["levels"]:
        d, g = row["direct"], row["gateway"]
        lines.append(
            f"| {row['concurrency']} | {g['requests']} | {d['ttft_p50_ms']:.2f} / {d['ttft_p99_ms']:.2f} "
            f"| {g['ttft_p50_ms']:.2f} / {g['ttft_p99_ms']:.2f} "
            f"| {row['overhead_ttft_p50_ms']:+.2f} / {row['overhead_ttft_p99_ms']:+.2f} "
            f"| {d['total_p50_ms']:.2f} / {d['total_p99_ms']:.2f} | {g['total_p50_ms']:.2f} / {g['total_p99_ms']:.2f} "
            f"| {row['overhead_total_p50_ms']:+.2f} / {row['overhead_total_p99_ms']:+.2f} | {g['req_per_s']:.0f} "
            f"| {row['gateway_cpu_ms_per_request']:.3f} |"
        )
    lines += [
        "",
        "The load generator, the fake worker and the gateway share the machine's cores, so at high "
        "concurrency most of the latency difference is CPU contention between the three processes (and other "
        "work on the machine) rather than time the gateway itself spends: the last column is the gateway "
        "process's own CPU time (user + system) per request.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--token-interval", type=float, default=0.0)
    p.add_argument("--min-requests", type=int, default=200)
    p.add_argument("--requests-per-stream", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gateway_overhead")
    a = p.parse_args(argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(main_async(a))
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
