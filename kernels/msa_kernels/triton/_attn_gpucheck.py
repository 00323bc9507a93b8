"""One-shot GPU check of the sparse attention kernels at M3 shapes: correctness, then a quick timing table.

    PYTHONPATH=kernels python -m msa_kernels.triton._attn_gpucheck [--quick] [--out DIR]

Correctness compares with a gathered float32 reference (checked against msa_kernels.reference on a small
case first) on fresh random inputs, poisoned outputs and NaN-poisoned unowned cache slots. Timing: decode
inside a CUDA graph (K calls per graph, each on its own selection so pages are cold), extend eagerly with
CUDA events; copy bandwidth and matmul rate measured in the same run for the roofline fractions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from ..layout import BLOCK_SIZE
from ..reference import sparse_attention_paged
from . import decode_attention, extend_attention
from ._attn_cases import build_case, random_selection, rel_error

LOG: list[dict] = []
START = time.time()
BUDGET_S = float(os.environ.get("MSA_GPUCHECK_BUDGET_S", 250))


def out_of_time(what: str) -> bool:
    if time.time() - START > BUDGET_S:
        log(kind="skipped", what=what, reason="time budget")
        return True
    return False


def log(**row) -> None:
    LOG.append(row)
    print(json.dumps(row), flush=True)


def gathered_reference(c, scale=None) -> torch.Tensor:
    """float32 attention of each query over its selected blocks only (fast on GPU for long contexts)."""
    p, q, sel = c.plan, c.q, c.selected.long()
    t_count, hq, dim = q.shape
    hkv = c.k_cache.shape[1]
    g = hq // hkv
    scale = dim**-0.5 if scale is None else scale
    ks = 1.0 if c.k_scale is None else c.k_scale
    vs = 1.0 if c.v_scale is None else c.v_scale
    out = torch.empty(t_count, hq, dim, dtype=torch.float32, device=q.device)
    n = torch.arange(BLOCK_SIZE, device=q.device)
    for lo in range(0, t_count, 256):
        hi = min(t_count, lo + 256)
        req = p.q_req[lo:hi].long()
        pos = p.q_pos[lo:hi].long()
        blk = sel[lo:hi]  # [t, hkv, topk]
        ok = blk >= 0
        page = p.page_table.long()[req[:, None, None], blk.clamp_min(0)]  # [t, hkv, topk]
        slot = (page[..., None] * BLOCK_SIZE + n).flatten(2)  # [t, hkv, topk*128]
        key_pos = (blk[..., None] * BLOCK_SIZE + n).flatten(2)
        vis = ok[..., None].expand(-1, -1, -1, BLOCK_SIZE).flatten(2) & (key_pos <= pos[:, None, None])
        heads = torch.arange(hkv, device=q.device)[None, :, None]
        k = c.k_cache[slot, heads].float() * ks  # [t, hkv, S, D]
        v = c.v_cache[slot, heads].float() * vs
        k = torch.where(vis[..., None], k, 0.0)
        v = torch.where(vis[..., None], v, 0.0)
        qf = q[lo:hi].float().view(hi - lo, hkv, g, dim)
        s = torch.einsum("thgd,thsd->thgs", qf, k) * scale
        s = s.masked_fill(~vis[:, :, None, :], float("-inf"))
        o = torch.einsum("thgs,thsd->thgd", torch.softmax(s, -1), v)
        out[lo:hi] = o.reshape(hi - lo, hq, dim)
    return out


def check(name, c, fn, bound, **kw) -> float:
    out = torch.full_like(c.q, float("nan"))
    for t in c.plan.extras.values():  # stale partials must not leak into a result
        for x in t if isinstance(t, tuple) else (t,):
            if x.dtype == torch.float32:
                x.fill_(float("nan"))
    fn(c.plan, c.q, c.k_cache, c.v_cache, c.selected, None, c.k_scale, c.v_scale, out=out, **kw)
    torch.cuda.synchronize()
    err = rel_error(out, gathered_reference(c))
    log(kind="check", name=name, rel_err=err, ok=err < bound)
    return err


def correctness(quick: bool) -> bool:
    dev = "cuda"
    ok = True
    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    # the gathered reference against the official one, on a case small enough for the latter
    c = build_case([3000, 700], [40, 700], 16, 1, dtype=bf16, device=dev)
    r1 = gathered_reference(c)
    r2 = sparse_attention_paged(c.plan, c.q.float(), c.k_cache.float(), c.v_cache.float(), c.selected)
    e = rel_error(r1, r2)
    log(kind="check", name="gathered_ref_vs_reference", rel_err=e, ok=e < 1e-5)
    ok &= e < 1e-5
    heads = [(64, 4), (16, 1), (8, 1)]
    for hq, hkv in heads:
        for dt, cd, bound in ((bf16, None, 1e-2), (bf16, fp8, 1e-2)):
            tag = f"{hq}/{hkv} {'fp8' if cd else 'bf16'}"
            seqs = [61000, 300, 128, 2048, 5000, 129] if not quick else [61000, 300, 2048]
            c = build_case(seqs, [1] * len(seqs), hq, hkv, dtype=dt, cache_dtype=cd, device=dev)
            for fm in (True, False):
                ok &= check(f"decode {tag} mixed fused={fm}", c, decode_attention.sparse_attention, bound,
                            fused_merge=fm) < bound
            c = build_case([60000] * 32, [1] * 32, hq, hkv, dtype=dt, cache_dtype=cd, device=dev)
            ok &= check(f"decode {tag} B32 60k", c, decode_attention.sparse_attention, bound) < bound
            variants = ((None, None), (10**9, None), (-1, "query"), (-1, "kv_major"))
            for style in ("random", "recent"):
                c = build_case([62000, 1000, 300], [2048, 1000, 17], hq, hkv, dtype=dt, cache_dtype=cd,
                               style=style, device=dev)
                for um, wp in variants:
                    ok &= check(f"extend {tag} {style} mixed union_max={um} wide_pass={wp}", c,
                                extend_attention.sparse_attention, bound, union_max=um, wide_pass=wp) < bound
    return ok


def bench_events(fn, iters=10, warmup=2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def bench_graph(calls, replays=10) -> float:
    """Median us per call of a CUDA graph holding every call in `calls`."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in calls[:2]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    g.replay()
    torch.cuda.synchronize()
    return bench_events(g.replay, iters=replays, warmup=2) / len(calls)


