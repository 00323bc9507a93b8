"""MSA kernel benchmark: upstream SGLang 0.5.23's Triton MSA kernels vs dense SDPA vs ours, one card, one run.

Everything is measured in the same process on the same card:
  1. ceilings: device-to-device copy bandwidth (read + write counted) and the bf16 matmul rate (8192^3);
  2. decode (one sparse layer: index scoring + top-k + attention) inside CUDA graphs, batch x context,
     a shared-prefix batch, and fp8 K/V + fp8 index-K against our bf16;
  3. extend (2,048 new tokens on a cached 60k prefix, batch 1 and 8, random and high-overlap selections)
     and prefill of a 64k prompt, timed eagerly with CUDA events;
  4. correctness spot checks of ours (and upstream) against the pure-PyTorch reference on the same inputs.
Each variant is timed on its own: a variant that fails (missing kernel, compile error, OOM) is reported
with its error and the run goes on. Roofline fractions use the ceilings measured in this run.

Upstream is imported from .baseline/ (see scripts/prepare_gpu_bundle.sh); it is never part of this repo.
Run `python benchmarks/kernels/bench_msa.py --help`; benchmarks/kernels/README.md gives the device command.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]

# M3 attention shapes (perf_anchors.md section 0). MSA_BENCH_HEADS="16/1" (or "8/1") measures the per-GPU split of
# tensor parallelism 4 (or 8) instead: query heads / KV heads. One index head governs each KV head at every split
# (research/upstream_sglang_m3.md, sharding table), and the one index-K head is replicated on every rank.
HQ, HKV = (int(v) for v in os.environ.get("MSA_BENCH_HEADS", "64/4").split("/"))
HEAD_DIM = 128
H_IDX, IDX_DIM = HKV, 128
BLOCK, TOPK = 128, 16
SPARSE_LAYERS = 57  # M3's sparse-attention layers: the decode plan update is shared by all of them
GROUP = HQ // HKV
KV_BYTES_PER_TOKEN = HKV * 2 * HEAD_DIM * 2  # K + V, bf16: 2048 B
IDX_BYTES_PER_TOKEN = IDX_DIM * 2  # one shared bf16 index-K head: 256 B
MiB = 1 << 20
GiB = 1 << 30
DEFAULT_L2_BYTES = 50 * 1000 * 1000


# ----------------------------------------------------------------------------------------------------------
# Cases and roofline math (pure Python: tested on the CPU by tests/kernels/test_bench_harness.py)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeCase:
    batch: int
    context: int  # tokens in the cache per request, the new one included
    shared_prefix: bool = False  # all requests share every full page but their last
    fp8: bool = False

    @property
    def name(self) -> str:
        tag = "shared" if self.shared_prefix else "private"
        return f"decode{'-fp8' if self.fp8 else ''} B={self.batch} N={self.context} {tag}"


@dataclass(frozen=True)
class ExtendCase:
    batch: int
    new_tokens: int
    prefix: int  # cached tokens before the new ones (a multiple of 128 in the agentic case)
    selection: str = "random"  # "random": random data; "overlap": index keys that favour recent blocks
    shared_prefix: bool = True  # requests share the prefix pages (the agentic case)

    @property
    def name(self) -> str:
        kind = "prefill" if self.prefix == 0 else "extend"
        tag = "" if self.batch == 1 or self.prefix == 0 else (" shared" if self.shared_prefix else " private")
        return f"{kind} B={self.batch} new={self.new_tokens} prefix={self.prefix} {self.selection}{tag}"

    @property
    def seq_len(self) -> int:
        return self.prefix + self.new_tokens


def blocks(n: int) -> int:
    return -(-int(n) // BLOCK)


def decode_cases(grid: str) -> list[DecodeCase]:
    """grid: "full" (the issue's grid), "quick" (fits a short device call) or "tiny" (CPU smoke test)."""
    if grid == "tiny":
        return [DecodeCase(1, 1000), DecodeCase(2, 3000), DecodeCase(2, 3000, shared_prefix=True)]
    batches = (1, 8) if grid == "quick" else (1, 8, 32)
    contexts = (8192, 60000) if grid == "quick" else (8192, 60000, 262144, 1 << 20)
    out = [DecodeCase(b, n) for n in contexts for b in batches]
    out.append(DecodeCase(8, 60000, shared_prefix=True))
    return out


def fp8_cases(grid: str, every_context: bool = False) -> list[DecodeCase]:
    """The fp8 target's case (B=32 at 60k), or with every_context the decode grid's private cases in fp8 (what
    does not fit the card is skipped when run)."""
    if grid == "tiny":
        return [DecodeCase(2, 2500, fp8=True)] + ([DecodeCase(1, 9000, fp8=True)] if every_context else [])
    if every_context:
        return [DecodeCase(c.batch, c.context, fp8=True) for c in decode_cases(grid) if not c.shared_prefix]
    return [DecodeCase(8 if grid == "quick" else 32, 60000, fp8=True)]


def extend_cases(grid: str) -> list[ExtendCase]:
    if grid == "tiny":
        return [ExtendCase(2, 200, 1024, "random"), ExtendCase(1, 256, 1024, "overlap")]
    if grid == "quick":
        return [ExtendCase(1, 2048, 59904, "random")]
    return [ExtendCase(b, 2048, 59904, sel) for b in (1, 8) for sel in ("random", "overlap")]


def prefill_cases(grid: str) -> list[ExtendCase]:
    if grid == "tiny":
        return [ExtendCase(1, 700, 0, "random")]
    if grid == "quick":
        return [ExtendCase(1, 16384, 0, "random")]
    # random selections (the stress case: most tiles go to the wide pass) and high-overlap ones (each query's
    # most recent blocks, the shape local attention gives)
    return [ExtendCase(1, 65536, 0, sel) for sel in ("random", "overlap")]


def decode_touched_bytes(batch: int, context: int, shared_prefix: bool = False, fp8: bool = False) -> int:
    """Fewest HBM bytes of one decode layer: every index-K of the context once (once per batch when the
    prefix is shared), plus the selected K/V (16 blocks x 4 KV heads) of each request."""
    elem = 1 if fp8 else 2
    sel = min(context, TOPK * BLOCK)
    kv = HKV * sel * 2 * HEAD_DIM * elem
    idx = context * IDX_DIM * elem
    if shared_prefix:
        private_tail = context - (blocks(context) - 1) * BLOCK
        idx_total = idx + (batch - 1) * private_tail * IDX_DIM * elem
        return idx_total + batch * kv
    return batch * (idx + kv)


def dense_decode_bytes(batch: int, context: int) -> int:
    return batch * context * KV_BYTES_PER_TOKEN


def causal_key_sum(prefix: int, new_tokens: int) -> int:
    """Sum over the new tokens (positions prefix .. prefix+new-1) of the keys each sees (pos + 1)."""
    lo, hi = prefix + 1, prefix + new_tokens
    return (lo + hi) * new_tokens // 2


def index_flops(prefix: int, new_tokens: int, batch: int = 1) -> int:
    """Causal-exact index scoring FLOPs: 4 heads x 128 x 2 per visible key per query."""
    return batch * H_IDX * IDX_DIM * 2 * causal_key_sum(prefix, new_tokens)


def sparse_attn_flops_upper(prefix: int, new_tokens: int, batch: int = 1) -> int:
    """Useful sparse-attention FLOPs with min(pos+1, 2048) keys per query (exact when every selected
    block is full except the local one): 64 heads x 128 x 4 per key."""
    total = 0
    sel = TOPK * BLOCK
    lo, hi = prefix, prefix + new_tokens  # positions lo..hi-1, key counts pos+1
    # keys = pos + 1 while pos + 1 <= sel, then sel
    cut = min(hi, max(lo, sel))  # positions < cut have pos+1 <= sel
    if cut > lo:
        total += causal_key_sum(lo, cut - lo)
    total += max(0, hi - cut) * sel
    return batch * HQ * HEAD_DIM * 4 * total


def sparse_attn_flops_exact(selected: torch.Tensor, q_pos: torch.Tensor) -> int:
    """Useful FLOPs of block-sparse attention: keys each (token, KV group) really attends (its selected
    blocks' tokens at or before the query), x 16 heads x 128 x 4. selected: [T, Hkv, 16]; q_pos: [T]."""
    sel = selected.long()
    pos = q_pos.long().to(sel.device)[:, None, None]
    keys = (pos - sel * BLOCK + 1).clamp(0, BLOCK)
    keys = torch.where(sel < 0, torch.zeros_like(keys), keys)
    return int(keys.sum().item()) * GROUP * HEAD_DIM * 4


def dense_flops(prefix: int, new_tokens: int, batch: int = 1) -> int:
    """Causal dense attention FLOPs (bottom-right causal): 64 heads x 128 x 4 per visible key."""
    return batch * HQ * HEAD_DIM * 4 * causal_key_sum(prefix, new_tokens)


def extend_compulsory_bytes(case: ExtendCase) -> int:
    """Each input read once, each output written once: K/V and index-K of the whole sequence (the
    prefix once when shared), the queries (q and q_idx) and the output."""
    b, s, t = case.batch, case.seq_len, case.new_tokens
    cache_tokens = (case.prefix + b * t) if (case.shared_prefix and b > 1) else b * s
    cache = cache_tokens * (KV_BYTES_PER_TOKEN + IDX_BYTES_PER_TOKEN)
    qo = b * t * (2 * HQ * HEAD_DIM + H_IDX * IDX_DIM) * 2
    return cache + qo


def bound_us(flops: float, nbytes: float, matmul_flops_s: float, copy_bytes_s: float) -> float:
    """Roofline lower bound in microseconds: the larger of FLOPs / matmul rate and bytes / copy rate."""
    return max(flops / matmul_flops_s, nbytes / copy_bytes_s) * 1e6


def rotation_sets(touched_bytes: int, l2_bytes: int = DEFAULT_L2_BYTES, max_sets: int = 32) -> int:
    """Input sets to rotate so that one pass over them touches at least 4x L2 (METHOD.md)."""
    if touched_bytes <= 0:
        return max_sets
    return int(min(max_sets, max(1, math.ceil(4 * l2_bytes / touched_bytes))))


def pool_bytes(batch: int, context: int, shared_prefix: bool = False, fp8: bool = False) -> int:
    """Device bytes of one decode input set's cache (K, V, index-K)."""
    tokens = (context + (batch - 1) * BLOCK) if shared_prefix else batch * context
    per = (KV_BYTES_PER_TOKEN + IDX_BYTES_PER_TOKEN) // (2 if fp8 else 1)
    return (tokens + 2 * BLOCK) * per


# ----------------------------------------------------------------------------------------------------------
# Inputs in SGLang's paged pool layout
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    page_table: torch.Tensor  # int32 [B, max_pages]
    seq_lens: torch.Tensor  # int32 [B]
    q_lens: torch.Tensor  # int32 [B]
    k_cache: torch.Tensor  # [slots, 4, 128]
    v_cache: torch.Tensor
    idx_k_cache: torch.Tensor  # [slots, 1, 128]
    q: torch.Tensor  # [T, 64, 128]
    q_idx: torch.Tensor  # [T, 4, 128]
    req_to_token: torch.Tensor  # int32 [B, max_pages * 128] (upstream's slot map)
    slot_ids: torch.Tensor  # int64 [B]
    cu_seqlens: torch.Tensor  # int32 [B+1] over new tokens
    prefix_lens: torch.Tensor  # int32 [B]
    q_pos: torch.Tensor  # int64 [T]
    k_scale: float | None = None
    v_scale: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def make_page_table(seq_lens: list[int], shared_prefix: bool, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Random, non-contiguous page ids (page 0 left unused, as in SGLang's pool). With shared_prefix every
    request maps its full pages but the last to the same pages. Returns (int32 [B, max_pages], pool pages)."""
    b = len(seq_lens)
    need = [blocks(s) for s in seq_lens]
    max_pages = max(need)
    if shared_prefix and b > 1:
        shared = min(need) - 1
        total = shared + sum(n - shared for n in need)
    else:
        shared = 0
        total = sum(need)
    perm = (torch.randperm(total, generator=gen) + 1).to(torch.int32)
    table = torch.zeros(b, max_pages, dtype=torch.int32)
    cursor = shared
    for r in range(b):
        table[r, :shared] = perm[:shared]
        own = need[r] - shared
        table[r, shared : need[r]] = perm[cursor : cursor + own]
        cursor += own
    return table, total + 1


def slot_positions(page_table: torch.Tensor, seq_lens: list[int], num_pages: int) -> torch.Tensor:
    """Position held by every slot of the pool (-1 where no request maps it): int64 [num_pages * 128]."""
    pos = torch.full((num_pages * BLOCK,), -1, dtype=torch.int64)
    for r, s in enumerate(seq_lens):
        p = torch.arange(s)
        slots = page_table[r, :blocks(s)].long().repeat_interleave(BLOCK)[:s] * BLOCK + p % BLOCK
        pos[slots] = p
    return pos


def build_inputs(seq_lens: list[int], q_lens: list[int], shared_prefix: bool, device: str, seed: int,
                 selection: str = "random", dtype: torch.dtype = torch.bfloat16) -> Inputs:
    """Random bf16 caches and queries for one batch in the paged pool layout. selection="overlap" adds a
    per-block ramp to index-K so that every query prefers its most recent blocks (neighbouring queries then
    select nearly the same blocks)."""
    gen = torch.Generator().manual_seed(seed)
    table, num_pages = make_page_table(seq_lens, shared_prefix, gen)
    slots = num_pages * BLOCK
    dgen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=dgen, device=device, dtype=dtype)
        return t.mul_(scale) if scale != 1.0 else t

    k_cache = rnd(slots, HKV, HEAD_DIM)
    v_cache = rnd(slots, HKV, HEAD_DIM)
    t_count = sum(q_lens)
    q = rnd(t_count, HQ, HEAD_DIM)
    if selection == "overlap":
        idx_k = rnd(slots, 1, IDX_DIM, scale=0.01)
        pos = slot_positions(table, seq_lens, num_pages).to(device)
        ramp = torch.where(pos >= 0, pos // BLOCK, torch.zeros_like(pos)).to(dtype)
        idx_k[:, 0, 0] = ramp
        q_idx = rnd(t_count, H_IDX, IDX_DIM, scale=0.01)
        q_idx[..., 0] = 1.0
    else:
        idx_k = rnd(slots, 1, IDX_DIM)
        q_idx = rnd(t_count, H_IDX, IDX_DIM)
    b = len(seq_lens)
    max_pages = table.shape[1]
    tok = torch.arange(max_pages * BLOCK)
    req_to_token = (table.long().repeat_interleave(BLOCK, dim=1) * BLOCK + tok % BLOCK).to(torch.int32)
    cu = torch.zeros(b + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    q_pos = torch.cat([torch.arange(s - n, s) for s, n in zip(seq_lens, q_lens)])
    return Inputs(
        page_table=table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        q_lens=torch.tensor(q_lens, dtype=torch.int32, device=device),
        k_cache=k_cache,
        v_cache=v_cache,
        idx_k_cache=idx_k,
        q=q,
        q_idx=q_idx,
        req_to_token=req_to_token.to(device),
        slot_ids=torch.arange(b, dtype=torch.int64, device=device),
        cu_seqlens=cu.to(device),
        prefix_lens=torch.tensor([s - n for s, n in zip(seq_lens, q_lens)], dtype=torch.int32, device=device),
        q_pos=q_pos.to(device),
    )


def to_fp8(inp: Inputs) -> Inputs:
    """fp8 (e4m3) copies of the caches: K/V hold value / scale (per-tensor scale), index-K holds the value."""
    f8 = torch.float8_e4m3fn
    ks = float(inp.k_cache.float().abs().amax().item()) / 448.0
    vs = float(inp.v_cache.float().abs().amax().item()) / 448.0
    return Inputs(
        **{**{k: getattr(inp, k) for k in ("page_table", "seq_lens", "q_lens", "q", "q_idx", "req_to_token",
                                             "slot_ids", "cu_seqlens", "prefix_lens", "q_pos")},
           "k_cache": (inp.k_cache.float() / ks).to(f8),
           "v_cache": (inp.v_cache.float() / vs).to(f8),
           "idx_k_cache": inp.idx_k_cache.to(f8),
           "k_scale": ks, "v_scale": vs})


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def _fail(exc: BaseException) -> dict:
    raise exc


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# GPU work queued ahead of each eager sample's start event (torch.cuda._sleep cycles, ~300 us at 1.98 GHz): the host
# enqueues the timed op while the GPU is still busy, so the sample measures the op's device time and the gaps
# between its kernels, not the host's latency to its first launch. In serving, sparse layers run back to back and
# that latency is hidden the same way. Every eager arm (upstream, ours, dense) is timed alike; the earlier
# method (GPU idle at the start event) is still reported as `us_cold`.
HEAD_START_CYCLES = 600_000


def time_eager(fn: Callable[[], Any], device: str, reps: int = 5, warmup: int = 1, budget_s: float = 20.0) -> dict:
    """Median per-call time (us) of eager calls: CUDA events on GPU (after a GPU head start, see
    HEAD_START_CYCLES; `us_cold` without it), perf_counter on CPU. The first call (compile, autotune) is
    excluded; repetitions stop early once `budget_s` is spent."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: list[float] = []
    cold: list[float] = []
    start_all = time.perf_counter()
    for _ in range(reps):
        if device.startswith("cuda"):
            for head_start, into in ((True, samples), (False, cold)):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if head_start:
                    torch.cuda._sleep(HEAD_START_CYCLES)
                e0.record()
                fn()
                e1.record()
                e1.synchronize()
                into.append(e0.elapsed_time(e1) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e6)
        if time.perf_counter() - start_all > budget_s and len(samples) >= 2:
            break
    out = {"us": statistics.median(samples), "samples": len(samples), "spread_us": max(samples) - min(samples),
           "first_call_s": first_s, "timing": "eager, host"}
    if cold:
        out["us_cold"] = statistics.median(cold)
        out["timing"] = f"eager, CUDA events, GPU head start (cold host start: {out['us_cold']:.1f})"
    return out


def time_graph(fns: list[Callable[[], Any]], device: str, replays: int = 15, min_calls: int = 16,
               target_us: float = 3000.0, max_total_s: float = 3.0) -> dict:
    """Median per-call time (us) of CUDA-graph replays. `fns` holds one call per rotated input set; the graph
    runs them in turn, at least once each, and up to `min_calls` calls while one replay stays near
    `target_us` (slow variants get fewer calls per graph and fewer replays, never under 5)."""
    if not device.startswith("cuda"):
        r = time_eager(lambda: [f() for f in fns], device, reps=3)
        return {**r, "us": r["us"] / len(fns), "timing": "eager, host (no CUDA)"}
    t0 = time.perf_counter()
    for f in fns:
        f()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for f in fns:
            f()
        e1.record()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    est_us = max(1.0, e0.elapsed_time(e1) * 1e3 / len(fns))  # eager estimate (host-bound for small calls)
    want_calls = max(len(fns), min(min_calls, int(target_us / est_us)))
    rounds = max(1, math.ceil(want_calls / len(fns)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for f in fns:
                f()
    calls = rounds * len(fns)
    graph.replay()
    torch.cuda.synchronize()
    samples: list[float] = []
    start = time.perf_counter()
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        samples.append(e0.elapsed_time(e1) * 1e3 / calls)
        if len(samples) >= 5 and time.perf_counter() - start > max_total_s:
            break
    del graph
    return {"us": statistics.median(samples), "samples": len(samples), "spread_us": max(samples) - min(samples),
            "first_call_s": first_s, "calls_per_graph": calls, "sets": len(fns), "timing": "CUDA graph replay"}


def time_graph_or_eager(fns: list[Callable[[], Any]], device: str) -> dict:
    """CUDA-graph timing; when capture fails (host syncs in the op), eager timing with the reason noted."""
    try:
        return time_graph(fns, device)
    except Exception as e:  # noqa: BLE001
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        r = time_eager(lambda: [f() for f in fns], device, reps=10)
        msg = str(e).strip().splitlines()
        return {**r, "us": r["us"] / len(fns), "sets": len(fns), "timing": "eager, CUDA events (NO graph)",
                "note": f"graph capture failed: {type(e).__name__}: {msg[-1][:160] if msg else ''}"}


def random_selection(q_pos: torch.Tensor, heads: int = HKV, seed: int = 0) -> torch.Tensor:
    """A valid selection without the reference: the local block plus 15 random earlier blocks (all of them
    when at most 16 are visible), ascending, -1 padded. [T, heads, 16] int32."""
    t = q_pos.shape[0]
    local = (q_pos.long() // BLOCK)
    nb = int(local.max().item()) + 1
    gen = torch.Generator(device=q_pos.device).manual_seed(seed)
    r = torch.rand(t, heads, nb, generator=gen, device=q_pos.device)
    hist = torch.arange(nb, device=q_pos.device)[None, :] < local[:, None]
    r = r.masked_fill(~hist[:, None, :], -1.0)
    k = min(TOPK - 1, nb)
    val, idx = r.topk(k, dim=-1)
    idx = idx.masked_fill(val < 0, -1)
    sel = torch.cat([idx, local[:, None, None].expand(t, heads, 1)], dim=-1)
    if sel.shape[-1] < TOPK:
        sel = torch.cat([sel, sel.new_full((t, heads, TOPK - sel.shape[-1]), -1)], dim=-1)
    key = torch.where(sel < 0, torch.full_like(sel, 1 << 40), sel)
    sel = key.sort(-1).values
    return torch.where(sel >= (1 << 40), torch.full_like(sel, -1), sel).to(torch.int32)


# ----------------------------------------------------------------------------------------------------------
# The variants: upstream, dense, ours
# ----------------------------------------------------------------------------------------------------------


class Upstream:
    """Upstream SGLang 0.5.23's Triton MSA kernels, imported from .baseline/sglang_min (never committed)."""

    def __init__(self, baseline_dir: Path, use_radix: bool):
        self.error: str | None = None
        self.topk_impl = "n/a"
        self.mods: dict[str, Any] = {}
        if not use_radix:
            os.environ["SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX"] = "0"
        os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
        for p in (baseline_dir / "site", baseline_dir / "sglang_min"):
            if p.is_dir() and str(p) not in sys.path:
                sys.path.insert(0, str(p))
        try:
            base = "sglang.kernels.ops.attention.minimax_sparse"
            import importlib

            for key, mod in (("dec_idx", "decode.flash_with_topk_idx"), ("dec_attn", "decode.topk_sparse"),
                             ("pre_idx", "prefill.flash_with_topk_idx"), ("pre_attn", "prefill.topk_sparse"),
                             ("utils", "common.utils")):
                self.mods[key] = importlib.import_module(f"{base}.{mod}")
            import sglang

            if "sglang_min" not in str(Path(sglang.__file__)):
                self.error = f"sglang imported from {sglang.__file__}, not from the baseline folder"
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            self.error = f"{type(e).__name__}: {e}"
        self.topk_impl = ("CUDA radix (JIT from the wheel's source)" if use_radix
                          else "Triton 2-stage fallback (SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX=0)")

    def warm_radix(self) -> None:
        """Build the radix top-k once; on failure fall back to upstream's Triton top-k and say so."""
        if self.error or os.environ.get("SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX") == "0":
            return
        try:
            from sglang.kernels.ops.attention.minimax_decode_topk import minimax_decode_topk

            t0 = time.perf_counter()
            score = torch.randn(H_IDX, 2, 64, device="cuda")
            seq = torch.tensor([64 * BLOCK, 40 * BLOCK], dtype=torch.int32, device="cuda")
            out = minimax_decode_topk(score, seq, BLOCK, TOPK)
            torch.cuda.synchronize()
            want = torch.topk(score[:, 0], TOPK, dim=-1).indices.sort(-1).values
            if not torch.equal(out[:, 0].long().sort(-1).values, want):
                raise RuntimeError("radix top-k disagrees with torch.topk")
            self.topk_impl = f"CUDA radix (JIT from the wheel's source, built in {time.perf_counter() - t0:.0f} s)"
        except Exception as e:  # noqa: BLE001
            os.environ["SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX"] = "0"
            self.topk_impl = (f"Triton 2-stage fallback (radix build failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''})")

    def reset_autotune(self) -> None:
        """Forget autotuned configs so each shape gets its own best config (upstream's keys ignore length)."""
        try:
            from triton.runtime.autotuner import Autotuner
        except Exception:  # noqa: BLE001
            return
        for mod in self.mods.values():
            for obj in vars(mod).values():
                if isinstance(obj, Autotuner):
                    obj.cache = {}

    def decode_index(self, inp: Inputs, max_seqlen: int) -> torch.Tensor:
        fn = self.mods["dec_idx"].flash_decode_with_topk_idx
        _, topk_idx, _ = fn(inp.q_idx, None, inp.idx_k_cache, inp.idx_k_cache, inp.req_to_token, inp.seq_lens,
                            max_seqlen, inp.slot_ids, BLOCK, TOPK, 0, 1, disable_index_value=True,
                            page_size=BLOCK)
        return topk_idx  # [H_idx, B, 16]

    def decode_attn(self, inp: Inputs, topk_idx: torch.Tensor) -> torch.Tensor:
        fn = self.mods["dec_attn"].flash_decode_with_gqa_share_sparse
        return fn(inp.q, None, inp.k_cache, inp.v_cache, inp.req_to_token, inp.seq_lens, inp.slot_ids, BLOCK,
                  topk_idx, page_size=BLOCK, k_scale=inp.k_scale, v_scale=inp.v_scale)

    def extend_index(self, inp: Inputs, max_q: int, max_k: int) -> torch.Tensor:
        fn = self.mods["pre_idx"].flash_prefill_with_topk_index
        _, topk_idx = fn(inp.q_idx, inp.idx_k_cache, inp.idx_k_cache, None, inp.req_to_token, inp.slot_ids,
                         inp.cu_seqlens, inp.seq_lens, inp.prefix_lens, max_q, max_k, 1, BLOCK, TOPK, 0, 1,
                         disable_index_value=True, page_size=BLOCK)
        return topk_idx  # [H_idx, T, 16]

    def extend_attn(self, inp: Inputs, topk_idx: torch.Tensor, max_q: int) -> torch.Tensor:
        fn = self.mods["pre_attn"].flash_prefill_with_gqa_share_sparse
        return fn(inp.q, inp.k_cache, inp.v_cache, None, inp.req_to_token, inp.slot_ids, topk_idx, 1, BLOCK,
                  inp.cu_seqlens, inp.seq_lens, inp.prefix_lens, max_q, k_scale=inp.k_scale, v_scale=inp.v_scale)


class Ours:
    """msa_kernels.ops (Triton on CUDA; the reference where Triton cannot run)."""

    def __init__(self) -> None:
        if str(ROOT / "kernels") not in sys.path:
            sys.path.insert(0, str(ROOT / "kernels"))
        self.error: str | None = None
        try:
            import msa_kernels
            from msa_kernels import ops, reference, testing

            self.msa, self.ops, self.ref, self.testing = msa_kernels, ops, reference, testing
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"

    def plan(self, inp: Inputs):
        return self.msa.plan(inp.page_table, inp.seq_lens, inp.q_lens)

    def index(self, plan, inp: Inputs, backend: str = "auto") -> torch.Tensor:
        return self.ops.index_topk(plan, inp.q_idx, inp.idx_k_cache, backend=backend)  # [T, H_idx, 16]

    def attn(self, plan, inp: Inputs, sel: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return self.ops.sparse_attention(plan, inp.q, inp.k_cache, inp.v_cache, sel, None, inp.k_scale,
                                         inp.v_scale, backend=backend)


def gather_dense(inp: Inputs, seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each request's K and V in sequence order, [B, S, Hkv, D] (zero padded past its length)."""
    b, s = len(seq_lens), max(seq_lens)
    k = torch.zeros(b, s, HKV, HEAD_DIM, dtype=inp.k_cache.dtype, device=inp.k_cache.device)
    v = torch.zeros_like(k)
    for r, n in enumerate(seq_lens):
        slots = inp.req_to_token[r, :n].long()
        k[r, :n] = inp.k_cache[slots]
        v[r, :n] = inp.v_cache[slots]
    return k, v


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH}[name]


def dense_decode_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> Callable[[], torch.Tensor]:
    """Dense decode over the whole context: each KV group's 16 query heads folded into the query length
    (exact for one query token). q: [B, 64, D]; k, v: [B, S, Hkv, D]."""
    from torch.nn.attention import sdpa_kernel

    b = q.shape[0]
    qf = q.view(b, HKV, GROUP, HEAD_DIM)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    be = _sdpa_backend(backend)

    def run() -> torch.Tensor:
        with sdpa_kernel([be]):
            return torch.nn.functional.scaled_dot_product_attention(qf, kt, vt)

    return run


def dense_causal_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, backend: str,
                    two_part: bool = False) -> Callable[[], torch.Tensor]:
    """Dense causal attention of L new tokens over prefix + new keys, bottom-right aligned.
    q: [B, L, 64, D]; k, v: [B, S, Hkv, D] with S = prefix + L. Returns a closure giving [B, 64, L, D].

    prefix == 0: one SDPA call (is_causal, L == S, GQA K/V). prefix > 0, flash backend: the aten flash op
    (FlashAttention-2's causal mask is bottom-right) on GQA K/V. Otherwise (cuDNN, or two_part): two exact
    calls - every head's queries folded over the prefix keys (no mask; the 16 heads of a group share K/V),
    and the new keys causally (their K/V expanded to 64 heads) - merged by log-sum-exp."""
    from torch.nn.attention import sdpa_kernel

    b, seq_len = q.shape[0], q.shape[1]
    qt = q.transpose(1, 2)  # [B, 64, L, D]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, 4, S, D]
    be = _sdpa_backend(backend)
    scale = HEAD_DIM**-0.5
    if prefix == 0:
        def run0() -> torch.Tensor:
            with sdpa_kernel([be]):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        return run0
    if backend == "flash" and not two_part:
        def run_fa() -> torch.Tensor:
            return torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, True, False, scale=scale)[0]
        return run_fa
    qfold = q.view(b, seq_len, HKV, GROUP, HEAD_DIM).permute(0, 2, 3, 1, 4).reshape(b, HKV, GROUP * seq_len, HEAD_DIM)
    kp, vp = kt[:, :, :prefix], vt[:, :, :prefix]
    kn = kt[:, :, prefix:].repeat_interleave(GROUP, dim=1)
    vn = vt[:, :, prefix:].repeat_interleave(GROUP, dim=1)
    qtc = qt.contiguous()

    def attn(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if backend == "cudnn":
            r = torch.ops.aten._scaled_dot_product_cudnn_attention(qq, kk, vv, None, True, 0.0, causal, False,
                                                                    scale=scale)
        else:
            r = torch.ops.aten._scaled_dot_product_flash_attention(qq, kk, vv, 0.0, causal, False, scale=scale)
        return r[0], r[1]

    def run_two() -> torch.Tensor:
        oa, la = attn(qfold, kp, vp, False)
        ob, lb = attn(qtc, kn, vn, True)
        oa = oa.reshape(b, HKV, GROUP, seq_len, HEAD_DIM).reshape(b, HQ, seq_len, HEAD_DIM)
        la = la.reshape(b, HKV, GROUP, -1)[..., :seq_len].reshape(b, HQ, seq_len).float()
        lb = lb.reshape(b, HQ, -1)[..., :seq_len].float()
        m = torch.maximum(la, lb)
        wa, wb = torch.exp(la - m), torch.exp(lb - m)
        return ((oa.float() * wa[..., None] + ob.float() * wb[..., None]) / (wa + wb)[..., None]).to(q.dtype)

    return run_two


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    g, w = got.double(), want.double()
    if not torch.isfinite(g).all():
        return float("nan")
    return float((g - w).norm() / w.norm().clamp_min(1e-30))


def selection_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean fraction of shared block ids per (token, head) row of two [T, H, 16] selections (-1 ignored)."""
    a, b = a.long(), b.long()
    nb = int(max(a.max().item(), b.max().item())) + 2
    ma = torch.zeros(*a.shape[:2], nb, dtype=torch.bool, device=a.device)
    mb = torch.zeros_like(ma)
    ma.scatter_(-1, a.masked_fill(a < 0, nb - 1), True)
    mb.scatter_(-1, b.masked_fill(b < 0, nb - 1), True)
    ma, mb = ma[..., : nb - 1], mb[..., : nb - 1]
    inter = (ma & mb).sum(-1).float()
    size = torch.maximum(ma.sum(-1), mb.sum(-1)).clamp_min(1).float()
    return float((inter / size).mean())


def distinct_blocks_per_tile(sel: torch.Tensor, tile: int = 128, max_tiles: int = 32) -> float:
    """Average number of distinct blocks a 128-query tile (per KV head) selects, over up to `max_tiles`
    tiles spread evenly over the tokens: 16 = every query of the tile selects the same blocks."""
    t, h, _ = sel.shape
    starts = list(range(0, t, tile))
    if len(starts) > max_tiles:
        starts = [starts[round(i * (len(starts) - 1) / (max_tiles - 1))] for i in range(max_tiles)]
    counts = []
    for lo in starts:
        chunk = sel[lo : lo + tile].permute(1, 0, 2).reshape(h, -1)
        for r in range(h):
            u = torch.unique(chunk[r])
            counts.append(int((u >= 0).sum()))
    return float(statistics.mean(counts)) if counts else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = args.device
        self.grid = "tiny" if args.tiny else ("quick" if args.quick else "full")
        self.rows: list[dict] = []
        self.checks: list[dict] = []
        self.notes: list[str] = []
        self.ceil = {"copy_bytes_s": 3.0e12, "matmul_flops_s": 740e12, "measured": False}
        self.l2 = DEFAULT_L2_BYTES
        if self.device.startswith("cuda"):
            self.l2 = int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", DEFAULT_L2_BYTES))
        self.ours = Ours()
        self.up = None
        if not args.no_upstream and self.device.startswith("cuda"):
            self.up = Upstream(Path(args.baseline), use_radix=not args.triton_topk)

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def record(self, section: str, case: str, variant: str, fn: Callable[[], dict], **extra: Any) -> dict:
        row: dict[str, Any] = {"section": section, "case": case, "variant": variant, **extra}
        try:
            row.update(fn())
            row["ok"] = True
        except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
            row["ok"] = False
            msg = str(e).strip().splitlines()
            row["error"] = f"{type(e).__name__}: {msg[-1][:300] if msg else ''}"
            if self.args.verbose:
                traceback.print_exc()
            if self.device.startswith("cuda"):
                try:
                    torch.cuda.synchronize()
                except Exception as e2:  # noqa: BLE001
                    row["error"] += f" (then the device failed: {type(e2).__name__})"
                torch.cuda.empty_cache()
        us = row.get("us")
        if not row["ok"]:
            shown = "  FAILED  " + row.get("error", "")
        elif us is not None:
            shown = f"{us:10.1f} us" + (f"  ({row['note']})" if row.get("note") else "")
        else:
            shown = json.dumps({k: row[k] for k in ("agreement",) if k in row})
        print(f"  {case:<48} {variant:<22} {shown}", flush=True)
        self.rows.append(row)
        return row

    def free_bytes(self) -> int:
        if not self.device.startswith("cuda"):
            return 1 << 62
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]

    # -- ceilings -------------------------------------------------------------------------------------------
    def ceilings(self) -> None:
        print("== ceilings", flush=True)
        if not self.device.startswith("cuda"):
            self.notes.append("no CUDA device: ceilings are datasheet-like placeholders, timings are host times")
            return
        n = (2 * GiB) if self.grid == "full" else (512 * MiB)
        a = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        r = time_eager(lambda: b.copy_(a), self.device, reps=20)
        copy = 2 * n / (r["us"] * 1e-6)
        m = 8192
        x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
        r2 = time_eager(lambda: x @ y, self.device, reps=20)
        mm = 2 * m**3 / (r2["us"] * 1e-6)
        torch.cuda.empty_cache()
        self.ceil = {"copy_bytes_s": copy, "matmul_flops_s": mm, "measured": True,
                     "copy_desc": f"D2D copy {n / GiB:g} GiB -> {n / GiB:g} GiB, read+write counted, median of 20",
                     "matmul_desc": "bf16 torch.matmul 8192^3 on random data, median of 20"}
        print(f"  copy {copy / 1e12:.2f} TB/s   matmul {mm / 1e12:.0f} TFLOP/s   L2 {self.l2 / 1e6:.0f} MB", flush=True)

    def lb(self, flops: float, nbytes: float) -> float:
        return bound_us(flops, nbytes, self.ceil["matmul_flops_s"], self.ceil["copy_bytes_s"])

    # -- decode ---------------------------------------------------------------------------------------------
    def decode_case(self, case: DecodeCase) -> None:
        b, n = case.batch, case.context
        seq_lens = [n] * b
        touched = decode_touched_bytes(b, n, case.shared_prefix)
        sets = rotation_sets(touched, self.l2) if self.device.startswith("cuda") else 1
        per_set = pool_bytes(b, n, case.shared_prefix) + b * HQ * HEAD_DIM * 4
        dense_extra = dense_decode_bytes(b, n) + 4 * GiB
        free = self.free_bytes()
        while sets > 1 and sets * per_set > 0.5 * free:
            sets //= 2
        if per_set > 0.85 * free:
            self.record("decode", case.name, "all", lambda: _fail(
                MemoryError(f"needs {per_set / GiB:.1f} GiB, {free / GiB:.1f} GiB free: skipped")))
            return
        lb_us = touched / self.ceil["copy_bytes_s"] * 1e6
        meta = {"batch": b, "context": n, "shared_prefix": case.shared_prefix, "lb_us": lb_us, "sets": sets,
                "bytes_lb": touched}
        inps = [build_inputs(seq_lens, [1] * b, case.shared_prefix, self.device, seed=1000 + i) for i in range(sets)]
        print(f"== {case.name}: LB {lb_us:.1f} us, {sets} input set(s)", flush=True)
        ref_sel = [self._ref_decode_selection(x) for x in inps]
        up_sel = [s.permute(1, 0, 2).contiguous() for s in ref_sel]  # upstream's [Hkv, B, 16]
        up = self.up
        if up is not None and up.error is None:
            self.record("decode", case.name, "upstream idx", lambda: time_graph(
                [lambda x=x: up.decode_index(x, n) for x in inps], self.device), **meta)
            self.record("decode", case.name, "upstream attn", lambda: time_graph(
                [lambda x=x, s=s: up.decode_attn(x, s) for x, s in zip(inps, up_sel)], self.device), **meta)
            self.record("decode", case.name, "upstream layer", lambda: time_graph(
                [lambda x=x: up.decode_attn(x, up.decode_index(x, n)) for x in inps], self.device), **meta)
            self._check_selection("decode", case.name, "upstream", lambda: up.decode_index(inps[0], n).permute(1, 0, 2),
                                  inps[0], ref_sel[0])
            self._check_attention("decode", case.name, "upstream", lambda: up.decode_attn(inps[0], up_sel[0]), inps[0],
                                  ref_sel[0], rows=4)
        elif up is not None:
            self.record("decode", case.name, "upstream layer", lambda: _fail(RuntimeError(up.error)))
        self._ours_decode(case.name, inps, ref_sel, meta)
        self._ours_decode_graph_plan(case.name, inps, ref_sel, meta)
        if not self.args.no_dense:
            if dense_extra > 0.85 * self.free_bytes():
                self.record("decode", case.name, "dense", lambda: _fail(
                    MemoryError("dense K/V copy does not fit: skipped")), **meta)
            else:
                k, v = gather_dense(inps[0], seq_lens)
                dmeta = {**meta, "lb_us": dense_decode_bytes(b, n) / self.ceil["copy_bytes_s"] * 1e6,
                         "bytes_lb": dense_decode_bytes(b, n), "sets": 1}
                for be in ("flash", "cudnn"):
                    self.record("decode", case.name, f"dense {be}", lambda be=be: time_graph_or_eager(
                        [dense_decode_fn(inps[0].q, k, v, be)], self.device), **dmeta)
                del k, v
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _ours_decode(self, name: str, inps: list[Inputs], ref_sel: list[torch.Tensor], meta: dict,
                     label: str = "ours") -> None:
        o = self.ours
        if o.error:
            self.record("decode", name, f"{label} layer", lambda: _fail(RuntimeError(o.error)), **meta)
            return
        plans: list[Any] = []
        try:
            plans = [o.plan(x) for x in inps]
        except Exception as e:  # noqa: BLE001
            self.record("decode", name, f"{label} layer", lambda e=e: _fail(e), **meta)
            return
        self.record("decode", name, f"{label} idx", lambda: time_graph_or_eager(
            [lambda x=x, p=p: o.index(p, x) for x, p in zip(inps, plans)], self.device), **meta)
        self.record("decode", name, f"{label} attn", lambda: time_graph_or_eager(
            [lambda x=x, p=p, s=s: o.attn(p, x, s) for x, p, s in zip(inps, plans, ref_sel)], self.device), **meta)
        self.record("decode", name, f"{label} layer", lambda: time_graph_or_eager(
            [lambda x=x, p=p: o.attn(p, x, o.index(p, x)) for x, p in zip(inps, plans)], self.device), **meta)
        self._check_selection("decode", name, label, lambda: o.index(plans[0], inps[0]), inps[0], ref_sel[0])
        self._check_attention("decode", name, label, lambda: o.attn(plans[0], inps[0], ref_sel[0]), inps[0],
                              ref_sel[0], rows=4)

    def _ours_decode_graph_plan(self, name: str, inps: list[Inputs], ref_sel: list[torch.Tensor], meta: dict) -> None:
        """The serving path of decode in CUDA graphs (m3serve's plugin): a graph plan sized for a 128k-token
        context (or the case's, when longer), top-k items computed in the kernel (no shared-page packing).
        The plugin updates the plan once per decode step (one launch) and every sparse layer reads it, so the
        update is timed on its own and charged 1/SPARSE_LAYERS per layer in the summary."""
        o, label = self.ours, "ours graph-plan"
        if o.error or not self.device.startswith("cuda"):
            return
        from msa_kernels.triton.index_topk import prepare_graph_decode_topk

        layers, updates, plans = [], [], []
        try:
            for x in inps:
                p = o.plan(x)
                gp = o.msa.graph_decode_plan(p.batch_size, max(1024, p.page_table.shape[1]), self.device)
                prepare_graph_decode_topk(gp, x.q_idx.shape[1], x.idx_k_cache.shape[0] // 128)
                rows = torch.arange(p.batch_size, device=self.device)
                o.msa.update_graph_decode_plan_from_slots(gp, x.req_to_token, rows, p.seq_lens)
                plans.append(gp)
                updates.append(lambda x=x, p=p, gp=gp, rows=rows: o.msa.update_graph_decode_plan_from_slots(
                    gp, x.req_to_token, rows, p.seq_lens))
                layers.append(lambda x=x, gp=gp: o.attn(gp, x, o.index(gp, x)))
        except Exception as e:  # noqa: BLE001
            self.record("decode", name, f"{label} layer", lambda e=e: _fail(e), **meta)
            return
        self.record("decode", name, f"{label} update", lambda: time_graph_or_eager(updates, self.device), **meta)
        self.record("decode", name, f"{label} layer", lambda: time_graph_or_eager(layers, self.device), **meta)
        self._check_selection("decode", name, label, lambda: o.index(plans[0], inps[0]), inps[0], ref_sel[0])

    def _ref_decode_selection(self, inp: Inputs) -> torch.Tensor:
        """Reference selection [B, H, 16] (float32 scores of the (dequantized) cache); a random valid one when
        the reference cannot run (then noted)."""
        try:
            if self.ours.error:
                raise RuntimeError(self.ours.error)
            p = self.ours.plan(inp)
            return self.ours.ref.index_topk(p, inp.q_idx, inp.idx_k_cache)
        except Exception as e:  # noqa: BLE001
            note = f"reference selection unavailable ({type(e).__name__}): attention timed on random selections"
            if note not in self.notes:
                self.notes.append(note)
            return random_selection(inp.q_pos)

    # -- fp8 decode -----------------------------------------------------------------------------------------
    def fp8_case(self, case: DecodeCase) -> None:
        b, n = case.batch, case.context
        need = pool_bytes(b, n) * 1.6
        if need > 0.85 * self.free_bytes():
            self.record("fp8", case.name, "all", lambda: _fail(MemoryError("does not fit: skipped")))
            return
        bf = build_inputs([n] * b, [1] * b, False, self.device, seed=77)
        f8 = to_fp8(bf)
        meta = {"batch": b, "context": n, "lb_us": decode_touched_bytes(b, n, fp8=True) / self.ceil["copy_bytes_s"] * 1e6,
                "bytes_lb": decode_touched_bytes(b, n, fp8=True), "sets": 1}
        print(f"== {case.name}: fp8 LB {meta['lb_us']:.1f} us (bf16 LB "
              f"{decode_touched_bytes(b, n) / self.ceil['copy_bytes_s'] * 1e6:.1f} us)", flush=True)
        ref_bf = self._ref_decode_selection(bf)
        ref_f8 = self._ref_decode_selection(f8)
        self.checks.append({"section": "fp8", "case": case.name, "variant": "reference",
                            "what": "selection agreement fp8 index-K vs bf16 (reference scorer; reported, not judged)",
                            "agreement": selection_agreement(ref_f8, ref_bf), "ok": True})
        bmeta = {**meta, "lb_us": decode_touched_bytes(b, n) / self.ceil["copy_bytes_s"] * 1e6,
                 "bytes_lb": decode_touched_bytes(b, n)}
        self._ours_decode(case.name, [bf], [ref_bf], bmeta, label="ours bf16")
        self._ours_decode(case.name, [f8], [ref_f8], meta, label="ours fp8")
        o = self.ours
        if not o.error:
            def agree() -> dict:
                p = o.plan(bf)
                a = o.index(p, f8)
                c = o.index(p, bf)
                v = selection_agreement(a, c)
                self.checks.append({"section": "fp8", "case": case.name, "variant": "ours",
                                    "what": "selection agreement fp8 index-K vs bf16 (ours; reported, not judged)",
                                    "agreement": v, "ok": True})
                return {"agreement": v}
            self.record("fp8", case.name, "ours fp8 agreement", agree)
        up = self.up
        if up is not None and up.error is None:
            self.record("decode", case.name, "upstream bf16 layer", lambda: time_graph(
                [lambda: up.decode_attn(bf, up.decode_index(bf, n))], self.device), **bmeta)
            self.record("decode", case.name, "upstream fp8 layer", lambda: time_graph(
                [lambda: up.decode_attn(f8, up.decode_index(f8, n))], self.device), **meta)

    # -- extend / prefill -----------------------------------------------------------------------------------
    def extend_case(self, case: ExtendCase, section: str) -> None:
        b, t, pre = case.batch, case.new_tokens, case.prefix
        seq_lens, q_lens = [case.seq_len] * b, [t] * b
        inp = build_inputs(seq_lens, q_lens, case.shared_prefix, self.device, seed=5, selection=case.selection)
        f_idx = index_flops(pre, t, b)
        f_attn_upper = sparse_attn_flops_upper(pre, t, b)
        nbytes = extend_compulsory_bytes(case)
        print(f"== {case.name}", flush=True)
        try:
            ref_sel = self.ours.ref.index_topk(self.ours.plan(inp), inp.q_idx, inp.idx_k_cache)
            f_attn = sparse_attn_flops_exact(ref_sel, inp.q_pos)
            overlap = distinct_blocks_per_tile(ref_sel)
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"{case.name}: reference selection failed ({type(e).__name__}: {e}); attention "
                              "timed on random selections")
            ref_sel = random_selection(inp.q_pos)
            f_attn = sparse_attn_flops_exact(ref_sel, inp.q_pos)
            overlap = float("nan")
        lb_layer = self.lb(f_idx + f_attn, nbytes)
        meta = {"batch": b, "new_tokens": t, "prefix": pre, "selection": case.selection, "flops_index": f_idx,
                "flops_attn": f_attn, "flops_attn_full_blocks": f_attn_upper, "bytes_lb": nbytes, "lb_us": lb_layer,
                "distinct_blocks_per_128q_tile": overlap}
        print(f"   LB {lb_layer:.0f} us; useful FLOPs idx {f_idx / 1e9:.0f} G + attn {f_attn / 1e9:.0f} G; "
              f"distinct blocks per 128-query tile {overlap:.1f}", flush=True)
        reps = self.args.reps
        mq, mk = t, case.seq_len
        up = self.up
        if up is not None and up.error is None:
            up.reset_autotune()
            self.record(section, case.name, "upstream idx", lambda: time_eager(
                lambda: up.extend_index(inp, mq, mk), self.device, reps=reps), **meta)
            if ref_sel is not None:
                usel = ref_sel.permute(1, 0, 2).contiguous()
                self.record(section, case.name, "upstream attn", lambda: time_eager(
                    lambda: up.extend_attn(inp, usel, mq), self.device, reps=reps), **meta)
                self._check_attention(section, case.name, "upstream", lambda: up.extend_attn(inp, usel, mq), inp,
                                      ref_sel, rows=64)
                self._check_selection(section, case.name, "upstream", lambda: up.extend_index(inp, mq, mk).permute(1, 0, 2),
                                      inp, ref_sel, rows=256)
            self.record(section, case.name, "upstream layer", lambda: time_eager(
                lambda: up.extend_attn(inp, up.extend_index(inp, mq, mk), mq), self.device, reps=reps), **meta)
        elif up is not None:
            self.record(section, case.name, "upstream layer", lambda: _fail(RuntimeError(up.error)))
        o = self.ours
        if o.error:
            self.record(section, case.name, "ours layer", lambda: _fail(RuntimeError(o.error)), **meta)
        else:
            try:
                p = o.plan(inp)
            except Exception as e:  # noqa: BLE001
                p = None
                self.record(section, case.name, "ours layer", lambda e=e: _fail(e), **meta)
            if p is not None:
                self.record(section, case.name, "ours idx", lambda: time_eager(
                    lambda: o.index(p, inp), self.device, reps=reps), **meta)
                if ref_sel is not None:
                    self.record(section, case.name, "ours attn", lambda: time_eager(
                        lambda: o.attn(p, inp, ref_sel), self.device, reps=reps), **meta)
                    self._check_attention(section, case.name, "ours", lambda: o.attn(p, inp, ref_sel), inp, ref_sel,
                                          rows=64)
                    self._check_selection(section, case.name, "ours", lambda: o.index(p, inp), inp, ref_sel, rows=256)
                self.record(section, case.name, "ours layer", lambda: time_eager(
                    lambda: o.attn(p, inp, o.index(p, inp)), self.device, reps=reps), **meta)
                if self.args.fp8_extend:
                    self._ours_fp8_extend(section, case.name, inp, p, ref_sel, meta)
        if not self.args.no_dense:
            dmeta = {**meta, "flops_dense": dense_flops(pre, t, b),
                     "lb_us": self.lb(dense_flops(pre, t, b), b * case.seq_len * KV_BYTES_PER_TOKEN)}
            try:
                k, v = gather_dense(inp, seq_lens)
                qd = inp.q.view(b, t, HQ, HEAD_DIM)
            except Exception as e:  # noqa: BLE001
                self.record(section, case.name, "dense", lambda e=e: _fail(e), **dmeta)
                k = v = qd = None
            if k is not None:
                for be in ("flash", "cudnn"):
                    def run(be: str = be) -> dict:
                        fn = dense_causal_fn(qd, k, v, pre, be)
                        note = ""
                        try:
                            err = self._dense_spot_check(fn(), qd, k, v, pre)
                        except Exception as e:  # noqa: BLE001 - e.g. no GQA in this build's flash op
                            if be != "flash" or pre == 0:
                                raise
                            fn = dense_causal_fn(qd, k, v, pre, be, two_part=True)
                            err = self._dense_spot_check(fn(), qd, k, v, pre)
                            note = f"two-part LSE merge (direct call failed: {type(e).__name__})"
                        r = time_eager(fn, self.device, reps=max(2, reps // 2), budget_s=10.0)
                        r["rel_err_rows"] = err
                        if note:
                            r["note"] = note
                        return r
                    self.record(section, case.name, f"dense {be}", run, **dmeta)
                del k, v
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _dense_spot_check(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> float:
        """Relative error of 8 query rows of request 0 against float32 attention over their causal keys."""
        seq_len = q.shape[1]
        rows = torch.linspace(0, seq_len - 1, 8).long().tolist()
        errs = []
        for r in rows:
            n = prefix + r + 1
            qq = q[0, r].float().view(HKV, GROUP, HEAD_DIM)
            kk, vv = k[0, :n].float(), v[0, :n].float()
            logit = torch.einsum("gnd,sgd->gns", qq, kk) * HEAD_DIM**-0.5
            ref = torch.einsum("gns,sgd->gnd", logit.softmax(-1), vv).reshape(HQ, HEAD_DIM)
            errs.append(rel_err(out[0, :, r], ref))
        return max(errs)

    # -- correctness helpers --------------------------------------------------------------------------------
    def _check_selection(self, section: str, case: str, variant: str, fn: Callable[[], torch.Tensor], inp: Inputs,
                         ref_sel: torch.Tensor, rows: int | None = None) -> None:
        """Agreement of a selection with the reference's, and how many differing rows are not near-ties."""
        try:
            got = fn()
            if got.shape != ref_sel.shape:
                raise RuntimeError(f"selection shape {tuple(got.shape)}, reference {tuple(ref_sel.shape)}")
            agree = selection_agreement(got, ref_sel)
            res: dict[str, Any] = {"section": section, "case": case, "variant": variant, "what": "selection vs reference",
                                   "agreement": agree}
            t = got.shape[0]
            idx = torch.arange(t, device=got.device) if rows is None or rows >= t else \
                torch.linspace(0, t - 1, rows, device=got.device).long()
            if self.ours.error is None:
                scores = self._ref_block_scores(inp, idx)
                differ, bad = self.ours.testing.selection_disagreements(got[idx], ref_sel[idx], scores)
                res.update({"rows_checked": int(idx.numel()), "rows_differ": differ, "rows_not_near_tie": bad})
            res["ok"] = res.get("rows_not_near_tie", 0) == 0
        except Exception as e:  # noqa: BLE001
            res = {"section": section, "case": case, "variant": variant, "what": "selection vs reference",
                   "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        self.checks.append(res)

    def _ref_block_scores(self, inp: Inputs, token_idx: torch.Tensor) -> torch.Tensor:
        ref = self.ours.ref
        ptr = torch.zeros(inp.page_table.shape[0] + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(inp.q_lens.cpu().long(), 0)
        seq = inp.seq_lens.tolist()
        nb = blocks(max(seq))
        out = torch.full((token_idx.numel(), H_IDX, nb), float("-inf"), device=inp.q.device)
        tok = token_idx.cpu()
        for r in range(len(seq)):
            m = (tok >= ptr[r]) & (tok < ptr[r + 1])
            if not m.any():
                continue
            keys = ref.gather_sequence(inp.idx_k_cache, inp.page_table[r], seq[r], None)
            sel_t = token_idx[m.to(token_idx.device)]
            s = ref.index_block_scores(inp.q_idx[sel_t], keys, inp.q_pos[sel_t])
            out[m.to(out.device), :, : s.shape[-1]] = s
        return out

    def _ours_fp8_extend(self, section: str, name: str, inp: Inputs, p: Any, ref_sel: torch.Tensor | None,
                         meta: dict) -> None:
        """--fp8-extend: our extend/prefill on fp8 copies of the same caches (K/V value / scale, index-K fp8):
        index, attention on the bf16 reference selection, the layer, and the attention's error against the
        reference on the fp8 data. Same FLOPs as bf16; the bytes bound is not recomputed (extend is FLOP-bound).
        Variants "ours fp8kv ...": "ours fp8 ..." names the decode fp8 section's rows."""
        o, reps = self.ours, self.args.reps
        f8 = to_fp8(inp)
        self.record(section, name, "ours fp8kv idx", lambda: time_eager(lambda: o.index(p, f8), self.device, reps=reps),
                    **meta)
        if ref_sel is not None:
            self.record(section, name, "ours fp8kv attn", lambda: time_eager(
                lambda: o.attn(p, f8, ref_sel), self.device, reps=reps), **meta)
            self._check_attention(section, name, "ours fp8kv", lambda: o.attn(p, f8, ref_sel), f8, ref_sel, rows=64)
        self.record(section, name, "ours fp8kv layer", lambda: time_eager(
            lambda: o.attn(p, f8, o.index(p, f8)), self.device, reps=reps), **meta)

    def _check_attention(self, section: str, case: str, variant: str, fn: Callable[[], torch.Tensor], inp: Inputs,
                         sel: torch.Tensor, rows: int | None) -> None:
        """Relative error of the output against the float32 reference on the same selection (a subset of rows)."""
        try:
            out = fn()
            t = out.shape[0]
            idx = torch.arange(t) if rows is None or rows >= t else torch.linspace(0, t - 1, rows).long()
            ref = self.ours.ref
            ptr = [0, *torch.cumsum(inp.q_lens.cpu().long(), 0).tolist()]
            seq = inp.seq_lens.tolist()
            errs = []
            for r in range(len(seq)):
                m = (idx >= ptr[r]) & (idx < ptr[r + 1])
                if not m.any():
                    continue
                ti = idx[m].to(inp.q.device)
                k = ref.gather_sequence(inp.k_cache, inp.page_table[r], seq[r], inp.k_scale)
                v = ref.gather_sequence(inp.v_cache, inp.page_table[r], seq[r], inp.v_scale)
                want = ref.sparse_attention(inp.q[ti].float(), k, v, sel[ti], inp.q_pos[ti])
                errs.append((out[ti].double() - want.double()).norm() ** 2 / want.double().norm() ** 2)
            finite = bool(torch.isfinite(out).all())
            err = float(torch.stack(errs).sum().sqrt()) if errs else float("nan")
            tol = 2e-2 if inp.k_cache.dtype == torch.float8_e4m3fn else 1e-2
            self.checks.append({"section": section, "case": case, "variant": variant, "what": "attention vs reference",
                                "rel_err": err, "all_finite": finite, "ok": finite and err < tol})
        except Exception as e:  # noqa: BLE001
            self.checks.append({"section": section, "case": case, "variant": variant, "what": "attention vs reference",
                                "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})

    # -- small correctness spot checks ----------------------------------------------------------------------
    def correctness(self) -> None:
        print("== correctness spot checks (ours and upstream vs the reference, same inputs)", flush=True)
        shapes = [("decode mixed", [1000, 5000, 130, 2048], [1, 1, 1, 1], False),
                  ("decode shared", [3000, 3000, 3000], [1, 1, 1], True),
                  ("extend mixed", [1800, 700, 2048], [300, 700, 129], False),
                  ("extend shared", [2600, 2600], [400, 400], True)]
        if not self.device.startswith("cuda"):
            shapes = [("decode mixed", [300, 1000], [1, 1], False), ("extend mixed", [400, 260], [100, 260], False)]
        for name, seq, ql, shared in shapes:
            self._correct_one(name, seq, ql, shared)

    def _correct_one(self, name: str, seq: list[int], ql: list[int], shared: bool) -> None:
        inp = build_inputs(seq, ql, shared, self.device, seed=int(time.time()) % 10000)
        o = self.ours
        if o.error:
            self.checks.append({"section": "correctness", "case": name, "variant": "ours", "ok": False,
                                "error": o.error})
            return
        p = o.plan(inp)
        ref_sel = o.ref.index_topk(p, inp.q_idx, inp.idx_k_cache)
        self._check_selection("correctness", name, "ours", lambda: o.index(p, inp), inp, ref_sel)
        self._check_attention("correctness", name, "ours", lambda: o.attn(p, inp, ref_sel), inp, ref_sel, rows=None)
        up = self.up
        if up is None or up.error is not None:
            return
        usel = ref_sel.permute(1, 0, 2).contiguous()
        mq, mk = max(ql), max(seq)
        if name.startswith("decode"):
            self._check_selection("correctness", name, "upstream", lambda: up.decode_index(inp, mk).permute(1, 0, 2),
                                  inp, ref_sel)
            self._check_attention("correctness", name, "upstream", lambda: up.decode_attn(inp, usel), inp, ref_sel,
                                  rows=None)
        else:
            self._check_selection("correctness", name, "upstream",
                                  lambda: up.extend_index(inp, mq, mk).permute(1, 0, 2), inp, ref_sel)
            self._check_attention("correctness", name, "upstream", lambda: up.extend_attn(inp, usel, mq), inp,
                                  ref_sel, rows=None)

    # -- run ------------------------------------------------------------------------------------------------
    def over_budget(self, what: str) -> bool:
        """True (and noted) once --budget-s is spent: later cases are skipped so the results still get written."""
        if self.args.budget_s and time.time() - self.t0 > self.args.budget_s:
            self.notes.append(f"skipped (time budget of {self.args.budget_s} s spent): {what}")
            print(f"  skipped, over the time budget: {what}", flush=True)
            return True
        return False

    def run(self) -> None:
        self.t0 = time.time()
        only = set(self.args.only.split(",")) if self.args.only else {"decode", "extend", "prefill", "fp8", "correctness"}
        self.ceilings()
        if self.up is not None:
            print(f"== upstream: {'ERROR ' + self.up.error if self.up.error else 'imported'}", flush=True)
            if self.up.error is None and ("decode" in only or "fp8" in only or "correctness" in only):
                self.up.warm_radix()
                print(f"   decode top-k: {self.up.topk_impl}", flush=True)
        print(f"== ours: {'ERROR ' + self.ours.error if self.ours.error else 'imported'}", flush=True)
        if "correctness" in only:
            self.correctness()
        work: list[tuple[str, Any]] = []
        if "decode" in only:
            work += [("decode", c) for c in decode_cases(self.grid)
                     if not (self.args.max_context and c.context > self.args.max_context)]
        if "fp8" in only:
            work += [("fp8", c) for c in fp8_cases(self.grid, self.args.fp8_grid)
                     if not (self.args.max_context and c.context > self.args.max_context)]
        if "extend" in only:
            work += [("extend", c) for c in extend_cases(self.grid)]
        if "prefill" in only:
            work += [("prefill", c) for c in prefill_cases(self.grid)]
        if self.args.match:
            import re

            work = [(sec, c) for sec, c in work if re.search(self.args.match, c.name)]
        for section, c in work:
            if self.over_budget(c.name):
                continue
            if section == "decode":
                self.decode_case(c)
            elif section == "fp8":
                self.fp8_case(c)
            else:
                self.extend_case(c, section)


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


def environment(args: argparse.Namespace) -> dict:
    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "heads": f"{HQ}/{HKV}",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env.update({"torch_device_name": props.name, "sms": props.multi_processor_count,
                    "memory_gib": round(props.total_memory / GiB, 1)})
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip().splitlines()[0] if smi.stdout.strip() else smi.stderr.strip()
            env["card"] = env["nvidia_smi"].split(",")[0].strip()
            v = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=20)
            env["nvcc"] = v.stdout.strip().splitlines()[-1] if v.returncode == 0 else None
        except Exception as e:  # noqa: BLE001
            env["nvidia_smi"] = f"unavailable: {e}"
            env["card"] = props.name
    else:
        env["card"] = "cpu"
    env["ours_source_sha1"] = source_digest(ROOT / "kernels" / "msa_kernels")
    env["msa_switches"] = msa_switches()
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "kernels"], capture_output=True,
                               text=True, timeout=10)
        env["git_head"] = head.stdout.strip() or None
        env["kernels_uncommitted_files"] = len(dirty.stdout.splitlines()) if head.returncode == 0 else None
    except Exception:  # noqa: BLE001 - the device copy may have no .git
        env["git_head"] = None
    return env


def msa_switches() -> dict[str, str]:
    """The MSA_* environment switches of this run (the A/B settings its numbers belong to)."""
    return {k: v for k, v in os.environ.items() if k.startswith("MSA_")}


def source_digest(folder: Path) -> str:
    """sha1 over the kernel library's Python sources (names and contents): which 'ours' was measured."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted(folder.rglob("*.py")):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def summarize(rows: list[dict]) -> list[dict]:
    """One line per case: layer times of upstream, ours and the fastest dense, with roofline fractions
    (the bound of the layer's own precision: the fp8 case uses the fp8 bytes bound)."""
    by: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r["section"], r["case"]), {})[r["variant"]] = r
    out = []
    for (section, case), v in by.items():
        def us(name: str, v: dict = v) -> float | None:
            r = v.get(name)
            return r["us"] if r and r.get("ok") and r.get("us") is not None else None

        up, ours = us("upstream layer"), us("ours layer")
        if section == "fp8":
            continue
        fp8 = "ours fp8 layer" in v or "ours bf16 layer" in v or "upstream fp8 layer" in v
        if fp8:
            up = us("upstream fp8 layer")
            ours = us("ours fp8 layer")
        dense = [x for x in (us("dense flash"), us("dense cudnn")) if x is not None]
        names = ("ours fp8 layer", "upstream fp8 layer") if fp8 else ("ours layer", "upstream layer")
        lb_row = next((v[n] for n in names if n in v), next(iter(v.values())))
        lb = lb_row.get("lb_us")
        line = {"section": section, "case": case, "upstream_us": up, "ours_us": ours,
                "dense_best_us": min(dense) if dense else None, "lb_us": lb,
                "speedup_vs_upstream": (up / ours) if up and ours else None,
                "ours_frac_roofline": (lb / ours) if lb and ours else None,
                "upstream_frac_roofline": (lb / up) if lb and up else None}
        for name in ("upstream attn", "ours attn"):
            r = v.get(name)
            if r and r.get("ok") and r.get("flops_attn"):
                line[name.replace(" ", "_") + "_tflops"] = r["flops_attn"] / (r["us"] * 1e-6) / 1e12
        graph_plan = us("ours graph-plan layer")
        if graph_plan:
            update = us("ours graph-plan update") or 0.0
            line["ours_graph_plan_update_us"] = update or None
            graph_plan += update / SPARSE_LAYERS  # one plan update per decode step, shared by the sparse layers
            line["ours_graph_plan_us"] = graph_plan
            line["graph_plan_speedup_vs_upstream"] = (up / graph_plan) if up else None
        if us("ours fp8kv layer"):
            line["ours_fp8kv_us"] = us("ours fp8kv layer")
            line["ours_fp8kv_attn_us"] = us("ours fp8kv attn")
            line["fp8kv_speedup_vs_ours"] = (ours / line["ours_fp8kv_us"]) if ours else None
        if "ours bf16 layer" in v:
            line["ours_bf16_us"] = us("ours bf16 layer")
            if line["ours_bf16_us"] and ours:
                line["fp8_speedup_vs_ours_bf16"] = line["ours_bf16_us"] / ours
        out.append(line)
    return out


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _md_row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_head(*names: str) -> list[str]:
    """A markdown table's header line and its separator."""
    return [_md_row(*names), "|" + "---|" * len(names)]


def markdown(data: dict) -> str:
    """The markdown report of one run, from its JSON data (so a saved JSON can be re-rendered)."""
    env, c, args, summary = data["env"], data["ceilings"], data.get("args", {}), data["summary"]
    lines = [f"# MSA kernel benchmark: {env.get('card')}", "",
             f"- date (UTC): {env['date_utc']}", f"- command: `{env['command']}`",
             f"- card: {env.get('nvidia_smi', env.get('card'))}",
             f"- attention heads (query / KV): {env.get('heads', '64/4')}",
             f"- included: grid {data.get('grid')}, sections {args.get('only') or 'all'}"
             + (f", cases matching `{args.get('match')}`" if args.get("match") else "")
             + f"; wall time {env.get('wall_s')} s",
             f"- versions: python {env['python']}, torch {env['torch']}, triton {env.get('triton')}, "
             f"CUDA runtime {env.get('cuda_runtime')}, nvcc: {env.get('nvcc')}",
             f"- ceilings (this run): copy {c['copy_bytes_s'] / 1e12:.2f} TB/s, bf16 matmul "
             f"{c['matmul_flops_s'] / 1e12:.0f} TFLOP/s{'' if c.get('measured') else ' (NOT measured: placeholders)'}",
             f"- upstream: sglang 0.5.23 Triton MSA kernels from the PyPI wheel; decode top-k: "
             f"{data.get('upstream_topk') or 'not run'}"
             + (f"; import error: {data['upstream_error']}" if data.get("upstream_error") else ""),
             f"- ours: msa_kernels.ops (sources sha1 {env.get('ours_source_sha1')}, git {env.get('git_head')}, "
             f"uncommitted kernel files: {env.get('kernels_uncommitted_files')})"
             f"{'; import error: ' + data['ours_error'] if data.get('ours_error') else ''}",
             ""]
    if data.get("label"):
        lines.insert(0, f"> **{data['label']}**\n")
    lines += [f"- note: {n}" for n in data.get("notes", [])]
    lines += ["", "## Summary (layer = index scoring + top-k + attention)", "",
              *_md_head("case", "upstream µs", "ours µs", "ours / upstream speedup", "best dense µs", "LB µs",
                        "ours % roofline", "upstream % roofline", "attn TFLOP/s upstream / ours")]
    for s in summary:
        lines.append(_md_row(
            s["case"], _fmt(s["upstream_us"]), _fmt(s["ours_us"]), _fmt(s["speedup_vs_upstream"], ".2f"),
            _fmt(s["dense_best_us"]), _fmt(s["lb_us"]),
            _fmt(s["ours_frac_roofline"] and 100 * s["ours_frac_roofline"], ".0f"),
            _fmt(s["upstream_frac_roofline"] and 100 * s["upstream_frac_roofline"], ".0f"),
            f"{_fmt(s.get('upstream_attn_tflops'), '.0f')} / {_fmt(s.get('ours_attn_tflops'), '.0f')}"))
    served = [x for x in summary if x.get("ours_graph_plan_us") is not None]
    if served:
        lines += ["", "## Decode as served in CUDA graphs (m3serve plugin: graph plan updated on the device)", "",
                  f"The plan update runs once per decode step for all {SPARSE_LAYERS} sparse layers of M3; the "
                  f"graph-plan column is the layer plus 1/{SPARSE_LAYERS} of it.", "",
                  *_md_head("case", "upstream µs", "ours (host-built plan) µs", "plan update µs (per step)",
                            "ours graph-plan µs", "graph-plan / upstream speedup")]
        for x in served:
            lines.append(_md_row(x["case"], _fmt(x["upstream_us"]), _fmt(x["ours_us"]),
                                 _fmt(x.get("ours_graph_plan_update_us")), _fmt(x["ours_graph_plan_us"]),
                                 _fmt(x.get("graph_plan_speedup_vs_upstream"), ".2f")))
    fp8 = [x for x in summary if x.get("ours_bf16_us") is not None or "fp8" in x["case"]]
    if fp8:
        # keyed by case: a run may hold several fp8 cases (--fp8-grid)
        agree = {(ch["case"], ch["variant"]): ch.get("agreement") for ch in data["checks"]
                 if "agreement fp8" in ch.get("what", "")}
        ups = {(r["case"], r["variant"]): r["us"] for r in data["rows"]
               if "fp8" in r["case"] and r.get("ok") and r.get("us")}
        lines += ["", "## fp8 K/V + fp8 index-K decode", "",
                  *_md_head("case", "ours bf16 µs", "ours fp8 µs", "fp8 speedup over ours bf16", "upstream bf16 µs",
                            "upstream fp8 µs", "selection agreement fp8 vs bf16 (ours / reference scorer)")]
        for x in fp8:
            c = x["case"]
            lines.append(_md_row(
                c, _fmt(x.get("ours_bf16_us")), _fmt(x["ours_us"]), _fmt(x.get("fp8_speedup_vs_ours_bf16"), ".2f"),
                _fmt(ups.get((c, "upstream bf16 layer"))), _fmt(ups.get((c, "upstream fp8 layer"))),
                f"{_fmt(agree.get((c, 'ours')), '.3f')} / {_fmt(agree.get((c, 'reference')), '.3f')}"))
    fp8kv = [x for x in summary if x.get("ours_fp8kv_us") is not None]
    if fp8kv:
        lines += ["", "## Extend / prefill on fp8 caches (--fp8-extend: K/V and index-K in e4m3, same data)", "",
                  *_md_head("case", "ours bf16 layer µs", "ours fp8 layer µs", "fp8 / bf16 speed",
                            "ours bf16 attn µs", "ours fp8 attn µs")]
        attn = {(r["case"], r["variant"]): r["us"] for r in data["rows"] if r.get("ok") and r.get("us")}
        for x in fp8kv:
            lines.append(_md_row(x["case"], _fmt(x["ours_us"]), _fmt(x["ours_fp8kv_us"]),
                                 _fmt(x.get("fp8kv_speedup_vs_ours"), ".2f"), _fmt(attn.get((x["case"], "ours attn"))),
                                 _fmt(x.get("ours_fp8kv_attn_us"))))
    lines += ["", "## Every variant", "",
              "| section | case | variant | µs | timing | sets | % of roofline | TFLOP/s (useful) | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if not r.get("ok"):
            lines.append(f"| {r['section']} | {r['case']} | {r['variant']} | FAILED | | | | | {r.get('error', '')} |")
            continue
        if r.get("us") is None:
            lines.append(f"| {r['section']} | {r['case']} | {r['variant']} | | | | | | "
                         f"{json.dumps({k: r[k] for k in ('agreement',) if k in r})} |")
            continue
        flops = None
        if "attn" in r["variant"] and r.get("flops_attn"):
            flops = r["flops_attn"]
        elif "idx" in r["variant"] and r.get("flops_index"):
            flops = r["flops_index"]
        elif "dense" in r["variant"] and r.get("flops_dense"):
            flops = r["flops_dense"]
        elif "layer" in r["variant"] and r.get("flops_attn") is not None and r.get("flops_index") is not None:
            flops = r["flops_attn"] + r["flops_index"]
        frac = None
        if "layer" in r["variant"] or "dense" in r["variant"]:
            frac = r.get("lb_us", 0) / r["us"] if r.get("lb_us") else None
        elif r["section"] == "decode" and r.get("bytes_lb"):
            frac = None
        tf = flops / (r["us"] * 1e-6) / 1e12 if flops else None
        note = f"max rel err {r['rel_err_rows']:.1e} on 8 rows" if "rel_err_rows" in r else ""
        lines.append(f"| {r['section']} | {r['case']} | {r['variant']} | {r['us']:.1f} | {r.get('timing', '')} | "
                     f"{r.get('sets', '')} | {_fmt(frac and 100 * frac, '.0f')} | {_fmt(tf, '.0f')} | {note} |")
    lines += ["", "## Correctness (same inputs, against the float32 reference)", "",
              "| section | case | variant | check | result | ok |", "|---|---|---|---|---|---|"]
    for ch in data["checks"]:
        res = {k: ch[k] for k in ("agreement", "rows_checked", "rows_differ", "rows_not_near_tie", "rel_err",
                                  "value", "error") if k in ch}
        lines.append(f"| {ch.get('section')} | {ch.get('case')} | {ch.get('variant')} | {ch.get('what', '')} | "
                     f"{json.dumps(res)} | {ch.get('ok', '')} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> str | None:
    """Decode layer time against context length, one line per variant and batch. Returns an error or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"matplotlib unavailable: {e}"
    # fp8 cases add their fp8 layers; their bf16 layers repeat the decode cases' "ours layer"
    rows = [r for r in data["rows"] if r["section"] in ("decode", "fp8") and r.get("ok") and r.get("us")
            and not r.get("shared_prefix") and r.get("context")
            and (r["variant"].endswith("layer") or r["variant"].startswith("dense"))
            and ("fp8" not in r["case"] or "fp8" in r["variant"])]
    if not rows:
        return "no decode rows to plot"
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for variant in sorted({r["variant"] for r in rows}):
            pts = sorted((r["context"], r["us"]) for r in rows if r["batch"] == b and r["variant"] == variant)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
        for fp8, style, label in ((False, "k--", "MSA bytes bound"), (True, "k:", "MSA fp8 bytes bound")):
            lbs = sorted({(r["context"], r["lb_us"]) for r in rows if r["batch"] == b and r.get("lb_us")
                          and r["variant"].endswith("layer") and ("fp8" in r["variant"]) == fp8})
            if lbs:
                ax.plot([p[0] for p in lbs], [p[1] for p in lbs], style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel("µs per layer")
        ax.set_title(f"decode, batch {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"MSA decode layer on {data['env'].get('card')} ({data['env']['date_utc']} UTC)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma list of: correctness,decode,fp8,extend,prefill (default all)")
    ap.add_argument("--quick", action="store_true", help="a smaller grid (B 1/8, N 8k/60k, extend B=1, prefill 16k)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke test of the harness itself")
    ap.add_argument("--max-context", type=int, default=0, help="skip decode contexts above this")
    ap.add_argument("--fp8-grid", action="store_true", help="fp8 at every batch and context of the decode grid")
    ap.add_argument("--fp8-extend", action="store_true", help="extend/prefill cases also on fp8 copies of the caches")
    ap.add_argument("--reps", type=int, default=5, help="eager repetitions (median) for extend/prefill")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--baseline", default=str(ROOT / ".baseline"), help="folder prepared by prepare_gpu_bundle.sh")
    ap.add_argument("--no-upstream", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--triton-topk", action="store_true", help="upstream decode uses its Triton top-k, not radix")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results" / "tmp")))
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--match", default="", help="only cases whose name matches this regular expression")
    ap.add_argument("--budget-s", type=float, default=0, help="skip cases that would start after this many seconds")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--render", default="", help="re-render the .md and .png of a saved result JSON, run nothing")
    args = ap.parse_args(argv)
    if args.render:
        src = Path(args.render)
        data = json.loads(src.read_text())
        data["summary"] = summarize(data["rows"])
        src.write_text(json.dumps(data, indent=1, default=str))
        src.with_suffix(".md").write_text(markdown(data))
        err = plot(data, src.with_suffix(".png"))
        print(f"rendered {src.with_suffix('.md')}" + (f"; plot: {err}" if err else f" and {src.with_suffix('.png')}"))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env = environment(args)
    print(f"card: {env.get('nvidia_smi', env.get('card'))}; torch {env['torch']}, triton {env.get('triton')}", flush=True)
    bench = Bench(args)
    try:
        bench.run()
    finally:
        env["wall_s"] = round(time.time() - t0, 1)
        summary = summarize(bench.rows)
        data = {"env": env, "grid": bench.grid, "ceilings": bench.ceil, "upstream_topk": bench.up.topk_impl if bench.up else None,
                "upstream_error": bench.up.error if bench.up else None, "ours_error": bench.ours.error,
                "notes": bench.notes, "summary": summary, "rows": bench.rows, "checks": bench.checks,
                "args": vars(args)}
        stem = "msa_kernels" + (f"_{args.tag}" if args.tag else "")
        (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
        (out / f"{stem}.md").write_text(markdown(data))
        err = plot(data, out / f"{stem}.png")
        if err:
            print(f"plot: {err}")
        print(f"\n== summary ({env.get('card')}, {env['wall_s']} s; files in {out})")
        print(f"{'case':<48} {'upstream':>10} {'ours':>10} {'speedup':>8} {'dense':>10} {'LB':>9} {'ours%RL':>7}")
        for s in summary:
            print(f"{s['case']:<48} {_fmt(s['upstream_us']):>10} {_fmt(s['ours_us']):>10} "
                  f"{_fmt(s['speedup_vs_upstream'], '.2f'):>8} {_fmt(s['dense_best_us']):>10} {_fmt(s['lb_us']):>9} "
                  f"{_fmt(s['ours_frac_roofline'] and 100 * s['ours_frac_roofline'], '.0f'):>7}")
            if s.get("ours_bf16_us") is not None:
                print(f"{'   (fp8 row: upstream/ours are fp8; ours bf16 ' + _fmt(s['ours_bf16_us']) + ' us, fp8 speedup ' + _fmt(s.get('fp8_speedup_vs_ours_bf16'), '.2f') + ')'}")
        bad = [c for c in bench.checks if not c.get("ok")]
        print(f"correctness: {len(bench.checks) - len(bad)}/{len(bench.checks)} checks ok"
              + "".join(f"\n  FAIL {c.get('case')} {c.get('variant')} {c.get('what', '')}: "
                        f"{c.get('error') or {k: c.get(k) for k in ('agreement', 'rows_not_near_tie', 'rel_err')}}"
                        for c in bad[:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
