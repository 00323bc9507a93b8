"""Dense-layer extend on one GPU: SGLang's Triton extend kernel vs m3serve's FA2 path, same inputs, same run.

M3's full-attention layers in prefill/extend (what `m3serve.plugin.dense_extend` replaces). Shapes: 64 query
and 4 KV heads of dimension 128 (M3), bf16, a paged pool with the prefix on scattered 128-token pages that all
requests of a batch share (the agentic case: one cached 60k prefix), each request's new tokens after it.
Time: median of CUDA-event timings after a warm-up. TFLOP/s count the causal work only (4 * D FLOPs per
query head per visible key). Needs the e2e site (SGLang importable): run under run_gpu.sh's environment,
or `eval "$(bash benchmarks/agentic/gpu/setup_site.sh)"` first.

    python benchmarks/agentic/gpu/dense_extend_bench.py [--out DIR]
    python benchmarks/agentic/gpu/dense_extend_bench.py --plot RESULTS.json OUT.png   (on the CPU machine)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from m3serve.plugin import dense_extend as de

HQ, HKV, DIM, PAGE = 64, 4, 128, 128
CASES = [  # (requests, shared prefix tokens, new tokens per request)
    (1, 60_000, 2_048),
    (8, 60_000, 2_048),
    (8, 60_000, 512),
    (1, 0, 16_384),
]


def make(batch: int, prefix: int, new: int):
    pages = -(-prefix // PAGE) + batch * -(-new // PAGE) + 3
    kb = torch.randn(pages * PAGE, HKV, DIM, dtype=torch.bfloat16, device="cuda")
    vb = torch.randn_like(kb)
    perm = torch.randperm(pages, device="cuda")
    prefix_slots = (perm[: -(-prefix // PAGE)][:, None] * PAGE + torch.arange(PAGE, device="cuda")).reshape(-1)
    prefix_slots = prefix_slots[:prefix].to(torch.int32)
    kv_indices = prefix_slots.repeat(batch)  # every request reads the one shared prefix
    q = torch.randn(batch * new, HQ, DIM, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch * new, HKV, DIM, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    qo = [i * new for i in range(batch + 1)]
    kv = [i * prefix for i in range(batch + 1)]
    return q, k, v, kb, vb, qo, kv, kv_indices


def timed(fn, reps: int = 5) -> float:
    """Median ms of `reps` CUDA-event-timed calls after one warm-up (msa_kernels' GPU-check timer)."""
    from msa_kernels.triton._topk_gpucheck import time_events

    return time_events(fn, reps, warmup=1) / 1000


def run_case(batch: int, prefix: int, new: int, extend_attention_fwd) -> dict:
    q, k, v, kb, vb, qo, kv, idx = make(batch, prefix, new)
    scale = DIM**-0.5
    qo_dev = torch.tensor(qo, dtype=torch.int32, device="cuda")
    kv_dev = torch.tensor(kv, dtype=torch.int32, device="cuda")
    o_tri, o_fa = torch.empty_like(q), torch.empty_like(q)

    def sglang_triton():
        extend_attention_fwd(q, k, v, o_tri, kb, vb, qo_dev, kv_dev, idx, None, True, None, new, 1.0, 1.0,
                             scale, page_size=PAGE)  # as the backend passes it

    def ours_flash():
        de.paged_extend_attention(q, k, v, kb, vb, qo, kv, idx, scale, o_fa, de.flash_varlen,
                                  de.DEFAULT_TOKEN_BUDGET)

    t_tri, t_fa = timed(sglang_triton), timed(ours_flash)
    err = float((o_fa.float() - o_tri.float()).norm() / o_tri.float().norm())
    pairs = batch * (new * prefix + new * (new + 1) / 2)  # visible (query, key) pairs
    tflop = 4 * DIM * HQ * pairs / 1e12
    return {"requests": batch, "prefix": prefix, "new": new, "sglang_triton_ms": t_tri, "m3serve_fa2_ms": t_fa,
            "speedup": t_tri / t_fa, "sglang_tflops": tflop / t_tri * 1e3, "fa2_tflops": tflop / t_fa * 1e3,
            "rel_diff": err}


def plot(results: Path, out: Path) -> None:
    """Bar chart of both kernels' time per case (headless matplotlib; the GPU bundle does not carry it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    rows = data["rows"]
    labels = [f"B={r['requests']}\n{r['prefix'] // 1000}k + {r['new']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar([i - 0.2 for i in x], [r["sglang_triton_ms"] for r in rows], 0.4, label="SGLang Triton extend")
    ax.bar([i + 0.2 for i in x], [r["m3serve_fa2_ms"] for r in rows], 0.4, label="m3serve FA2 path")
    for i, r in zip(x, rows):
        ax.text(i + 0.2, r["m3serve_fa2_ms"], f"{r['speedup']:.1f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per dense layer")
    ax.set_title(f"M3 dense-layer extend, {data['meta']['card']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", nargs=2, type=Path, metavar=("RESULTS", "PNG"), default=None)
    args = ap.parse_args()
    if args.plot:
        plot(*args.plot)
        return
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    rows = []
    for batch, prefix, new in CASES:
        r = run_case(batch, prefix, new, extend_attention_fwd)
        rows.append(r)
        print(f"B={batch} prefix={prefix} new={new}: SGLang Triton {r['sglang_triton_ms']:.2f} ms "
              f"({r['sglang_tflops']:.0f} TFLOP/s), m3serve FA2 {r['m3serve_fa2_ms']:.2f} ms "
              f"({r['fa2_tflops']:.0f} TFLOP/s), {r['speedup']:.2f}x, rel diff {r['rel_diff']:.1e}", flush=True)
        torch.cuda.empty_cache()
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "heads": [HQ, HKV, DIM],
            "command": "python benchmarks/agentic/gpu/dense_extend_bench.py"}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dense_extend.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
