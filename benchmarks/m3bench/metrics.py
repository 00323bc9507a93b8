"""Aggregate metrics over a run, with the definitions of SGLang's bench_serving.

- request throughput = completed requests / wall time of the measured run;
- input / output / total token throughput = summed server-reported tokens / wall time;
- TTFT = first text chunk - request start; ITL = gaps between text chunks, pooled over requests;
- TPOT = (latency - TTFT) / (output tokens - 1), per request with more than one output token;
- E2E latency = last byte - request start;
- concurrency achieved = summed request latency / wall time;
- cached-token ratio = summed usage.prompt_tokens_details.cached_tokens / summed prompt tokens, over the
  requests whose server reported cached tokens (None when none did).

Failed requests count only in `failed`; their partial timings are left out of every distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from m3bench.records import RequestRecord

PERCENTILES = (50, 90, 99)


def distribution(values: Sequence[float], extra: Sequence[int] = ()) -> dict[str, float | None]:
    """mean, std, p50/p90/p99 (+ extra percentiles) and max of `values`, in the values' unit.

    An empty input gives None everywhere, so a report shows "no data" rather than a misleading zero.
    """
    keys = ["mean", "std", *(f"p{p}" for p in (*PERCENTILES, *extra)), "max"]
    if len(values) == 0:
        return {k: None for k in keys}
    arr = np.asarray(values, dtype=np.float64)
    out: dict[str, float | None] = {"mean": float(arr.mean()), "std": float(arr.std())}
    for p in (*PERCENTILES, *extra):
        out[f"p{p}"] = float(np.percentile(arr, p))
    out["max"] = float(arr.max())
    return out


def _ms(values: list[float]) -> list[float]:
    return [v * 1000.0 for v in values]


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
    """The run's metrics. `duration_s` is the wall time of the measured run (warm-up excluded)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]

    prompt_known = [r for r in ok if r.prompt_tokens is not None]
    input_tokens = sum(r.prompt_tokens or 0 for r in prompt_known)
    output_tokens = sum(r.output_tokens for r in ok)
    with_cache = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    cached = sum(r.cached_tokens or 0 for r in with_cache)
    cache_denominator = sum(r.prompt_tokens or 0 for r in with_cache)

    ttfts = [t for r in ok if (t := r.ttft) is not None]
    tpots = [t for r in ok if (t := r.tpot) is not None]
    itls = [gap for r in ok for gap in r.itls]
    latencies = [r.latency for r in ok]

    return {
        "duration_s": duration_s,
        "completed": len(ok),
        "failed": len(failed),
        "errors": sorted({r.error for r in failed})[:10],
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "output_tokens_from_usage": all(r.completion_tokens is not None for r in ok),
        "request_throughput": len(ok) / duration_s,
        "input_throughput": input_tokens / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_throughput": (input_tokens + output_tokens) / duration_s,
        "concurrency_achieved": sum(latencies) / duration_s,
        "cached_tokens": cached if with_cache else None,
        "cached_token_ratio": (cached / cache_denominator) if cache_denominator else None,
        "requests_reporting_cache": len(with_cache),
        "ttft_ms": distribution(_ms(ttfts)),
        "itl_ms": distribution(_ms(itls), extra=(95,)),
        "tpot_ms": distribution(_ms(tpots)),
        "e2e_latency_ms": distribution(_ms(latencies)),
    }
