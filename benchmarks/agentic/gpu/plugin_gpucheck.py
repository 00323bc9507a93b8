"""GPU checks + timings of the two pieces that let M3 decode run in CUDA graphs on the portable platform.

1. MoE: m3serve.plugin.moe_grouped (grouped Triton kernels, no host sync) against the expert loop at
   m3-slice's shapes (hidden 6144, 16 experts x 3072, top-4), bf16: parity, and time per call eager (loop,
   grouped) and in a CUDA graph (grouped), with the fraction of the weight-bytes bound.
2. Sparse decode: the plugin's graph flow (out-graph hook at capture, warm-up forward, torch.cuda.graph
   capture of one sparse layer, then refresh + replay for new batches) at M3's full shapes (64 q / 4 KV
   heads, 4 index heads, dim 128) over a 262k-token pool, against the reference on each real batch
   (selection up to near-ties, attention on the kernel's selection) and timed: replay vs the eager path.

    python benchmarks/agentic/gpu/plugin_gpucheck.py --out $OUT
Prints a compact table; writes plugin_gpucheck.json (and the log is the caller's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[3]
for sub in ("python", "kernels"):
    sys.path.insert(0, str(REPO / sub))


def _time_eager(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def _time_graph(fn, iters: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _time_eager(graph.replay, iters)


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = _time_eager(lambda: b.copy_(a), 10)
    return 2 * a.numel() / (us * 1e-6)


def check_moe(rows: list, bw: float) -> None:
    from m3serve.plugin.moe_grouped import grouped_moe_swiglu_oai
    from m3serve.plugin.moe_layout import moe_halves_forward

    e, h, inter, k = 16, 6144, 3072, 4
    layer = SimpleNamespace(
        num_experts=e,
        w13_weight=(torch.randn(e, 2 * inter, h, device="cuda") / h**0.5).bfloat16(),
        w2_weight=(torch.randn(e, h, inter, device="cuda") / inter**0.5).bfloat16(),
    )
    cfg = SimpleNamespace(gemm1_alpha=1.702, gemm1_clamp_limit=7.0, apply_router_weight_on_input=False)
    expert_bytes = 3 * h * inter * 2
    for t in (1, 4, 8, 16, 64, 256):
        x = torch.randn(t, h, device="cuda").bfloat16()
        w, ids = torch.softmax(torch.randn(t, e, device="cuda"), -1).topk(k, dim=-1)
        ids = ids.to(torch.int32)
        got = grouped_moe_swiglu_oai(x, layer.w13_weight, layer.w2_weight, w, ids, 1.702, 7.0)
        want = moe_halves_forward(layer, x, (w, ids, None), cfg)
        err = float((got.float() - want.float()).norm() / want.float().norm())
        hit = int(torch.unique(ids).numel())
        def loop(x=x, w=w, ids=ids):
            return moe_halves_forward(layer, x, (w, ids, None), cfg)

        def grouped(x=x, w=w, ids=ids):
            return grouped_moe_swiglu_oai(x, layer.w13_weight, layer.w2_weight, w, ids, 1.702, 7.0)

        loop_us, grouped_us, graph_us = _time_eager(loop), _time_eager(grouped), _time_graph(grouped)
        bound_us = hit * expert_bytes / bw * 1e6
        rows.append({"check": "moe", "tokens": t, "experts_hit": hit, "rel_err": err, "ok": err < 2e-2,
                     "loop_us": loop_us, "grouped_us": grouped_us, "grouped_graph_us": graph_us,
                     "bytes_bound_us": bound_us, "frac_of_bound": bound_us / graph_us})


class _Pool:
    def __init__(self, slots: int, kv_heads: int, dim: int, idx_dim: int):
        self.k = torch.randn(slots, kv_heads, dim, device="cuda").bfloat16()
        self.v = torch.randn(slots, kv_heads, dim, device="cuda").bfloat16()
        self.ik = torch.randn(slots, 1, idx_dim, device="cuda").bfloat16()

    def get_kv_buffer(self, layer_id):
        return self.k, self.v

    def get_index_k_buffer(self, layer_id):
        return self.ik


def check_decode_graph(rows: list) -> None:
    import msa_kernels
    from m3serve.plugin import sparse_attention as sa
    from msa_kernels import ops, reference
    from msa_kernels.triton._attn_cases import rel_error
    from msa_kernels.triton._topk_testcases import check_selection

    recorded = []
    real_topk = ops.index_topk

    def recording_topk(plan, q_idx, kc, backend="auto"):
        recorded.append(real_topk(plan, q_idx, kc))
        return recorded[-1]

    ops.index_topk = recording_topk
    context, pool_tokens, hq, hkv, dim = 131072, 262144, 64, 4, 128
    pages_total = pool_tokens // 128
    backend = SimpleNamespace(
        req_to_token=torch.zeros(64, context, dtype=torch.int32, device="cuda"), topk_blocks=16,
        max_context_len=context, kv_pool=_Pool(pool_tokens, hkv, dim, 128),
        _is_sparse_kv_cached_by_fusion=lambda fb, layer_id: True,
    )
    decode = SimpleNamespace(is_decode=lambda: True)
    layer = SimpleNamespace(layer_id=1, scaling=dim**-0.5, k_scale_float=None, v_scale_float=None)

    def view(static, seq_cpu=None):
        return SimpleNamespace(forward_mode=decode, seq_lens=static.seq_lens, seq_lens_cpu=seq_cpu,
                               req_pool_indices=static.req_pool_indices, out_cache_loc=None)

    for bs in (1, 8):
        static = SimpleNamespace(seq_lens=torch.ones(bs, dtype=torch.int64, device="cuda"),
                                 req_pool_indices=torch.zeros(bs, dtype=torch.int64, device="cuda"))
        q = torch.randn(bs, hq, dim, device="cuda").bfloat16()
        idx_q = torch.randn(bs, hkv, 128, device="cuda").bfloat16()
        out = {}

        def layer_fn(q=q, idx_q=idx_q, static=static, out=out):
            out["o"] = sa._sparse_forward(backend, q, None, None, layer, view(static), False, idx_q, None,
                                          "decode")[1]
            out["sel"] = recorded[-1]

        sa.prepare_decode_graph(None, backend, view(static, static.seq_lens.cpu()), in_capture=True)
        layer_fn()  # warm-up: builds the graph plan, compiles
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer_fn()
        perm = torch.randperm(pages_total).tolist()
        prefix = perm[:469]  # a 60k-token prefix shared by every request of the "shared" batch
        batches = {
            "shared_60k": ({10 + b: prefix + perm[469 + 8 * b : 477 + 8 * b] for b in range(bs)},
                           [60_000 + 900 + 37 * b for b in range(bs)]),
            "private_mixed": ({20 + b: perm[600 + 230 * b : 830 + 230 * b] for b in range(bs)},
                              [[29_000, 1, 128, 2048, 2049, 17_000, 300, 129][b] for b in range(bs)]),
        }
        for name, (req_rows, seqs) in batches.items():
            for r, pages in req_rows.items():
                slots = (torch.tensor(pages, device="cuda")[:, None] * 128 + torch.arange(128, device="cuda")).reshape(-1)
                backend.req_to_token[r, : slots.numel()] = slots.to(torch.int32)
            req = list(req_rows)
            if bs > 1:  # SGLang pads a graph batch with seq_len 1 on row 0: do it for the last entry
                req[-1], seqs = 0, seqs[:-1] + [1]
            static.seq_lens.copy_(torch.tensor(seqs))
            static.req_pool_indices.copy_(torch.tensor(req))
            # What SGLang does before a replay (a no-op for our plan: the captured step updates it).
            t0 = time.perf_counter()
            sa.prepare_decode_graph(None, backend, view(static, static.seq_lens.cpu()))
            refresh_ms = (time.perf_counter() - t0) * 1e3
            out["o"].fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            o, sel = out["o"].view(bs, hq, dim).clone(), out["sel"].clone()
            page_table = (backend.req_to_token[torch.tensor(req, device="cuda")][:, ::128] // 128).to(torch.int32)
            real = msa_kernels.plan(page_table, seqs, num_pages=pages_total)
            row = {"check": "decode_graph", "batch": bs, "case": name, "refresh_ms": refresh_ms}
            try:
                row.update(check_selection(real, idx_q, backend.kv_pool.ik, sel))
                want = reference.sparse_attention_paged(real, q, backend.kv_pool.k, backend.kv_pool.v, sel,
                                                        layer.scaling)
                row["rel_err"] = rel_error(o, want)
                row["ok"] = row["rel_err"] < 1e-2
            except AssertionError as e:
                row.update(ok=False, error=str(e)[:300])
            row["replay_us"] = _time_eager(graph.replay)
            # The eager path on the same batch (plan built per call, as without graphs).
            fb = SimpleNamespace(forward_mode=decode, seq_lens=static.seq_lens.clone(),
                                 seq_lens_cpu=static.seq_lens.cpu(), req_pool_indices=static.req_pool_indices.clone(),
                                 out_cache_loc=None)

            def eager(q=q, idx_q=idx_q, fb=fb):
                backend.__dict__.pop(sa._PLAN_ATTR, None)
                sa._sparse_forward(backend, q, None, None, layer, fb, False, idx_q, None, "decode")

            row["eager_us"] = _time_eager(eager, 10)
            rows.append(row)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--only", default="moe,decode")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    import triton

    info["triton"] = triton.__version__
    bw = copy_bandwidth()
    info["copy_bw_TBps"] = bw / 1e12
    rows: list = []
    for name, fn in (("moe", lambda: check_moe(rows, bw)), ("decode", lambda: check_decode_graph(rows))):
        if name in args.only.split(","):
            try:
                fn()
            except Exception as e:  # report and go on: one call must return every section's result
                import traceback

                traceback.print_exc()
                rows.append({"check": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"})
    (out / "plugin_gpucheck.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(json.dumps(info))
    for r in rows:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    ok = all(r.get("ok", False) for r in rows)
    print("ALL CHECKS OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
