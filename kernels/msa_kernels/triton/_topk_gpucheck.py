"""One-shot GPU check of store + index top-k at M3 shapes: correctness, then a quick timing table.

    PYTHONPATH=kernels python -m msa_kernels.triton._topk_gpucheck [--out DIR] [--skip-timing]

Correctness: fresh random bf16 inputs (and fp8 index-K / K / V), poisoned outputs, checked against
msa_kernels.reference (selections up to near-ties); decode also replayed from a CUDA graph. Timing: decode
inside CUDA graphs (several calls per graph, input sets rotated past L2), extend/prefill eagerly with CUDA
events; the copy bandwidth and the bf16 matmul rate measured in the same run give the roofline fractions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from .. import reference
from ..layout import BLOCK_SIZE
from ..plan import plan as make_plan
from . import _topk_worklist
from . import index_topk as index_topk_module
from ._topk_kernels import launch_score
from ._topk_testcases import check_selection, make_batch
from .index_topk import index_topk, prepare_index_topk, refresh_index_topk
from .store import store

LOG: list[dict] = []
START = time.time()
BUDGET_S = float(os.environ.get("MSA_TOPK_GPUCHECK_BUDGET_S", 120))
BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
POISON = -7

# Upstream sglang 0.5.23 index scoring + top-k on an H100 (../shared/research/upstream_msa_h100.md, another
# run): decode idx µs by (B, N), shared-prefix decode, extend and prefill idx µs.
UPSTREAM_US = {
    ("decode", 1, 8192): 7.4, ("decode", 8, 8192): 13.7, ("decode", 32, 8192): 29.7,
    ("decode", 1, 60000): 13.5, ("decode", 8, 60000): 49.6, ("decode", 32, 60000): 170.8,
    ("decode", 1, 262144): 32.3, ("decode", 8, 262144): 187.2, ("decode", 32, 262144): 715.7,
    ("decode-shared", 8, 60000): 29.4, ("extend", 1, 61952): 1277.0, ("extend-shared", 8, 61952): 4248.0,
    ("prefill", 1, 65536): 9633.0,
}


def log(**row) -> None:
    LOG.append(row)
    print(json.dumps(row), flush=True)


def out_of_time(what: str) -> bool:
    if time.time() - START > BUDGET_S:
        log(kind="skipped", what=what, reason="time budget")
        return True
    return False


# ---- correctness -------------------------------------------------------------------------------------


def run_poisoned(p, q_idx, kc) -> torch.Tensor:
    work = prepare_index_topk(p, q_idx.shape[1], kc.shape[0] // BLOCK_SIZE)
    if work.candidates is not None:
        work.candidates.fill_(2**62 + 12345)  # a huge real-looking key: must never be read
    out = torch.full((q_idx.shape[0], q_idx.shape[1], p.topk), POISON, dtype=torch.int32, device=q_idx.device)
    index_topk(p, q_idx, kc, out=out)
    torch.cuda.synchronize()
    assert not bool((out == POISON).any()), "unwritten output entries"
    return out


SELECTION_CASES = {
    # name: (seq_lens, q_lens, heads, shared_blocks, k_dtype)
    "decode B1 60k H4": ([60000], [1], 4, 0, BF16),
    "decode B8 shared 60k H4": ([60000 + 97 * i for i in range(8)], [1] * 8, 4, 468, BF16),
    "decode B8 shared 60k H1": ([60000 + 97 * i for i in range(8)], [1] * 8, 1, 468, BF16),
    "decode B32 mixed H4": ([1, 128, 129, 2048, 2049, 3000, 70000, 20000] * 4, [1] * 32, 4, 0, BF16),
    "decode B32 mixed H2": ([5, 1500, 2048, 2100, 9000, 60000, 33333, 257] * 4, [1] * 32, 2, 0, BF16),
    "decode B8 60k fp8": ([60000] * 8, [1] * 8, 4, 0, FP8),
    "extend B1 2048+59904 H4": ([61952], [2048], 4, 0, BF16),
    "extend mixed short/long H1": ([300, 22048, 2100, 5000], [300, 2048, 40, 1], 1, 0, BF16),
    "prefill 8k H4": ([8192], [8192], 4, 0, BF16),
    "extend 2048+20k fp8 H4": ([22528], [2048], 4, 0, FP8),
    # requests on one 100-block prefix and a short one: the widened copy numbers shared pages once (triton.widen)
    "extend shared prefix fp8 H4": ([22528, 22600, 300], [512, 40, 300], 4, 100, FP8),
}


def check_selections() -> None:
    for name, (seqs, qls, heads, shared, kdt) in SELECTION_CASES.items():
        if out_of_time(name):
            return
        p, q_idx, kc = make_batch(seqs, qls, heads, shared_blocks=shared, q_dtype=BF16, k_dtype=kdt, device="cuda")
        got = run_poisoned(p, q_idx, kc)
        res = check_selection(p, q_idx, kc, got)
        work = p.extras["triton_index_topk"]
        w = next(iter(work.values()))
        log(kind="selection", case=name, ok=True, final=w.final, items=w.n_items_host, block_m=w.block_m,
            chunk_blocks=w.chunk_blocks, **res)


def check_graph_replay() -> None:
    """Capture decode top-k in a CUDA graph, change the inputs in place, replay: must match eager."""
    seqs = [60000 + 97 * i for i in range(8)]
    p, q_idx, kc = make_batch(seqs, [1] * 8, 4, shared_blocks=468, q_dtype=BF16, k_dtype=BF16, device="cuda")
    prepare_index_topk(p, 4, kc.shape[0] // BLOCK_SIZE)
    out = torch.empty(8, 4, 16, dtype=torch.int32, device="cuda")
    index_topk(p, q_idx, kc, out=out)  # compile outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        index_topk(p, q_idx, kc, out=out)
    q_idx.copy_(torch.randn_like(q_idx))
    kc.copy_(torch.randn(kc.shape, device="cuda").to(kc.dtype))
    out.fill_(POISON)
    g.replay()
    torch.cuda.synchronize()
    res = check_selection(p, q_idx, kc, out)
    log(kind="graph", case="decode B8 shared 60k replay with new q/k", ok=True, **res)

    # Capture sized for 8 x 60k (for_graph), then replay batches of other lengths and sharing.
    width, num_pages = p.page_table.shape[1], kc.shape[0] // BLOCK_SIZE
    cap = make_plan(p.page_table.clone(), [60000 + 97 * 7] * 8)
    prepare_index_topk(cap, 4, num_pages, for_graph=True)
    out2 = torch.empty(8, 4, 16, dtype=torch.int32, device="cuda")
    q2 = torch.randn(8, 4, 128, device="cuda", dtype=BF16)
    index_topk(cap, q2, kc, out=out2)
    torch.cuda.synchronize()
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        index_topk(cap, q2, kc, out=out2)
    for seqs, shared in [([1, 128, 2049, 5000, 30000, 60000, 60500, 60679], 0), ([59000 + 200 * i for i in range(8)], 400)]:
        pt = torch.randperm(num_pages)[: 8 * width].view(8, width).to(torch.int32)
        pt[:, :shared] = pt[0, :shared]
        new = make_plan(pt.cuda(), seqs)
        refresh_index_topk(cap, new, 4, num_pages)
        q2.copy_(torch.randn_like(q2))
        out2.fill_(POISON)
        g2.replay()
        torch.cuda.synchronize()
        res = check_selection(new, q2, kc, out2)
        log(kind="graph", case=f"for_graph capture, refreshed batch shared={shared}", ok=True, **res)


def check_store() -> None:
    for heads, tokens, cdt, scale in [(4, 2048, BF16, None), (4, 1, BF16, None), (4, 2048, FP8, 0.37),
                                      (1, 300, FP8, None), (2, 77, BF16, None)]:
        slots_total = 64 * 128
        fused = torch.randn(tokens, 3 * heads, 128, device="cuda", dtype=BF16)
        k, v = fused[:, :heads], fused[:, heads: 2 * heads]
        ik = torch.randn(tokens, 1, 128, device="cuda", dtype=BF16)
        slots = torch.randperm(slots_total, device="cuda")[:tokens]
        res = []
        for fn in (store, reference.store):
            kc = torch.full((slots_total, heads, 128), 13.0, device="cuda").to(cdt)
            vc, ic = kc.clone(), torch.full((slots_total, 1, 128), 13.0, device="cuda").to(cdt)
            fn(slots, k, v, ik, kc, vc, ic, scale, scale)
            res.append((kc, vc, ic))
        torch.cuda.synchronize()
        for a, b in zip(res[0], res[1]):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), "store differs from the reference"
        log(kind="store", heads=heads, tokens=tokens, dtype=str(cdt), scale=scale, ok=True)


# ---- timing ------------------------------------------------------------------------------------------


def ceilings() -> tuple[float, float]:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t_copy = time_events(lambda: y.copy_(x), 10)
    a = torch.randn(8192, 8192, device="cuda", dtype=BF16)
    b = torch.randn_like(a)
    t_mm = time_events(lambda: a @ b, 10)
    bw, fl = 2 * (1 << 30) / (t_copy * 1e-6), 2 * 8192**3 / (t_mm * 1e-6)
    log(kind="ceiling", copy_TBps=bw / 1e12, matmul_TFLOPs=fl / 1e12, device=torch.cuda.get_device_name())
    return bw, fl


def time_events(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1000)
    return statistics.median(times)


def rotation(set_bytes: float) -> int:
    """Input sets to rotate so that one graph replay streams more than 4x the 50 MB L2."""
    return max(1, min(64, -(-int(2e8) // int(set_bytes))))


def time_decode(seqs, heads, shared, kdt, rotate: int) -> float:
    """µs per index_topk call inside a CUDA graph; `rotate` input sets so pages are not L2-resident."""
    sets = [make_batch(seqs, [1] * len(seqs), heads, shared_blocks=shared, q_dtype=BF16, k_dtype=kdt,
                       device="cuda") for _ in range(rotate)]
    outs = [torch.empty(len(seqs), heads, 16, dtype=torch.int32, device="cuda") for _ in sets]
    for (p, q, kc), o in zip(sets, outs):
        index_topk(p, q, kc, out=o)
    torch.cuda.synchronize()
    per_graph = max(20, rotate)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(per_graph):
            p, q, kc = sets[i % rotate]
            index_topk(p, q, kc, out=outs[i % rotate])
    t = time_events(g.replay, 10, warmup=3)
    w = next(iter(sets[0][0].extras["triton_index_topk"].values()))
    del sets, g
    return t / per_graph, w


def timing(bw: float, fl: float) -> None:
    for (b, n) in [(1, 8192), (8, 8192), (32, 8192), (1, 60000), (8, 60000), (32, 60000), (1, 262144),
                   (8, 262144), (32, 262144), (1, 1 << 20)]:
        for kdt in (BF16, FP8) if (b, n) in ((32, 60000), (1, 60000), (32, 262144)) else (BF16,):
            if out_of_time(f"decode {b}x{n}"):
                return
            byt = b * n * 128 * kdt.itemsize
            us, w = time_decode([n] * b, 4, 0, kdt, rotation(byt))
            up = UPSTREAM_US.get(("decode", b, n)) if kdt == BF16 else None
            log(kind="time", op="decode", B=b, N=n, H=4, kdt=str(kdt).split(".")[-1], us=us,
                bytes_pct=100 * byt / (us * 1e-6) / bw, upstream_us=up, speedup=(up / us if up else None),
                items=w.n_items_host, chunk_blocks=w.chunk_blocks, block_m=w.block_m, final=w.final)
    for heads in (4, 1):
        if out_of_time("decode shared"):
            return
        seqs = [60000 + 97 * i for i in range(8)]
        byt = 60000 * 256 + 8 * 1024 * 256
        us, w = time_decode(seqs, heads, 468, BF16, rotation(byt))
        up = UPSTREAM_US[("decode-shared", 8, 60000)] if heads == 4 else None
        log(kind="time", op="decode-shared", B=8, N=60000, H=heads, kdt="bfloat16", us=us,
            bytes_pct=100 * byt / (us * 1e-6) / bw, upstream_us=up, speedup=(up / us if up else None),
            items=w.n_items_host, chunk_blocks=w.chunk_blocks, block_m=w.block_m)
    for name, seqs, qls, shared in [("extend", [61952], [2048], 0),
                                    ("extend-shared", [61952] * 8, [2048] * 8, 468),
                                    ("prefill", [65536], [65536], 0)]:
        if out_of_time(name):
            return
        p, q, kc = make_batch(seqs, qls, 4, shared_blocks=shared, q_dtype=BF16, device="cuda")
        out = torch.empty(q.shape[0], 4, 16, dtype=torch.int32, device="cuda")
        us = time_events(lambda p=p, q=q, kc=kc, out=out: index_topk(p, q, kc, out=out), 5)
        flops = sum(4 * 128 * 2 * ((s - n + i) // BLOCK_SIZE) * BLOCK_SIZE
                    for s, n in zip(seqs, qls) for i in range(n))  # historical blocks actually scored
        w = next(iter(p.extras["triton_index_topk"].values()))
        up = UPSTREAM_US.get((name, len(seqs), seqs[0]))
        log(kind="time", op=name, B=len(seqs), N=seqs[0], H=4, us=us, TFLOPs=flops / (us * 1e-6) / 1e12,
            matmul_pct=100 * flops / (us * 1e-6) / fl, upstream_us=up, speedup=(up / us if up else None),
            items=w.n_items_host, chunk_blocks=w.chunk_blocks, final=w.final)
        del p, q, kc, out


def time_score_only(b: int, n: int) -> float:
    """µs of the scoring kernel alone (no merge) for B private requests of N tokens, in a CUDA graph."""
    sets = [make_batch([n] * b, [1] * b, 4, q_dtype=BF16, device="cuda") for _ in range(rotation(b * n * 256))]
    outs = [torch.empty(b, 4, 16, dtype=torch.int32, device="cuda") for _ in sets]
    works = [prepare_index_topk(p, 4, kc.shape[0] // BLOCK_SIZE) for p, _, kc in sets]
    call = [lambda i=i: launch_score(works[i], sets[i][0], sets[i][1], sets[i][2], outs[i], 4,
                                     index_topk_module.DECODE_STAGES) for i in range(len(sets))]
    for c in call:
        c()
    torch.cuda.synchronize()
    per_graph = max(20, len(sets))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(per_graph):
            call[i % len(sets)]()
    return time_events(g.replay, 10, warmup=3) / per_graph


def variants() -> None:
    """Decode work-split density (items per SM), the scoring kernel's share, extend pipelining depth."""
    for b, n in [(1, 60000), (32, 60000)]:
        if out_of_time("score split"):
            return
        log(kind="variant", what="score kernel only", B=b, N=n, us=time_score_only(b, n))
    for ips in (1, 4):
        _topk_worklist.ITEMS_PER_SM = ips
        for b, n in [(1, 60000), (8, 60000), (32, 60000), (1, 262144)]:
            if out_of_time("variants"):
                _topk_worklist.ITEMS_PER_SM = 2
                return
            us, w = time_decode([n] * b, 4, 0, BF16, rotation(b * n * 256))
            log(kind="variant", what=f"items_per_sm={ips}", B=b, N=n, us=us, items=w.n_items_host,
                chunk_blocks=w.chunk_blocks)
    _topk_worklist.ITEMS_PER_SM = 2
    for stages in (3,):
        index_topk_module.EXTEND_STAGES_SPLIT = index_topk_module.EXTEND_STAGES_FINAL = stages
        for seqs, qls in [([61952], [2048]), ([65536], [65536])]:
            if out_of_time("extend stages"):
                break
            p, q, kc = make_batch(seqs, qls, 4, q_dtype=BF16, device="cuda")
            out = torch.empty(q.shape[0], 4, 16, dtype=torch.int32, device="cuda")
            us = time_events(lambda p=p, q=q, kc=kc, out=out: index_topk(p, q, kc, out=out), 5)
            log(kind="variant", what=f"extend_stages={stages}", B=1, N=seqs[0], T=qls[0], us=us)
    index_topk_module.EXTEND_STAGES_SPLIT, index_topk_module.EXTEND_STAGES_FINAL = 2, 3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(int(time.time()))
    steps = [("store", check_store), ("selection", check_selections), ("graph", check_graph_replay)]
    for name, fn in steps:
        try:
            fn()
        except Exception as e:  # keep going: one failure must not hide the other results
            log(kind="error", step=name, error=repr(e)[:2000])
    if not args.skip_timing:
        try:
            bw, fl = ceilings()
            timing(bw, fl)
            variants()
        except Exception as e:
            log(kind="error", step="timing", error=repr(e)[:2000])
    with open(os.path.join(args.out, "topk_gpucheck.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": __import__("triton").__version__, "rows": LOG}, f, indent=1)
    print("\n== summary ==")
    for r in LOG:
        if r["kind"] in ("time", "variant", "error", "skipped"):
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})
    print("elapsed", round(time.time() - START, 1), "s; errors:", sum(r["kind"] == "error" for r in LOG))


if __name__ == "__main__":
    main()
