"""Benchmark client for OpenAI-compatible endpoints, shaped like agentic traffic.

Library use:

    import asyncio
    from m3bench import Endpoint, WorkloadSpec, make_counter, run_sweep

    points = asyncio.run(run_sweep(Endpoint("http://127.0.0.1:8000/v1", "m3"), WorkloadSpec(prefix_tokens=8000),
                                   make_counter(None), concurrencies=[1, 8]))
    print(points[0]["summary"]["output_throughput"])
"""

from m3bench.client import Endpoint, stream_chat
from m3bench.metrics import distribution, summarize
from m3bench.records import RequestRecord
from m3bench.runner import BenchmarkError, run_point, run_sweep
from m3bench.text import make_counter
from m3bench.workload import Session, WorkloadSpec, make_sessions

__all__ = [
    "BenchmarkError", "Endpoint", "RequestRecord", "Session", "WorkloadSpec", "distribution", "make_counter",
    "make_sessions", "run_point", "run_sweep", "stream_chat", "summarize",
]
