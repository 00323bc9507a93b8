"""The client end to end against the fake streaming server of conftest.py (one token per word)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from m3bench.cli import main
from m3bench.client import Endpoint, api_root
from m3bench.runner import BenchmarkError, run_point
from m3bench.text import WordCounter
from m3bench.workload import WorkloadSpec

SPEC = WorkloadSpec(prefix_tokens=200, user_tokens=10, tool_result_tokens=15, turns=3, output_tokens=5)
SMALL = ["--prefix-tokens", "200", "--user-tokens", "10", "--tool-result-tokens", "15", "--turns", "3",
         "--output-tokens", "5", "--no-progress"]


def run(server, spec=SPEC, concurrency=2, sessions=None, timeout=30.0, **kw):
    endpoint = Endpoint(server.base_url, "fake-model", timeout_s=timeout, **kw)
    return asyncio.run(run_point(endpoint, spec, WordCounter(), concurrency, sessions, progress=False))


def test_turns_tokens_and_cache(fake_server):
    srv = fake_server()
    point = run(srv, concurrency=2, sessions=3)
    s = point["summary"]
    assert s["completed"] == 9 and s["failed"] == 0 and s["skipped_turns"] == 0
    reqs = srv.state.requests
    assert len(reqs) == 1 + 9  # warm-up + 3 sessions x 3 turns
    # fixed output lengths requested the SGLang way, and received
    assert all(r["ignore_eos"] and r["min_tokens"] == 5 and r["max_tokens"] == 5 and r["stream"] for r in reqs[1:])
    assert s["total_output_tokens"] == 45 and s["output_tokens_from_usage"]
    # every request carries the same prefix; turn t has 2 + 2(t-1) messages, the answers are the server's
    assert len({r["messages"][0]["content"] for r in reqs}) == 1
    by_session: dict[str, list[dict]] = {}
    for r in reqs[1:]:
        by_session.setdefault(r["messages"][1]["content"], []).append(r)
    assert len(by_session) == 3
    for turns in by_session.values():
        assert [len(r["messages"]) for r in turns] == [2, 4, 6]
        for prev, cur in zip(turns, turns[1:]):
            assert cur["messages"][: len(prev["messages"])] == prev["messages"]
            answer = cur["messages"][len(prev["messages"])]
            assert answer["role"] == "assistant" and len(answer["content"].split()) == 5
            assert answer["content"].startswith("w")  # the fake server's words, not invented text
            assert len(cur["messages"][-1]["content"].split()) == 15
    # prompt tokens: the server's count (usage), which the fake server makes = words
    served = srv.state.served[1:]
    assert s["total_input_tokens"] == sum(x["prompt_tokens"] for x in served)
    assert sorted(r.prompt_tokens for r in point["records"]) == sorted(x["prompt_tokens"] for x in served)
    assert {r.prompt_tokens for r in point["records"] if r.turn == 0} == {210}
    assert {r.prompt_tokens for r in point["records"] if r.turn == 2} == {210 + 2 * (5 + 15)}
    assert all(r.estimated_prompt_tokens == r.prompt_tokens for r in point["records"])
    # cached tokens: turn 1 hits the warmed prefix, later turns hit their own history (prompt + answer)
    ratio = sum(x["cached_tokens"] for x in served) / sum(x["prompt_tokens"] for x in served)
    assert s["cached_token_ratio"] == pytest.approx(ratio)
    for r in point["records"]:
        floor = 200 if r.turn == 0 else r.prompt_tokens - 15
        assert r.cached_tokens >= floor
    ratios = [t["cached_token_ratio"] for t in point["per_turn"]]
    # turn 1: the prefix, plus a word now and then where a task happens to start like the warm-up question
    assert 200 / 210 <= ratios[0] < 202 / 210
    assert ratios[1:] == pytest.approx([215 / 230, 235 / 250])
    assert point["warmup"][0]["cached_tokens"] == 0
    assert s["request_throughput"] == pytest.approx(9 / s["duration_s"])


def test_timings_follow_the_server(fake_server):
    srv = fake_server(ttft_delay=0.05, token_delay=0.01)
    point = run(srv, spec=WorkloadSpec(prefix_tokens=50, user_tokens=5, tool_result_tokens=5, turns=2,
                                       output_tokens=6), concurrency=2)
    s = point["summary"]
    assert s["completed"] == 4
    assert 50 <= s["ttft_ms"]["p50"] < 500
    assert 10 <= s["tpot_ms"]["p50"] < 100
    assert 10 <= s["itl_ms"]["p50"] < 100
    assert sum(len(r.itls) for r in point["records"]) == 4 * 5  # role-only first chunk is not a token
    assert s["e2e_latency_ms"]["p50"] >= 50 + 5 * 10
    assert 1.0 <= s["concurrency_achieved"] <= 2.05


def test_without_usage_counts_chunks(fake_server):
    srv = fake_server(report_usage=False)
    s = run(srv, concurrency=1, sessions=1)["summary"]
    assert s["completed"] == 3
    assert s["total_output_tokens"] == 15 and not s["output_tokens_from_usage"]
    assert s["cached_token_ratio"] is None and s["total_input_tokens"] == 0


def test_without_cache_report_ratio_is_none(fake_server):
    s = run(fake_server(report_cache=False), concurrency=1, sessions=1)["summary"]
    assert s["cached_token_ratio"] is None and s["total_input_tokens"] > 0


def test_unfixed_output_sends_no_extra_fields(fake_server):
    srv = fake_server()
    s = run(srv, concurrency=1, sessions=1, fixed_output=False)["summary"]
    assert all("ignore_eos" not in r and "min_tokens" not in r for r in srv.state.requests)
    assert s["total_output_tokens"] == 3 * 3  # the fake server stops after 3 words without ignore_eos


def test_http_error_ends_the_session(fake_server):
    # request 0 is the warm-up; with concurrency 1, request 2 is session 0's second turn
    srv = fake_server(fail_on={2})
    point = run(srv, concurrency=1, sessions=2)
    s = point["summary"]
    assert s["failed"] == 1 and s["completed"] == 1 + 3 and s["skipped_turns"] == 1
    assert s["errors"] == ['HTTP 500: {"error": {"message": "injected failure"}}']
    failed = [r for r in point["records"] if not r.success]
    assert [(r.session, r.turn) for r in failed] == [(0, 1)]


def test_error_event_mid_stream(fake_server):
    srv = fake_server(break_on={1})
    point = run(srv, concurrency=1, sessions=1)
    s = point["summary"]
    assert s["failed"] == 1 and s["completed"] == 0 and s["skipped_turns"] == 2
    assert "injected stream failure" in s["errors"][0]
    assert s["ttft_ms"]["p50"] is None  # failed requests do not leak into the distributions


def test_request_timeout(fake_server):
    srv = fake_server(hang_on={1})
    s = run(srv, concurrency=1, sessions=1, timeout=0.5)["summary"]
    assert s["failed"] == 1 and "Timeout" in s["errors"][0]


def test_failed_warmup_is_fatal(fake_server):
    with pytest.raises(BenchmarkError, match="warm-up request failed.*HTTP 500"):
        run(fake_server(fail_on={0}))


def test_unreachable_server():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(BenchmarkError, match="ConnectError"):
        asyncio.run(run_point(Endpoint(f"http://127.0.0.1:{port}/v1", "m", timeout_s=5), SPEC, WordCounter(), 1,
                              progress=False))


def test_api_root():
    assert api_root("http://h:1") == "http://h:1/v1"
    assert api_root("http://h:1/") == "http://h:1/v1"
    assert api_root("https://h/openai/v1/") == "https://h/openai/v1"
    with pytest.raises(ValueError, match="base-url"):
        api_root("localhost:8000")


def test_cli_sweep_writes_json_and_plots(fake_server, tmp_path, capsys):
    srv = fake_server()
    out = tmp_path / "res" / "sweep.json"
    rc = main(["--base-url", srv.base_url, *SMALL, "--concurrency", "1,2", "--output", str(out), "--output-details"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [p["concurrency"] for p in result["points"]] == [1, 2]
    assert result["endpoint"]["model"] == "fake-model"  # resolved from /v1/models
    assert result["workload"]["prefix_tokens"] == 200 and result["settings"]["length_unit"] == "words"
    assert [len(p["requests"]) for p in result["points"]] == [3, 6]
    assert result["points"][1]["summary"]["completed"] == 6
    assert (tmp_path / "res" / "sweep_throughput.png").stat().st_size > 1000
    assert (tmp_path / "res" / "sweep_latency.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "out tok/s" in table and "TTFT p50" in table
    # the sweep points used different sessions: point 2's first turns were not cached beyond the prefix
    first_turn_tasks = [r["messages"][1]["content"] for r in srv.state.requests
                        if len(r["messages"]) == 2 and r["max_tokens"] == 5]  # warm-ups ask for 8 tokens
    assert len(first_turn_tasks) == 3 and len(set(first_turn_tasks)) == 3


def test_cli_repeats_and_failures_exit_1(fake_server, tmp_path):
    srv = fake_server(fail_on={3})
    out = tmp_path / "r.json"
    rc = main(["--base-url", srv.base_url, "--model", "fake-model", *SMALL, "--concurrency", "1",
               "--repeats", "2", "--output", str(out)])
    assert rc == 1
    point = json.loads(out.read_text())["points"][0]
    assert [r["failed"] for r in point["runs"]] == [1, 0]
    assert point["summary"]["failed"] == 0.5  # the median of the two runs
    assert "requests" not in point


@pytest.mark.parametrize("args,message", [
    (["--concurrency", "0"], "concurrency values must be integers >= 1"),
    (["--concurrency", "a,b"], "comma-separated integers"),
    (["--turns", "0"], "--turns out of range"),
    (["--output-tokens", "-1"], "--output-tokens out of range"),
    (["--base-url", "localhost:8000"], "base-url must be an http"),
    (["--image-size", "0x4"], "image size must be positive"),
    (["--extra-body", "[1]"], "must be a JSON object"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_cli_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_server_down_exits_2(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["--base-url", f"http://127.0.0.1:{port}/v1", "--no-progress"]) == 2
    assert "pass --model" in capsys.readouterr().err


def test_compare_two_arms(fake_server, tmp_path, capsys):
    fast, slow = fake_server(), fake_server(token_delay=0.02)
    for name, srv in (("fast", fast), ("slow", slow)):
        assert main(["--base-url", srv.base_url, *SMALL, "--concurrency", "1,2",
                     "--output", str(tmp_path / f"{name}.json")]) == 0
    capsys.readouterr()
    md = tmp_path / "cmp.md"
    assert main(["compare", str(tmp_path / "fast.json"), str(tmp_path / "slow.json"), "--baseline", "slow",
                 "--markdown", str(md), "--plot-dir", str(tmp_path)]) == 0
    rows = [line.split(" | ") for line in md.read_text().splitlines()[2:]]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [("fast", "1"), ("fast", "2"), ("slow", "1"), ("slow", "2")]
    ratios = [float(r[-1].strip(" |x")) for r in rows]
    assert ratios[2:] == [1.0, 1.0] and all(x > 1.5 for x in ratios[:2])  # no delay beats 20 ms per token
    assert (tmp_path / "compare_sweep.png").exists()
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path / "fast.json"), "--baseline", "nope"])
    assert "--baseline 'nope' is not one of the arms" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path / "bad.json")])
    assert "not an m3bench result" in capsys.readouterr().err


def test_cli_keeps_finished_points_when_a_later_warmup_fails(fake_server, tmp_path, capsys):
    # concurrency 1: warm-up (0) + 3 turns (1-3); concurrency 2 starts with its warm-up (4), which fails
    srv = fake_server(fail_on={4})
    out = tmp_path / "partial.json"
    rc = main(["--base-url", srv.base_url, *SMALL, "--concurrency", "1,2", "--output", str(out)])
    assert rc == 2
    result = json.loads(out.read_text())
    assert [p["concurrency"] for p in result["points"]] == [1]
    assert result["points"][0]["summary"]["completed"] == 3
    assert "concurrency 2: warm-up request failed" in result["settings"]["aborted"]
    assert "sweep stopped early" in capsys.readouterr().err
