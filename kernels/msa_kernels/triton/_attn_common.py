"""Pieces shared by the sparse decode and extend attention kernels: input checks and the partial merge.

Softmax runs in the base-2 domain: scores are multiplied by scale * log2(e) once, so every exponential is an
`exp2` and every log-sum-exp below is a log2-sum-exp (`lse2`). Partial results are stored normalized
(o / l) beside their lse2, so merging k partials is  o = sum_i 2^(lse2_i - M) o_i / sum_i 2^(lse2_i - M).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..layout import BLOCK_SIZE, MSAInputError, check_cache
from ..plan import MSAPlan

try:  # host-side TMA descriptors (Triton >= 3.3); without them the kernels keep gathered loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

LOG2E = 1.4426950408889634
# A finite "minus infinity" for running maxima: exp2(-inf - NEG_BIG) is 0, and exp2(NEG_BIG - NEG_BIG) is 1,
# so rows that have seen no visible key yet never produce inf - inf = NaN.
NEG_BIG = tl.constexpr(-1.0e30)

_Q_DTYPES = (torch.float16, torch.bfloat16)
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn",) if hasattr(torch, n))


def check_attention_inputs(
    plan: MSAPlan,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    selected: torch.Tensor,
    k_scale: float | None,
    v_scale: float | None,
) -> tuple[int, int, int]:
    """Validate the run-step inputs; returns (Hq, Hkv, D). Cheap: shapes and dtypes only, no device syncs."""
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache, heads=k_cache.shape[1], dim=k_cache.shape[2])
    if q.dim() != 3:
        raise MSAInputError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    t_count, hq, dim = q.shape
    hkv = k_cache.shape[1]
    if t_count != plan.num_tokens:
        raise MSAInputError(f"q has {t_count} tokens, the plan {plan.num_tokens}")
    if dim != k_cache.shape[2]:
        raise MSAInputError(f"q head dim {dim} differs from the cache's {k_cache.shape[2]}")
    if dim < 16 or dim & (dim - 1):
        raise MSAInputError(f"head dim must be a power of two >= 16, got {dim}")
    if hq % hkv:
        raise MSAInputError(f"{hq} query heads do not split into {hkv} KV groups")
    if q.dtype not in _Q_DTYPES:
        raise MSAInputError(f"q must be float16 or bfloat16, got {q.dtype}")
    if k_cache.dtype != v_cache.dtype:
        raise MSAInputError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must share a dtype")
    if k_cache.dtype in _FP8_DTYPES:
        if k_scale is None or v_scale is None:
            raise MSAInputError("fp8 K/V caches need k_scale and v_scale")
    elif k_cache.dtype != q.dtype:
        raise MSAInputError(f"cache dtype {k_cache.dtype} must be q's dtype {q.dtype} or float8_e4m3fn")
    if selected.dim() != 3 or selected.shape[0] != t_count or selected.shape[1] != hkv:
        raise MSAInputError(f"selected must be [T={t_count}, Hkv={hkv}, topk], got {tuple(selected.shape)}")
    if selected.dtype != torch.int32:
        raise MSAInputError(f"selected must be int32, got {selected.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("selected", selected)):
        if t.device != q.device:
            raise MSAInputError(f"{name} is on {t.device}, q on {q.device}")
        if t.stride(-1) != 1:
            raise MSAInputError(f"{name} must be contiguous in its last dimension")
    if plan.page_table.device != q.device:
        raise MSAInputError(f"the plan lives on {plan.page_table.device}, q on {q.device}")
    return hq, hkv, dim


def score_scale(scale: float | None, dim: int, k_scale: float | None, is_fp8: bool) -> float:
    """Multiplier from q.k to the base-2 softmax exponent; an fp8 cache's k_scale folds in here."""
    s = dim**-0.5 if scale is None else float(scale)
    if is_fp8:
        s *= float(k_scale)
    return s * LOG2E


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype in _FP8_DTYPES


def fp8_in_f16(q: torch.Tensor, cache: torch.Tensor, use: str) -> bool:
    """Run the products of a bf16 q against an fp8 cache in fp16 (`to_f16_clamped`), not bf16: e4m3 widens to
    fp16 in one conversion and exactly. `use` is "index" (index scoring) or "attn" (attention).

    Measured with bench_msa --only fp8 (B=32 at 60k, fp8 K/V and index-K, round 6, settings in one call): H100,
    index scoring 97.1 -> 95.5 us with fp16 there; attention 39.0 -> 46.0 us with fp16 there too. H200: index
    scoring 82.8 -> 72.5 us, attention 37.6 -> 43.2 us. Hence fp16 for index scoring only.
    MSA_FP8_F16 = index (default) | both | none (A/B benchmarks)."""
    mode = os.environ.get("MSA_FP8_F16", "index")
    if mode not in ("index", "both", "none"):
        raise MSAInputError(f"MSA_FP8_F16 must be index, both or none, got {mode!r}")
    return (mode == "both" or mode == use) and is_fp8(cache) and q.dtype == torch.bfloat16


@triton.jit
def to_f16_clamped(x):
    """x in fp16 for products against fp8 values: clamped into fp16's range, within which bf16 -> fp16 is exact."""
    return tl.clamp(x.to(tl.float32), -65504.0, 65504.0).to(tl.float16)