def ceilings() -> tuple[float, float]:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = bench_events(lambda: y.copy_(x), iters=10)
    bw = 2 * x.numel() / (t * 1e-6)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    tm = bench_events(lambda: a @ b, iters=10)
    fl = 2 * 8192**3 / (tm * 1e-6)
    log(kind="ceiling", copy_TBps=bw / 1e12, matmul_TFLOPs=fl / 1e12)
    return bw, fl


def bench_decode(bw, quick) -> None:
    runs = []  # (hq, hkv, cache dtype, batch, context, fused merge, env overrides)
    for hq, hkv in ((64, 4), (16, 1)):
        for cd in (None, torch.float8_e4m3fn):
            for batch in (1, 8, 32):
                for n_ctx in ((8192, 60000) if cd is None and not quick else (60000,)):
                    for fm in ((True, False) if cd is None and n_ctx == 60000 else (True,)):
                        runs.append((hq, hkv, cd, batch, n_ctx, fm, {}))
    sweep = {1: ((128, 4), (128, 8), (128, 16), (64, 8), (64, 16), (64, 32)),
             8: ((128, 4), (128, 8), (64, 8), (64, 16)), 32: ((128, 2), (128, 4), (64, 2), (64, 4))}
    for batch, cfgs in sweep.items():
        for hq, hkv in ((64, 4), (16, 1)):
            for chunk, nsplit in cfgs:
                for stages in (2, 3):
                    env = {"MSA_DECODE_CHUNK": chunk, "MSA_DECODE_NSPLIT": nsplit, "MSA_DECODE_STAGES": stages}
                    runs.append((hq, hkv, None, batch, 60000, True, env))
        runs.append((64, 4, torch.float8_e4m3fn, batch, 60000, True, {"MSA_DECODE_STAGES": 2}))
    cache = {}
    for hq, hkv, cd, batch, n_ctx, fm, cfg in runs:
        if out_of_time(f"decode {hq}/{hkv} B{batch} N{n_ctx} {cfg}"):
            continue
        key = (hq, hkv, cd, batch, n_ctx)
        if key not in cache:
            cache.clear()
            c = build_case([n_ctx] * batch, [1] * batch, hq, hkv, dtype=torch.bfloat16, cache_dtype=cd,
                           device="cuda", spare_pages=0)
            gen = torch.Generator().manual_seed(batch * 7 + n_ctx)
            sels = [random_selection(c.plan.q_pos.cpu(), hkv, "random", gen).cuda() for _ in range(16)]
            cache[key] = (c, sels)
        c, sels = cache[key]
        for name, val in cfg.items():
            os.environ[name] = str(val)
        elt = 1 if cd else 2
        byts = batch * hkv * 16 * BLOCK_SIZE * 128 * 2 * elt + 2 * c.q.numel() * 2
        calls = [
            (lambda s=s, c=c, fm=fm: decode_attention.sparse_attention(
                c.plan, c.q, c.k_cache, c.v_cache, s, None, c.k_scale, c.v_scale, fused_merge=fm))
            for s in sels
        ]
        us = bench_graph(calls)
        # the graph-replayed result must still be right (tickets reset, partials merged)
        err = rel_error(calls[-1](), gathered_reference(type(c)(c.plan, c.q, c.k_cache, c.v_cache, sels[-1],
                                                                  c.k_scale, c.v_scale)))
        used = decode_attention.decode_config(batch * hkv, 16)
        for name in cfg:
            os.environ.pop(name, None)
        log(kind="decode", heads=f"{hq}/{hkv}", kv="fp8" if cd else "bf16", B=batch, N=n_ctx, fused=fm,
            chunk=used[0], nsplit=used[1], stages=cfg.get("MSA_DECODE_STAGES", 3), us=us,
            bytes_lb_us=byts / bw * 1e6, frac_bw=byts / bw * 1e6 / us,
            rel_err=err)
    cache.clear()


