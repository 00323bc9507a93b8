"""How fast one KV head's rows read out of a paged cache [slots, heads, D], against the same bytes read
contiguously: the memory side of decode attention, without its math.

Why (round 12): fp8 decode attention at batch 32 (64 query / 4 KV heads, 60k) took ~41 us on an H100 whether its
fp8 tiles were widened byte-wise or as words, and the bf16 kernel ~55 us for twice the bytes: time that follows
the number of rows read more than the bytes. In SGLang's layout one head's row of a page is D elements at a
stride of heads x D, so a head reads a quarter of every DRAM page it opens at 4 KV heads. Each program here reads
whole 128-slot pages of one head (random pages, as selections are), summing them as int32 words; the rate is the
useful bytes over the time. Prints a table and writes JSON to --out.

    python3 benchmarks/kernels/strided_read.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "kernels"))
from msa_kernels.triton._topk_gpucheck import time_events  # noqa: E402

PAGE, D = 128, 128


@triton.jit
def _read_pages(x_ptr, pages_ptr, out_ptr, stride_s, heads, PAGE: tl.constexpr, W: tl.constexpr,
                PER: tl.constexpr):
    pid = tl.program_id(0)
    head = pid % heads
    rows = tl.arange(0, PAGE)
    cols = tl.arange(0, W)
    acc = tl.zeros([PAGE, W], tl.int32)
    for i in range(PER):
        page = tl.load(pages_ptr + pid * PER + i).to(tl.int64)
        acc += tl.load(x_ptr + (page * PAGE + rows)[:, None] * stride_s + head * W + cols[None, :])
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc, 1), 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--useful-mib", type=int, default=256, help="bytes read per measurement")
    args = ap.parse_args()
    rows = []
    for elem in (1, 2):  # fp8, bf16
        for heads in (4, 1):
            page_bytes = PAGE * D * elem  # one head's page
            n_pages = args.useful_mib * 2**20 // page_bytes
            pool_pages = 2 * n_pages  # pages drawn from twice as many, so that nothing stays in L2
            x = torch.randint(-2**30, 2**30, (pool_pages * PAGE, heads, D * elem // 4), dtype=torch.int32,
                              device="cuda")
            per = 4
            programs = n_pages // per
            pages = torch.randperm(pool_pages, device="cuda")[: programs * per].to(torch.int32)
            out = torch.empty(programs, dtype=torch.int32, device="cuda")
            launch = _read_pages[(programs,)]
            us = time_events(partial(launch, x, pages, out, x.stride(0), heads, PAGE=PAGE, W=D * elem // 4, PER=per,
                               num_warps=4, num_stages=3), iters=20)
            useful = programs * per * page_bytes
            row = {"dtype": "fp8" if elem == 1 else "bf16", "kv_heads": heads, "row_bytes": D * elem,
                   "row_stride_bytes": heads * D * elem, "useful_MB": useful / 1e6, "us": us,
                   "GB_s": useful / us / 1e3}
            rows.append(row)
            print(f"{row['dtype']:>5} heads {heads}: rows of {row['row_bytes']} B every {row['row_stride_bytes']} B"
                  f"  {us:8.1f} us  {row['GB_s']:7.0f} GB/s", flush=True)
            del x
            torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "strided_read.json").write_text(json.dumps(
        {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
