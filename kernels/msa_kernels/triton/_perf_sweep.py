"""GPU sweep of tuning knobs (round 2): decode top-k split/stages, decode attention split, extend tile knobs.

Run: `PYTHONPATH=kernels python3 -m msa_kernels.triton._perf_sweep --out $OUT` (needs a GPU; ~2-3 min).
Uses the benchmark harness's inputs and timers (benchmarks/kernels/bench_msa.py) so numbers compare with it.
"""

# ruff: noqa: B023  (every lambda here is called before its loop variable moves on)
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
LOG: list[dict] = []
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMOKE = not torch.cuda.is_available()  # CPU dry run of the script itself: tiny shapes
T0 = time.time()


def log(**row) -> None:
    row["t"] = round(time.time() - T0, 1)
    LOG.append(row)
    print(json.dumps(row), flush=True)


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_msa", ROOT / "benchmarks/kernels/bench_msa.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_msa"] = mod
    spec.loader.exec_module(mod)
    return mod


def with_env(env: dict, fn):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        return fn()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def decode_sweep(bm, budget) -> None:
    import msa_kernels
    from msa_kernels import ops
    from msa_kernels.triton import _topk_kernels as tk
    from msa_kernels.triton import _topk_worklist as wl
    from msa_kernels.triton import index_topk as it

    cases = [(1, 8192, False), (8, 8192, False), (32, 8192, False), (1, 60000, False), (8, 60000, True),
             (32, 60000, False)]
    if SMOKE:
        cases = [(2, 1000, False), (2, 1000, True)]
    for b, n, shared in cases:
        if time.time() - T0 > budget:
            return
        touched = bm.decode_touched_bytes(b, n, shared)
        sets = 2 if SMOKE else bm.rotation_sets(touched)
        inps = [bm.build_inputs([n] * b, [1] * b, shared, DEV, seed=1000 + i) for i in range(sets)]
        name = f"B={b} N={n}{' shared' if shared else ''}"

        def idx_variant(label, target=None, stages=None, items_per_sm=None):
            plans = [msa_kernels.plan(x.page_table, x.seq_lens, x.q_lens) for x in inps]
            if items_per_sm is not None:
                wl.ITEMS_PER_SM = items_per_sm
            if target is not None:
                for p, x in zip(plans, inps):
                    it.prepare_index_topk(p, 4, x.idx_k_cache.shape[0] // 128, target_items=target)
            old = it.DECODE_STAGES
            if stages is not None:
                it.DECODE_STAGES = stages
            try:
                r = bm.time_graph([lambda x=x, p=p: ops.index_topk(p, x.q_idx, x.idx_k_cache)
                                   for x, p in zip(inps, plans)], DEV)
                w = next(iter(plans[0].extras["triton_index_topk"].values()))
                log(kind="decode_idx", case=name, variant=label, us=round(r["us"], 2), items=w.n_items_host,
                    chunk_blocks=w.chunk_blocks, n_chunks=w.n_chunks, keep=w.keep, final=w.final, sets=sets)
                if label == "default":  # the two kernels apart
                    outs = [torch.empty(b, 4, 16, dtype=torch.int32, device=DEV) for _ in plans]
                    ws = [next(iter(p.extras["triton_index_topk"].values())) for p in plans]
                    r1 = bm.time_graph([lambda x=x, p=p, w=w, o=o: tk.launch_score(w, p, x.q_idx, x.idx_k_cache, o, 4,
                                                                                     it.DECODE_STAGES)
                                        for x, p, w, o in zip(inps, plans, ws, outs)], DEV)
                    log(kind="decode_idx", case=name, variant="score only", us=round(r1["us"], 2))
                    if not ws[0].final:
                        r2 = bm.time_graph([lambda p=p, w=w, o=o: tk.launch_merge(w, p, o)
                                            for p, w, o in zip(plans, ws, outs)], DEV)
                        log(kind="decode_idx", case=name, variant="merge only", us=round(r2["us"], 2))
            except Exception as e:  # noqa: BLE001
                log(kind="decode_idx", case=name, variant=label, error=f"{type(e).__name__}: {e}"[:300])
            finally:
                it.DECODE_STAGES = old
                wl.ITEMS_PER_SM = 2

        idx_variant("default")
        for st in (1, 2, 4):
            idx_variant(f"stages={st}", stages=st)
        for ips in (1, 4, 8):
            idx_variant(f"items_per_sm={ips}", items_per_sm=ips)
        idx_variant("final(one chunk)", target=1)
        # decode attention alone on the reference selection, split variants
        sels = [ops.index_topk(msa_kernels.plan(x.page_table, x.seq_lens, x.q_lens), x.q_idx, x.idx_k_cache)
                for x in inps]
        for env in ({}, {"MSA_DECODE_STAGES": 2}, {"MSA_DECODE_STAGES": 4}, {"MSA_DECODE_NSPLIT": 4},
                    {"MSA_DECODE_NSPLIT": 16}, {"MSA_DECODE_CHUNK": 64}):
            plans = [msa_kernels.plan(x.page_table, x.seq_lens, x.q_lens) for x in inps]
            try:
                r = with_env(env, lambda: bm.time_graph(
                    [lambda x=x, p=p, s=s: ops.sparse_attention(p, x.q, x.k_cache, x.v_cache, s)
                     for x, p, s in zip(inps, plans, sels)], DEV))
                log(kind="decode_attn", case=name, env=env, us=round(r["us"], 2))
            except Exception as e:  # noqa: BLE001
                log(kind="decode_attn", case=name, env=env, error=f"{type(e).__name__}: {e}"[:300])
        torch.cuda.empty_cache()


def fp8_sweep(bm, budget) -> None:
    import msa_kernels
    from msa_kernels import ops

    if time.time() - T0 > budget:
        return
    b, n = (2, 1000) if SMOKE else (32, 60000)
    bf = bm.build_inputs([n] * b, [1] * b, False, DEV, seed=77)
    f8 = bm.to_fp8(bf)
    sel = ops.index_topk(msa_kernels.plan(f8.page_table, f8.seq_lens, f8.q_lens), f8.q_idx, f8.idx_k_cache)
    for label, x in (("bf16", bf), ("fp8", f8)):
        envs = ({}, {"MSA_DECODE_NSPLIT": 1}, {"MSA_DECODE_NSPLIT": 4}, {"MSA_DECODE_CHUNK": 128},
                {"MSA_DECODE_STAGES": 2}, {"MSA_DECODE_STAGES": 4}, {"MSA_DECODE_CHUNK": 32})
        for env in envs if label == "fp8" else envs[:3]:
            p = msa_kernels.plan(x.page_table, x.seq_lens, x.q_lens)
            try:
                r = with_env(env, lambda x=x, p=p: bm.time_graph(
                    [lambda: ops.sparse_attention(p, x.q, x.k_cache, x.v_cache, sel, None, x.k_scale, x.v_scale)],
                    DEV))
                log(kind="fp8_attn", kv=label, env=env, us=round(r["us"], 2))
            except Exception as e:  # noqa: BLE001
                log(kind="fp8_attn", kv=label, env=env, error=f"{type(e).__name__}: {e}"[:300])
        p = msa_kernels.plan(x.page_table, x.seq_lens, x.q_lens)
        r = bm.time_graph([lambda x=x, p=p: ops.index_topk(p, x.q_idx, x.idx_k_cache)], DEV)
        log(kind="fp8_idx", kv=label, us=round(r["us"], 2))
    del bf, f8
    torch.cuda.empty_cache()


def extend_sweep(bm, budget) -> None:
    import msa_kernels
    from msa_kernels import ops
    from msa_kernels.triton import extend_attention as ea

    for sel_style in ("overlap", "random"):
        if time.time() - T0 > budget:
            return
        pre, new = (512, 256) if SMOKE else (59904, 2048)
        inp = bm.build_inputs([pre + new], [new], False, DEV, seed=5, selection=sel_style)
        p = msa_kernels.plan(inp.page_table, inp.seq_lens, inp.q_lens)
        sel = ops.index_topk(p, inp.q_idx, inp.idx_k_cache)
        flops = bm.sparse_attn_flops_exact(sel, inp.q_pos)
        variants = [({}, None, None), ({"MSA_EXTEND_KSUB": 64}, None, None),
                    ({"MSA_EXTEND_KSUB": 64, "MSA_EXTEND_STAGES": 3}, None, None),
                    ({"MSA_EXTEND_STAGES": 3}, None, None),
                    ({"MSA_EXTEND_KSUB": 64, "MSA_EXTEND_WARPS": 4}, None, None)]
        if sel_style == "random":
            variants += [({}, -1, "kv_major"), ({"MSA_EXTEND_KSUB": 64}, -1, "kv_major"),
                         ({"MSA_EXTEND_KSUB": 32}, None, None), ({"MSA_EXTEND_WIDE_WARPS": 2}, None, None),
                         ({"MSA_EXTEND_WIDE_WARPS": 8}, None, None)]
        for env, um, wp in variants:
            if time.time() - T0 > budget:
                return
            try:
                def f(um=um, wp=wp):
                    return ea.sparse_attention(p, inp.q, inp.k_cache, inp.v_cache, sel, union_max=um, wide_pass=wp)
                r = with_env(env, lambda: bm.time_eager(f, DEV, reps=5))
                log(kind="extend_attn", sel=sel_style, env=env, union_max=um, wide=wp, us=round(r["us"], 1),
                    tflops=round(flops / r["us"] / 1e6, 1))
            except Exception as e:  # noqa: BLE001
                log(kind="extend_attn", sel=sel_style, env=env, error=f"{type(e).__name__}: {e}"[:300])
        torch.cuda.empty_cache()


def merge_sweep(bm, budget) -> None:
    """Index top-k merge: keys per slice of the running selection (one row and one warp per program)."""
    import msa_kernels
    from msa_kernels import ops
    from msa_kernels.triton import _topk_kernels as tk

    cases = [(1, 8192), (32, 8192), (1, 60000), (32, 60000)] if not SMOKE else [(2, 1000)]
    for b, n in cases:
        if time.time() - T0 > budget:
            return
        sets = 2 if SMOKE else bm.rotation_sets(bm.decode_touched_bytes(b, n))
        inps = [bm.build_inputs([n] * b, [1] * b, False, DEV, seed=1000 + i) for i in range(sets)]
        for width in (128, 256, 512, 1024):
            tk.MERGE_SLICE = width
            plans = [msa_kernels.plan(x.page_table, x.seq_lens, x.q_lens) for x in inps]
            try:
                r = bm.time_graph([lambda x=x, p=p: ops.index_topk(p, x.q_idx, x.idx_k_cache)
                                   for x, p in zip(inps, plans)], DEV)
                log(kind="merge", case=f"B={b} N={n}", slice=width, idx_us=round(r["us"], 2))
            except Exception as e:  # noqa: BLE001
                log(kind="merge", case=f"B={b} N={n}", slice=width, error=f"{type(e).__name__}: {e}"[:300])
        tk.MERGE_SLICE = 512


def extend2_sweep(bm, budget) -> None:
    """Union-pass knobs around the round-2 default (KSUB 64, 4 warps)."""
    import msa_kernels
    from msa_kernels import ops
    from msa_kernels.triton import extend_attention as ea

    for sel_style in ("overlap", "random"):
        pre, new = (512, 256) if SMOKE else (59904, 2048)
        inp = bm.build_inputs([pre + new], [new], False, DEV, seed=5, selection=sel_style)
        p = msa_kernels.plan(inp.page_table, inp.seq_lens, inp.q_lens)
        sel = ops.index_topk(p, inp.q_idx, inp.idx_k_cache)
        flops = bm.sparse_attn_flops_exact(sel, inp.q_pos)
        variants = [{}, {"MSA_EXTEND_KSUB": 128, "MSA_EXTEND_WARPS": 8}, {"MSA_EXTEND_KSUB": 32},
                    {"MSA_EXTEND_STAGES": 3}, {"MSA_EXTEND_STAGES": 1}]
        for env in variants if sel_style == "overlap" else variants[:2]:
            if time.time() - T0 > budget:
                return
            try:
                def f():
                    return ea.sparse_attention(p, inp.q, inp.k_cache, inp.v_cache, sel)
                r = with_env(env, lambda: bm.time_eager(f, DEV, reps=5))
                log(kind="extend2", sel=sel_style, env=env, us=round(r["us"], 1), tflops=round(flops / r["us"] / 1e6, 1))
            except Exception as e:  # noqa: BLE001
                log(kind="extend2", sel=sel_style, env=env, error=f"{type(e).__name__}: {e}"[:300])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", default="decode,fp8,extend")
    ap.add_argument("--budget-s", type=float, default=150)
    args = ap.parse_args()
    bm = bench_module()
    log(kind="env", card=torch.cuda.get_device_name() if not SMOKE else "cpu", torch=torch.__version__,
        triton=__import__("triton").__version__)
    try:
        for sec in args.only.split(","):
            {"decode": decode_sweep, "fp8": fp8_sweep, "extend": extend_sweep, "merge": merge_sweep,
             "extend2": extend2_sweep}[sec](bm, args.budget_s)
    finally:
        with open(os.path.join(args.out, "perf_sweep.json"), "w") as f:
            json.dump(LOG, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
