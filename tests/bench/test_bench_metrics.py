"""Metric math on hand-built records: every expected number is worked out by hand in the test."""

from __future__ import annotations

import math

import pytest

from m3bench.metrics import distribution, summarize
from m3bench.records import RequestRecord
from m3bench.runner import median_summary, per_turn


def rec(start, chunks, end, completion=None, prompt=None, cached=None, ok=True, turn=0, error=""):
    r = RequestRecord(session=0, turn=turn, start=start, end=end, chunk_times=list(chunks), success=ok,
                      error=error, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                      text_chunks=len(chunks))
    return r


def test_record_ttft_itl_tpot():
    r = rec(10.0, [10.5, 10.6, 10.8, 11.1], 11.2, completion=4)
    assert r.ttft == pytest.approx(0.5)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    assert r.latency == pytest.approx(1.2)
    # (1.2 - 0.5) / (4 - 1)
    assert r.tpot == pytest.approx(0.7 / 3)


def test_tpot_uses_server_token_count_over_chunk_count():
    # 2 chunks but the server says 8 tokens (several tokens per chunk): TPOT = (2.0 - 1.0) / 7
    r = rec(0.0, [1.0, 2.0], 2.0, completion=8)
    assert r.output_tokens == 8
    assert r.tpot == pytest.approx(1.0 / 7)
    # no usage: fall back to the chunk count
    r2 = rec(0.0, [1.0, 2.0], 2.0)
    assert r2.output_tokens == 2 and r2.tpot == pytest.approx(1.0)


def test_single_token_or_no_token_has_no_tpot():
    assert rec(0.0, [1.0], 1.0, completion=1).tpot is None
    empty = rec(0.0, [], 1.0, completion=0)
    assert empty.ttft is None and empty.tpot is None and empty.itls == []


def test_distribution_against_hand_values():
    d = distribution([1.0, 2.0, 3.0, 4.0, 10.0], extra=(95,))
    assert d["mean"] == pytest.approx(4.0)
    assert d["std"] == pytest.approx(math.sqrt((9 + 4 + 1 + 0 + 36) / 5))
    assert d["p50"] == pytest.approx(3.0)
    # linear interpolation: rank 0.9 * 4 = 3.6 -> 4 + 0.6 * 6
    assert d["p90"] == pytest.approx(7.6)
    assert d["p99"] == pytest.approx(4 + 0.96 * 6)
    assert d["p95"] == pytest.approx(4 + 0.8 * 6)
    assert d["max"] == 10.0


def test_distribution_of_nothing_is_none():
    assert set(distribution([]).values()) == {None}


def test_summarize_throughputs_and_failures():
    records = [
        rec(0.0, [0.2, 0.3, 0.4], 0.4, completion=3, prompt=100, cached=80),
        rec(0.1, [0.5, 0.7], 0.9, completion=2, prompt=200, cached=150),
        rec(0.2, [0.3], 0.35, ok=False, error="HTTP 500: boom"),  # excluded from every distribution
    ]
    s = summarize(records, duration_s=2.0)
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == ["HTTP 500: boom"]
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(5 / 2.0)
    assert s["input_throughput"] == pytest.approx(300 / 2.0)
    assert s["total_throughput"] == pytest.approx(305 / 2.0)
    assert s["cached_token_ratio"] == pytest.approx(230 / 300)
    assert s["concurrency_achieved"] == pytest.approx((0.4 + 0.8) / 2.0)
    assert s["ttft_ms"]["mean"] == pytest.approx((200 + 400) / 2)
    # ITLs pooled over requests: 100, 100 (first) and 200 (second) ms
    assert s["itl_ms"]["mean"] == pytest.approx(400 / 3)
    assert s["itl_ms"]["max"] == pytest.approx(200)
    # TPOT: (0.4 - 0.2) / 2 = 100 ms and (0.8 - 0.4) / 1 = 400 ms
    assert s["tpot_ms"]["p50"] == pytest.approx(250)
    assert s["e2e_latency_ms"]["max"] == pytest.approx(800)


def test_cached_ratio_only_over_requests_that_report_it():
    records = [rec(0, [0.1], 0.2, completion=1, prompt=100, cached=50), rec(0, [0.1], 0.2, completion=1, prompt=300)]
    s = summarize(records, 1.0)
    assert s["cached_token_ratio"] == pytest.approx(0.5)
    assert s["requests_reporting_cache"] == 1
    none = summarize([rec(0, [0.1], 0.2, completion=1, prompt=100)], 1.0)
    assert none["cached_token_ratio"] is None and none["cached_tokens"] is None


def test_summarize_rejects_bad_duration():
    with pytest.raises(ValueError, match="duration_s"):
        summarize([], 0.0)


def test_median_summary_fieldwise():
    runs = [{"a": 1.0, "b": {"p50": 10}, "name": "x", "n": None}, {"a": 3.0, "b": {"p50": 30}, "name": "y", "n": 1},
            {"a": 2.0, "b": {"p50": 20}, "name": "z", "n": 2}]
    m = median_summary(runs)
    assert m == {"a": 2.0, "b": {"p50": 20}, "name": "x", "n": None}


def test_per_turn_groups_by_turn():
    records = [rec(0, [0.1], 0.2, completion=1, prompt=100, cached=0, turn=0),
               rec(0, [0.3], 0.4, completion=1, prompt=300, cached=270, turn=1),
               rec(0, [0.5], 0.6, completion=1, prompt=500, cached=480, turn=1)]
    rows = per_turn(records, 2)
    assert [r["turn"] for r in rows] == [1, 2]
    assert rows[0]["cached_token_ratio"] == 0.0
    assert rows[1]["cached_token_ratio"] == pytest.approx(750 / 800)
    assert rows[1]["prompt_tokens_mean"] == pytest.approx(400)
    assert rows[1]["ttft_ms_p50"] == pytest.approx(400)
