"""Run one MSA case eagerly a few times, for Nsight Compute (ncu) to profile its kernels.

    ncu --kernel-name regex:_score_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight ... \
        python3 benchmarks/kernels/ncu_targets.py extend_b1_random

Cases: decode_b1_60k, decode_b8_shared_60k, decode_b32_60k (graph plan, as served), extend_b1_random, extend_b1_overlap,
extend_b8_overlap_shared, prefill_64k, prefill_64k_overlap (M3 shapes, bench_msa's inputs).
Each case runs its layer (index top-k, then attention) 5 times on the same inputs; `--profile` then prints each
kernel's time per layer from torch.profiler (warm caches). MSA_KERNELS_DIR (default: this tree's kernels/) points
at another copy of the kernel library, for A/B runs of two versions in one device call.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "kernels"))
sys.path.insert(0, os.environ.get("MSA_KERNELS_DIR", str(ROOT / "kernels")))

import bench_msa as bm  # noqa: E402

import msa_kernels as msa  # noqa: E402
from msa_kernels import ops  # noqa: E402

CASES = {
    "decode_b1_60k": ([60000], [1], False, "random"),
    "decode_b8_shared_60k": ([60000] * 8, [1] * 8, True, "random"),
    "decode_b32_60k": ([60000] * 32, [1] * 32, False, "random"),
    "extend_b1_random": ([59904 + 2048], [2048], False, "random"),
    "extend_b1_overlap": ([59904 + 2048], [2048], False, "overlap"),
    "extend_b8_overlap_shared": ([59904 + 2048] * 8, [2048] * 8, True, "overlap"),
    "extend_b8_random_shared": ([59904 + 2048] * 8, [2048] * 8, True, "random"),
    "prefill_64k": ([65536], [65536], False, "random"),
    "prefill_64k_overlap": ([65536], [65536], False, "overlap"),
}


def main() -> None:
    seqs, qlens, shared, selection = CASES[sys.argv[1]]
    x = bm.build_inputs(seqs, qlens, shared, "cuda", seed=1, selection=selection)
    plan = msa.plan(x.page_table, x.seq_lens, x.q_lens)
    if plan.is_decode:  # decode as served: the graph plan, updated on the device
        from msa_kernels.triton.index_topk import prepare_graph_decode_topk

        gp = msa.graph_decode_plan(plan.batch_size, max(1024, plan.page_table.shape[1]), "cuda")
        prepare_graph_decode_topk(gp, x.q_idx.shape[1], x.idx_k_cache.shape[0] // 128)
        rows = torch.arange(plan.batch_size, device="cuda")
        msa.update_graph_decode_plan_from_slots(gp, x.req_to_token, rows, plan.seq_lens)
        plan = gp

    def layer():
        sel = ops.index_topk(plan, x.q_idx, x.idx_k_cache)
        ops.sparse_attention(plan, x.q, x.k_cache, x.v_cache, sel, None, x.k_scale, x.v_scale)

    for _ in range(5):
        layer()
    torch.cuda.synchronize()
    if "--profile" in sys.argv:  # warm-cache kernel times (torch.profiler), not ncu's cache-flushed replays
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                layer()
            torch.cuda.synchronize()
        for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
            if ev.device_type.name == "CUDA" and ev.count:
                print(f"{sys.argv[1]:<24}{ev.key[:40]:<42}{ev.device_time_total / 5:10.1f} us/layer  x{ev.count // 5}")
    print("ok", sys.argv[1], "msa_kernels from", Path(msa.__file__).parent, flush=True)


if __name__ == "__main__":
    main()
