"""The dense decode benchmark's pure parts on the CPU: cases, bytes, the report and the plot (no timing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks" / "kernels"))
    path = ROOT / "benchmarks" / "kernels" / "bench_dense_decode.py"
    spec = importlib.util.spec_from_file_location("bench_dense_decode_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_cases_share_a_prefix_and_differ_in_length(bench):
    case = bench.Case(8, 60_000, 2_600)
    lengths = case.lengths
    assert len(lengths) == 8 and len(set(lengths)) == 8 and min(lengths) == 62_600
    assert any(n % 128 for n in lengths)
    assert "shared 60k" in case.name and "private 60k" in bench.Case(1, 0, 60_000).name
    assert bench.kv_bytes(1) == 4 * 128 * 2 * 2  # K and V of 4 heads x 128, bf16


def test_report_and_plot(bench, tmp_path):
    env = {"card": "TestCard", "date_utc": "d", "command": "c", "python": "3", "torch": "t", "triton": "x",
           "sglang": "0.5.23", "nvidia_smi": "TestCard, 1", "max_len": 131072, "ours_source_sha1": "abc"}
    rows = []
    for prefix in (8_000, 60_000):
        rows.append({"case": f"B=8 shared {prefix // 1000}k + 2600 own", "batch": 8, "prefix": prefix, "tail": 2600,
                     "sglang_us": 600.0, "ours_us": 150.0, "speedup": 4.0, "unique_bound_us": 50.0,
                     "per_request_bound_us": 300.0, "ours_pct_unique_bound": 33.0,
                     "sglang_pct_per_request_bound": 50.0, "kv_splits_sglang": 8, "max_abs_diff_vs_sglang": 1e-4})
    data = {"env": env, "copy_bytes_s": 3e12, "rows": rows}
    md = bench.markdown(data)
    assert "TestCard" in md and "**4.00x**" in md and md.count("| B=8 shared") == 2
    bench.plot(data, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