# e4m3 widened by `e4m3_words_to_f16` is the value times 2^-8 (fp16's exponent bias is 8 above e4m3's); the
# callers fold this factor into their scales.
E4M3_WORDS_GAIN = 256.0


@triton.jit
def e4m3_words_to_f16(w, R: tl.constexpr, W: tl.constexpr):
    """[R, W] int32 words of 4 e4m3 bytes each -> [R, 4 W] fp16 in byte order, each value times 2^-8, exactly.

    Why: Triton widens an 8-bit tile after moving it into the MMA layout one byte at a time (LDS.U8 + PRMT, 822
    SASS instructions per 64-token decode unit against 433 for bf16; round 11). Loaded as 32-bit words, a byte's
    sign goes to fp16's sign bit and its 7 exponent+mantissa bits shift into fp16's exponent and mantissa, two
    values per 32-bit operation, and the layout change then moves 16-bit values. Subnormals map exactly; e4m3's
    NaN (0x7f) becomes the finite 1.875 * 2^-8, which no stored cache value produces."""
    u = w.to(tl.uint32, bitcast=True)
    lo = ((u & 0x00800080) << 8) | ((u & 0x007F007F) << 7)  # bytes 0 and 2 as fp16 bit patterns
    hi = (u & 0x80008000) | ((u & 0x7F007F00) >> 1)  # bytes 1 and 3
    b0 = (lo & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    b2 = (lo >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    b1 = (hi & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    b3 = (hi >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), [R, 4 * W])


def e4m3_words(cache: torch.Tensor) -> torch.Tensor | None:
    """An fp8 cache [slots, heads, D] seen as int32 words [slots, heads, D / 4] for `e4m3_words_to_f16`, or None
    where its strides or offset do not fall on 4-byte boundaries (the caller then loads bytes)."""
    if cache.shape[-1] % 4 or cache.storage_offset() % 4 or any(s % 4 for s in cache.stride()[:-1]):
        return None
    return cache.view(torch.int32)


def env_switch(name: str, default: bool) -> bool:
    """A 0/1 A/B switch from the environment (MSA_TMA, MSA_DECODE_PAGES_FIRST, ...); anything else is refused."""
    flag = os.environ.get(name)
    if flag is None:
        return default
    if flag not in ("0", "1"):
        raise MSAInputError(f"{name} must be 0 or 1, got {flag!r}")
    return flag == "1"


def tma_descriptor(cache: torch.Tensor, rows: int, use: bool | None):
    """A tensor-memory-accelerator (TMA) descriptor for loading [rows, D] tiles of one head from a paged cache
    [slots, heads, D], or None where the caller must gather with pointer loads instead.

    A page is BLOCK_SIZE consecutive slots, so one head's keys in a page are a strided 2D tile of the cache
    seen as [slots, heads * D]: what a TMA load fetches with one instruction, asynchronously, without a
    register per address (gathered loads need one per row), and what lets Triton keep 3 stages in flight. It
    needs the last two dimensions contiguous and 16-byte aligned rows and base. `use`: False never, True when
    the layout allows it, None reads MSA_TMA (default 1)."""
    if use is None:
        use = env_switch("MSA_TMA", True)
    if not use or TensorDescriptor is None:
        return None
    slots, heads, dim = cache.shape
    row_bytes = cache.stride(0) * cache.element_size()
    if cache.stride(2) != 1 or cache.stride(1) != dim or row_bytes % 16 or cache.data_ptr() % 16:
        return None
    flat = cache.as_strided((slots, heads * dim), (cache.stride(0), 1))
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, dim])


def kv_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, rows: int, use: bool | None) -> tuple | None:
    """TMA descriptors of K and V (`tma_descriptor`), or None unless both caches allow them."""
    k_desc = tma_descriptor(k_cache, rows, use)
    v_desc = tma_descriptor(v_cache, rows, use) if k_desc is not None else None
    return None if v_desc is None else (k_desc, v_desc)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


assert BLOCK_SIZE == 128 and math.isclose(LOG2E, 1 / math.log(2))


@triton.jit
def merge_partials(
    part_o,  # fp32 [.., NSPLIT, GPAD, D] normalized partial outputs of one (request, kv head)
    part_lse,  # fp32 [.., NSPLIT, GPAD] their log2-sum-exp
    out_ptr,  # first output row of the group: out[t, kvh * G]
    stride_oh,
    NSPLIT: tl.constexpr,
    G: tl.constexpr,
    GPAD: tl.constexpr,
    D: tl.constexpr,
):
    """Merge NSPLIT partials of GPAD rows by log-sum-exp and write the G real rows to out."""
    rows = tl.arange(0, GPAD)
    cols = tl.arange(0, D)
    m = tl.full([GPAD], NEG_BIG, tl.float32)
    l_sum = tl.zeros([GPAD], tl.float32)
    acc = tl.zeros([GPAD, D], tl.float32)
    for s in range(NSPLIT):
        # .cg: read through L2, never a stale L1 line (the partials were written by other CTAs).
        lse = tl.load(part_lse + s * GPAD + rows, cache_modifier=".cg")
        o = tl.load(part_o + (s * GPAD + rows[:, None]) * D + cols[None, :], cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha[:, None] + o * w[:, None]
        l_sum = l_sum * alpha + w
        m = m_new
    res = acc / l_sum[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_oh + cols[None, :],
        res.to(out_ptr.dtype.element_ty),
        mask=(rows < G)[:, None],
    )