def bench_extend(fl, quick) -> None:
    default = ((None, None),)
    plain = ({},)
    tuning = ({}, {"MSA_EXTEND_STAGES": 3}, {"MSA_EXTEND_KSUB": 64}, {"MSA_EXTEND_KSUB": 64, "MSA_EXTEND_STAGES": 3})
    runs = [  # heads, kv dtype, batch, (union_max, wide pass) variants, env variants
        (64, 4, None, 1, ((None, None), (10**9, None), (-1, "query"), (-1, "kv_major"), (32, None)), tuning),
        (64, 4, None, 8, default, plain),
        (16, 1, None, 1, default, ({}, {"MSA_EXTEND_KSUB": 64})),
        (8, 1, None, 1, default, plain),
        (64, 4, torch.float8_e4m3fn, 1, default, plain),
    ]
    for hq, hkv, cd, batch, ums, stages in runs:
        for style in ("random", "recent"):
            if out_of_time(f"extend {hq}/{hkv} B{batch} {style}"):
                continue
            prefix = 59904
            c = build_case([prefix + 2048] * batch, [2048] * batch, hq, hkv, dtype=torch.bfloat16,
                           cache_dtype=cd, style=style, device="cuda", spare_pages=0)
            flops = batch * 2048 * hq * 16 * BLOCK_SIZE * 128 * 4
            qg = extend_attention.queries_per_tile(hq // hkv)
            u = c.selected[:2048].view(-1, qg, hkv, 16).permute(0, 2, 1, 3).flatten(2)
            uniq = float(sum(len(set(r.tolist()) - {-1}) for r in u.flatten(0, 1)[:256].cpu()) / min(256, len(u)))
            for um, wp in ums:
                for env in stages:
                    os.environ.update({k: str(v) for k, v in env.items()})
                    us = bench_extend_once(c, c.selected, um, wp)
                    for k in env:
                        os.environ.pop(k, None)
                    log(kind="extend", heads=f"{hq}/{hkv}", kv="fp8" if cd else "bf16", style=style, B=batch,
                        T=2048, prefix=prefix, union_max=um, wide_pass=wp, env=env, us=us,
                        TFLOPs=flops / us / 1e6,
                        frac_matmul=flops / us * 1e6 / fl, union_per_tile=uniq)
            del c
    # full prefill of 16k (dense inside 2048 tokens, sparse beyond)
    for style in ("random", "recent"):
        if out_of_time(f"prefill {style}"):
            continue
        c = build_case([16384], [16384], 64, 4, dtype=torch.bfloat16, style=style, device="cuda", spare_pages=0)
        pos = torch.arange(16384)
        flops = float((torch.clamp((pos // 128 + 1), max=16) * 128).sum()) * 64 * 128 * 4
        us = bench_extend_once(c, c.selected, None, None)
        log(kind="prefill", heads="64/4", style=style, N=16384, us=us, TFLOPs=flops / us / 1e6)


def bench_extend_once(c, sel, union_max, wide_pass) -> float:
    def f():
        extend_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, sel, None, c.k_scale, c.v_scale,
                                          union_max=union_max, wide_pass=wide_pass)
    return bench_events(f, iters=5, warmup=1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    t0 = time.time()
    log(kind="env", card=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=__import__("triton").__version__)
    ok = True
    try:
        if "check" not in args.skip:
            ok = correctness(args.quick)
        log(kind="time", after="correctness", s=time.time() - t0)
        bw, fl = ceilings()
        if "decode" not in args.skip:
            bench_decode(bw, args.quick)
        log(kind="time", after="decode", s=time.time() - t0)
        if "extend" not in args.skip:
            bench_extend(fl, args.quick)
        log(kind="time", after="extend", s=time.time() - t0)
    finally:
        with open(os.path.join(args.out, "attn_gpucheck.json"), "w") as f:
            json.dump(LOG, f, indent=1)
    print("ALL CHECKS OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
