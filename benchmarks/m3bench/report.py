"""Results as JSON (for machines and for benchmarks/results/) and as a short table (for people)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from m3bench.client import Endpoint
from m3bench.workload import WorkloadSpec


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def build_result(
    endpoint: Endpoint,
    spec: WorkloadSpec,
    points: Sequence[dict[str, Any]],
    argv: Sequence[str],
    settings: dict[str, Any],
    details: bool = False,
) -> dict[str, Any]:
    """The whole benchmark as one JSON-ready dict. Per-request records only with `details`."""
    out_points = []
    for p in points:
        q = {k: v for k, v in p.items() if k != "records"}
        if details:
            q["requests"] = [r.to_dict() for r in p["records"]]
        out_points.append(q)
    return {
        "benchmark": "m3bench-agentic",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["m3serve", "bench", *argv],
        "client": {
            "host": platform.node(),
            "python": sys.version.split()[0],
            "m3serve-bench": _version("m3serve-bench"),
            "httpx": _version("httpx"),
        },
        "endpoint": {"base_url": endpoint.base_url, "model": endpoint.model,
                     "fixed_output": endpoint.fixed_output, "temperature": endpoint.temperature},
        "workload": dataclasses.asdict(spec),
        "settings": settings,
        "points": out_points,
    }


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def _f(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(points: Sequence[dict[str, Any]]) -> str:
    """One row per concurrency with the headline numbers (times in ms)."""
    head = (f"{'conc':>5} {'ok':>5} {'fail':>5} {'req/s':>7} {'out tok/s':>10} {'in tok/s':>10} "
            f"{'TTFT p50':>9} {'p90':>8} {'p99':>8} {'TPOT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} "
            f"{'E2E p50':>9} {'p99':>9} {'cached':>7}")
    rows = [head]
    for p in points:
        s = p["summary"]
        ratio = s["cached_token_ratio"]
        rows.append(
            f"{p['concurrency']:>5} {s['completed']:>5} {s['failed']:>5} {_f(s['request_throughput'], 2):>7} "
            f"{_f(s['output_throughput']):>10} {_f(s['input_throughput']):>10} "
            f"{_f(s['ttft_ms']['p50']):>9} {_f(s['ttft_ms']['p90']):>8} {_f(s['ttft_ms']['p99']):>8} "
            f"{_f(s['tpot_ms']['p50'], 2):>9} {_f(s['tpot_ms']['p99'], 2):>7} "
            f"{_f(s['itl_ms']['p50'], 2):>8} {_f(s['itl_ms']['p99'], 2):>7} "
            f"{_f(s['e2e_latency_ms']['p50']):>9} {_f(s['e2e_latency_ms']['p99']):>9} "
            f"{'-' if ratio is None else f'{ratio:.1%}':>7}"
        )
    return "\n".join(rows)
