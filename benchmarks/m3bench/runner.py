"""Closed-loop agentic load: `concurrency` agents, each running whole sessions turn after turn.

An agent holds its slot for a session's whole life, think time included, as a real agent holds its
conversation; when a session ends the agent starts the next unstarted one. A failed turn ends its session
(there is no answer to build the next turn on); the remaining turns are counted as skipped.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx

from m3bench.client import Endpoint, stream_chat
from m3bench.metrics import summarize
from m3bench.records import RequestRecord
from m3bench.text import TokenCounter
from m3bench.workload import Session, WorkloadSpec, make_sessions, warmup_messages

WARMUP_OUTPUT_TOKENS = 8


class BenchmarkError(RuntimeError):
    """The run cannot produce meaningful numbers (e.g. the warm-up request failed).

    `points` holds the sweep points finished before the failure, so a long sweep's results survive.
    """

    def __init__(self, message: str, points: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.points = points or []


class _Progress:
    """A tqdm bar on stderr, or nothing (tests, --no-progress)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # a bare GPU image may lack it: measure anyway, without the bar
                return
            self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1, failed: int = 0) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if failed:
                self._bar.set_postfix(failed=failed)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def _warm_up(client: httpx.AsyncClient, endpoint: Endpoint, spec: WorkloadSpec, counter: TokenCounter,
                   count: int) -> list[RequestRecord]:
    records = []
    for i in range(count):
        rec = RequestRecord(session=-1, turn=i)
        await stream_chat(client, endpoint, warmup_messages(spec, counter, i), WARMUP_OUTPUT_TOKENS, rec)
        if not rec.success:
            raise BenchmarkError(f"warm-up request failed, so the server cannot be measured: {rec.error}")
        records.append(rec)
    return records


def per_turn(records: Sequence[RequestRecord], turns: int) -> list[dict[str, Any]]:
    """Per-turn view: does TTFT grow with context, does the cache hit on turn 2+ as it should."""
    rows = []
    for t in range(turns):
        ok = [r for r in records if r.turn == t and r.success]
        ttfts = sorted(r.ttft * 1000 for r in ok if r.ttft is not None)
        prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        cache = [(r.cached_tokens, r.prompt_tokens) for r in ok if r.cached_tokens is not None and r.prompt_tokens]
        rows.append({
            "turn": t + 1,
            "completed": len(ok),
            "prompt_tokens_mean": statistics.fmean(prompts) if prompts else None,
            "ttft_ms_p50": statistics.median(ttfts) if ttfts else None,
            "cached_token_ratio": sum(c for c, _ in cache) / sum(p for _, p in cache) if cache else None,
        })
    return rows


async def run_point(
    endpoint: Endpoint,
    spec: WorkloadSpec,
    counter: TokenCounter,
    concurrency: int,
    num_sessions: int | None = None,
    warmup_requests: int = 1,
    think_time_s: float = 0.0,
    salt: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Run one load point and return its summary, per-turn view, warm-up and per-request records."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1 (got {concurrency})")
    if think_time_s < 0:
        raise ValueError(f"think time must be >= 0 (got {think_time_s})")
    n_sessions = num_sessions or concurrency
    sessions = make_sessions(spec, counter, n_sessions, salt=salt or f"c{concurrency}")
    pending: list[Session] = list(reversed(sessions))
    records: list[RequestRecord] = []
    skipped = 0
    bar = _Progress(n_sessions * spec.turns, f"concurrency {concurrency}", progress)

    async def agent(client: httpx.AsyncClient) -> None:
        nonlocal skipped
        while pending:
            session = pending.pop()
            while not session.done:
                rec = RequestRecord(session=session.index, turn=session.turn,
                                    estimated_prompt_tokens=session.estimated_prompt_tokens)
                await stream_chat(client, endpoint, session.messages(), spec.output_tokens, rec)
                records.append(rec)
                if not rec.success:
                    left = spec.turns - session.turn - 1
                    skipped += left
                    bar.update(1 + left, failed=sum(not r.success for r in records))
                    break
                bar.update(1)
                session.add_answer(rec.generated_text)
                if think_time_s and not session.done:
                    await asyncio.sleep(think_time_s)

    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    try:
        async with httpx.AsyncClient(limits=limits, timeout=endpoint.timeout_s) as client:
            warm = await _warm_up(client, endpoint, spec, counter, warmup_requests)
            start = time.perf_counter()
            await asyncio.gather(*(agent(client) for _ in range(min(concurrency, n_sessions))))
            duration = time.perf_counter() - start
    finally:
        bar.close()
    summary = summarize(records, duration)
    summary["skipped_turns"] = skipped
    return {
        "concurrency": concurrency,
        "num_sessions": n_sessions,
        "summary": summary,
        "per_turn": per_turn(records, spec.turns),
        "warmup": [{"ttft_ms": (r.ttft or 0) * 1000, "prompt_tokens": r.prompt_tokens,
                    "cached_tokens": r.cached_tokens} for r in warm],
        "records": records,
    }


def median_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise median of several runs' summaries (numbers only; other fields from the first run)."""
    first = summaries[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        values = [s.get(key) for s in summaries]
        if isinstance(value, dict):
            out[key] = median_summary(values)  # type: ignore[arg-type]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and all(
            isinstance(v, (int, float)) for v in values
        ):
            out[key] = statistics.median(values)  # type: ignore[arg-type]
        else:
            out[key] = value
    return out


async def run_sweep(
    endpoint: Endpoint,
    spec: WorkloadSpec,
    counter: TokenCounter,
    concurrencies: Sequence[int],
    repeats: int = 1,
    num_sessions: int | None = None,
    warmup_requests: int = 1,
    think_time_s: float = 0.0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One entry per concurrency; with repeats, each run is kept and `summary` is their median."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (got {repeats})")
    points = []
    for c in concurrencies:
        try:
            runs = [
                await run_point(endpoint, spec, counter, c, num_sessions, warmup_requests, think_time_s,
                                salt=f"c{c}/r{r}", progress=progress)
                for r in range(repeats)
            ]
        except BenchmarkError as exc:
            raise BenchmarkError(f"concurrency {c}: {exc}", points) from exc
        point = dict(runs[-1])
        point["records"] = [rec for run in runs for rec in run["records"]]
        point["per_turn"] = per_turn(point["records"], spec.turns)
        if repeats > 1:
            point["runs"] = [run["summary"] for run in runs]
            point["summary"] = median_summary([run["summary"] for run in runs])
        points.append(point)
    return points
