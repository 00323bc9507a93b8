"""trace_split (benchmarks/agentic/gpu): GPU kernels of a profiler trace attributed to SGLang's forward steps and
sorted by kind, on synthetic traces built here; and the profiled window of profile_steps.py on the CPU worker."""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "agentic" / "gpu"))

import trace_split  # noqa: E402

MSA = {"_score_kernel": "msa_index", "_extend_kernel": "msa_attn"}


class _Trace:
    """Chrome-trace events as torch.profiler writes them: CPU ranges, launches with correlation ids, kernels."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.corr = 0

    def range(self, name: str, ts: float, dur: float) -> None:
        self.events.append({"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": dur})

    def kernel(self, name: str, launch_ts: float, gpu_ts: float, dur: float, api: str = "cuda_runtime") -> None:
        self.corr += 1
        self.events.append({"ph": "X", "cat": api, "name": "launch", "ts": launch_ts, "dur": 1.0,
                            "args": {"correlation": self.corr}})
        self.events.append({"ph": "X", "cat": "kernel", "name": name, "ts": gpu_ts, "dur": dur,
                            "args": {"correlation": self.corr}})


def _two_steps() -> _Trace:
    t = _Trace()
    t.range("step[EXTEND bs=8 toks=16384]", 0, 100)
    t.kernel("_score_kernel", 10, 200, 50)
    t.kernel("_extend_kernel", 11, 250, 70, api="cuda_driver")  # Triton launches through the driver API
    t.range("m3serve.moe", 20, 30)
    t.kernel("nvjet_hsh_256x128_gemm", 25, 320, 40)  # a cuBLAS GEMM inside the MoE range: experts
    t.kernel("nvjet_hsh_256x128_gemm", 60, 360, 30)  # the same kernel outside it: a projection
    t.kernel("pytorch_flash::flash_fwd_kernel", 61, 390, 20)
    t.kernel("triton_red_fused_rms_norm", 62, 410, 5)
    t.range("step[DECODE bs=8]", 500, 10)
    t.kernel("graph", 505, 600, 0)  # one graph launch, its kernels share the correlation id
    t.events[-1]["name"] = "_down_kernel"
    t.events[-1]["dur"] = 9
    t.kernel("orphan", 900, 950, 3)  # launched outside every step
    return t


def test_kernels_split_by_step_and_kind():
    out = trace_split.split_trace(_two_steps().events, MSA)
    extend, decode = out["steps"]
    assert (extend["mode"], extend["batch"], extend["tokens"]) == ("EXTEND", 8, 16384)
    assert extend["kernel_us"] == {"msa_index": 50, "msa_attn": 70, "dense_attn": 20, "moe": 40, "gemm": 30,
                                   "other": 5}
    assert extend["gpu_span_us"] == 415 - 200
    assert (decode["mode"], decode["tokens"], decode["kernel_us"]["moe"]) == ("DECODE", None, 9)
    assert out["unattributed_kernel_us"] == 3
    assert out["top_other"] == [{"name": "triton_red_fused_rms_norm", "us": 5.0}]


def test_groups_take_medians_over_like_steps():
    t = _Trace()
    rng = random.Random()
    durs = [rng.uniform(10, 90) for _ in range(5)]
    for i, d in enumerate(durs):
        t.range("step[DECODE bs=8]", 1000 * i, 100)
        t.kernel("_score_kernel", 1000 * i + 1, 1000 * i + 200, d)
    t.range("step[DECODE bs=4]", 9000, 100)
    t.kernel("_score_kernel", 9001, 9200, 7)
    groups = trace_split.split_trace(t.events, MSA)["groups"]
    by_batch = {g["batch"]: g for g in groups}
    assert by_batch[8]["steps"] == 5 and by_batch[8]["kernel_us"]["msa_index"] == round(sorted(durs)[2], 1)
    assert by_batch[4]["busy_us"] == 7
    table = trace_split.format_groups(groups, "t")
    assert "| DECODE bs=8 | 5 |" in table and "| DECODE bs=4 | 1 |" in table


def test_kernel_kinds_come_from_the_sources(tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "_topk_kernels.py").write_text("@triton.jit\ndef _score_kernel(x):\n    pass\n")
    (ours / "decode_attention.py").write_text("@triton.jit(do_not_specialize=['n'])\ndef _decode_kernel(x):\n  pass\n")
    up = tmp_path / "up"
    up.mkdir()
    (up / "topk_sparse.py").write_text("@triton.jit\ndef _topk_index_kernel():\n  pass\n"
                                       "@triton.jit\ndef _gqa_share_sparse_decode_kernel_attn():\n  pass\n")
    kinds = trace_split.triton_kernel_kinds([(ours, "file"), (up, "name")])
    assert kinds == {"_score_kernel": "msa_index", "_decode_kernel": "msa_attn", "_topk_index_kernel": "msa_index",
                     "_gqa_share_sparse_decode_kernel_attn": "msa_attn"}
    repo_kinds = trace_split.default_kernel_kinds()
    assert repo_kinds["_score_kernel"] == "msa_index" and repo_kinds["_extend_kernel"] == "msa_attn"
    assert "_down_kernel" not in repo_kinds  # MoE kernels are never counted as attention


def test_load_events_reads_gzip_and_plain(tmp_path):
    events = _two_steps().events
    (tmp_path / "a.trace.json").write_text(json.dumps({"traceEvents": events}))
    with gzip.open(tmp_path / "b.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert trace_split.load_events(tmp_path / "a.trace.json") == events
    assert trace_split.load_events(tmp_path / "b.trace.json.gz") == events


@pytest.mark.slow
def test_profile_window_on_the_cpu_worker(tmp_path):
    """SGLang's /start_profile and /stop_profile on an m3serve CPU worker (the portable platform once crashed on
    them), the trace's forward steps, and the plugin's MoE range in it."""
    pytest.importorskip("sglang")
    import profile_steps

    out = tmp_path / "out"
    rc = profile_steps.main(["--out", str(out), "--work", str(tmp_path / "work"), "--device", "cpu", "--tiny",
                             "--prefix", "600", "--new", "128", "--batch", "2", "--decode", "4", "--arms", "ours"])
    result = json.loads((out / "profile_split.json").read_text())
    arm = result["arms"][0]
    assert rc == 0, arm.get("reason")
    modes = {s["mode"] for s in arm["split"]["steps"]}
    assert {"EXTEND", "DECODE"} <= modes
    trace = next((tmp_path / "work" / "trace_ours").glob("*.trace.json*"))
    names = {e.get("name") for e in trace_split.load_events(trace)}
    assert "m3serve.moe" in names
    assert "Served step split" in (out / "profile_split.md").read_text()


def test_plot_of_saved_results(tmp_path):
    """plot_step_split.py draws the round-13 results kept in benchmarks/results."""
    import subprocess

    results = REPO / "benchmarks" / "results"
    out = tmp_path / "split.png"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "agentic" / "plot_step_split.py"), str(out),
                    f"a={results / 'served_step_split_h200_r13_before.json'}",
                    f"b={results / 'served_step_split_h200_r13_after_syncs.json'}"], check=True, timeout=120)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
