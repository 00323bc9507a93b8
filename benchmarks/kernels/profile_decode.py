"""Where a served decode layer spends its time: the graph-plan path stage by stage, in CUDA graphs.

The kernel benchmark (bench_msa.py) times whole layers. This splits one layer of the serving path (the
m3serve plugin's graph plan: one plan-update launch, index scoring, the top-k merge, attention) into its
launches, each timed alone in its own CUDA graph over rotated input sets, and also under torch.profiler
(kernel durations without the gaps between launches, from eager calls). `--targets` sweeps the top-k work split (items
wanted per batch), the knob that trades scoring parallelism against merge width.

    PYTHONPATH=kernels:python:benchmarks python3 benchmarks/kernels/profile_decode.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "kernels"))
sys.path.insert(0, str(ROOT / "benchmarks" / "kernels"))

import bench_msa as bm  # noqa: E402

import msa_kernels as msa  # noqa: E402
from msa_kernels.triton import _topk_kernels as tk  # noqa: E402
from msa_kernels.triton.decode_attention import sparse_attention  # noqa: E402
from msa_kernels.triton.index_topk import index_topk, prepare_graph_decode_topk  # noqa: E402

CASES = [(1, 8192, False), (1, 60000, False), (8, 60000, False), (8, 60000, True), (32, 60000, False),
         (1, 262144, False)]


def _parse_case(text: str) -> tuple[int, int, bool, bool]:
    """"32x60000sf" -> (batch 32, context 60000, shared prefix, fp8 caches)."""
    batch, rest = text.split("x")
    return int(batch), int(rest.rstrip("sf")), "s" in rest, "f" in rest


def _stage_fns(inps: list[bm.Inputs], target: int | None, device: str) -> dict[str, list]:
    stages: dict[str, list] = {"update": [], "score": [], "merge": [], "attn": [], "layer": []}
    for x in inps:
        p = msa.plan(x.page_table, x.seq_lens, x.q_lens)
        gp = msa.graph_decode_plan(p.batch_size, max(1024, p.page_table.shape[1]), device)
        heads = x.q_idx.shape[1]
        work = prepare_graph_decode_topk(gp, heads, x.idx_k_cache.shape[0] // 128, target_items=target)
        rows = torch.arange(p.batch_size, device=device)
        msa.update_graph_decode_plan_from_slots(gp, x.req_to_token, rows, p.seq_lens)
        sel = index_topk(gp, x.q_idx, x.idx_k_cache)
        out = torch.empty_like(sel)

        def update(x=x, gp=gp, rows=rows, p=p):
            msa.update_graph_decode_plan_from_slots(gp, x.req_to_token, rows, p.seq_lens)

        def score(x=x, gp=gp, work=work, out=out):
            tk.launch_score(work, gp, x.q_idx, x.idx_k_cache, out, 4, 3)

        def merge(gp=gp, work=work, out=out):
            if not work.final:
                tk.launch_merge(work, gp, out)

        def attn(x=x, gp=gp, sel=sel):
            sparse_attention(gp, x.q, x.k_cache, x.v_cache, sel, None, x.k_scale, x.v_scale)

        def layer(x=x, gp=gp, update=update):
            update()
            sparse_attention(gp, x.q, x.k_cache, x.v_cache, index_topk(gp, x.q_idx, x.idx_k_cache), None,
                             x.k_scale, x.v_scale)

        for name, fn in (("update", update), ("score", score), ("merge", merge), ("attn", attn), ("layer", layer)):
            stages[name].append(fn)
        stages.setdefault("_meta", []).append({"n_chunks": work.n_chunks, "keep": work.keep,
                                               "pdl": os.environ.get("MSA_PDL", "1") != "0"})
    return stages


def _profile_kernels(fns: list, device: str) -> dict[str, float]:
    """Mean device time per call of each kernel name over 5 eager rounds of `fns` (kernel durations only: the
    gaps between launches are what the graph timings add)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            for f in fns:
                f()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and ev.count:
            per[ev.key[:48]] = ev.device_time_total / (5 * len(fns))
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="0,64,128,512", help="top-k items wanted per batch (0: default)")
    ap.add_argument("--sets", type=int, default=8, help="rotated input sets per graph")
    ap.add_argument("--cases", default="",
                    help="BATCHxCONTEXT[s][f] list, s = shared prefix, f = fp8 K/V and index-K (default: the built-in set)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--stages", default="update,score,merge,attn,layer,profile",
                    help="stages to time; profile = torch.profiler kernel times of the layer")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name (several runs in one call)")
    args = ap.parse_args()
    device = "cuda"
    rows = []
    print(f"{'case':<26}{'target':>7}{'chunks':>7}{'PDL':>5}{'update':>8}{'score':>8}{'merge':>8}{'attn':>8}"
          f"{'layer':>8}  kernels (profiler, us/call)", flush=True)
    cases = [(b, n, shared, False) for b, n, shared in CASES]
    if args.cases:
        cases = [_parse_case(c) for c in args.cases.split(",")]
    for batch, ctx, shared, fp8 in cases:
        sets = max(2, min(args.sets, bm.rotation_sets(bm.pool_bytes(batch, ctx, shared, fp8))))
        as_case = bm.to_fp8 if fp8 else (lambda x: x)  # set by set: one bf16 pool at a time beside the fp8 ones
        inps = [as_case(bm.build_inputs([ctx] * batch, [1] * batch, shared, device, seed=s)) for s in range(sets)]
        for t in [int(v) for v in args.targets.split(",")]:
            st = _stage_fns(inps, t or None, device)
            meta = st.pop("_meta")[0]
            wanted = args.stages.split(",")
            us = {k: (bm.time_graph(v, device)["us"] if k in wanted else float("nan")) for k, v in st.items()}
            kern = _profile_kernels(st["layer"], device) if "profile" in wanted else {}
            name = f"B={batch} N={ctx}{' shared' if shared else ''}{' fp8' if fp8 else ''}"
            row = {"case": name, "target": t, **meta, **{f"{k}_us": v for k, v in us.items()}, "kernels": kern}
            rows.append(row)
            kstr = " ".join(f"{k.split('(')[0][-22:]}={v:.1f}" for k, v in sorted(kern.items(), key=lambda kv: -kv[1]))
            print(f"{name:<26}{t:>7}{meta['n_chunks']:>7}{str(meta['pdl']):>5}" + "".join(f"{us[k]:>8.1f}" for k in
                  ("update", "score", "merge", "attn", "layer")) + "  " + kstr, flush=True)
        del inps
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"profile_decode{'_' + args.tag if args.tag else ''}.json"
    (Path(args.out) / name).write_text(json.dumps(
        {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "env": bm.msa_switches(), "rows": rows},
        indent=1))


if __name__ == "__main__":
    main()
