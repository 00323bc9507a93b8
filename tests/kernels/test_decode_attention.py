"""Paged split-K sparse decode attention (msa_kernels.triton.decode_attention) against the reference.

On the CPU the kernel runs under the Triton interpreter, which must be switched on before triton is imported:
the cases run in one child process (this file run as a script) and each pytest case checks its line of the
child's report. Full M3 shapes run on a GPU (marked `gpu`).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from interpreter_child import interpreter_report as run_interpreter_child

# name -> (seq_lens, q heads, kv heads, head dim, cache dtype, style, (chunk, nsplit) or None, fused merge, q dtype)
# Lengths one short of a unit (1023, 4031) put a single unwritten (NaN) slot in the last unit: reading it would
# poison the output. Small batches look every unit's page up before the loop (pages_first); a name ending in
# "_per_unit_lookup" runs the per-unit lookups that larger batches use (MSA_DECODE_PAGES_FIRST=0).
CASES = {
    "mixed_lengths_fused": ([300, 5000, 128, 2048, 129, 1023], 16, 1, 64, None, "random", None, True, torch.float16),
    "mixed_lengths_per_unit_lookup": ([300, 5000, 128, 1023], 16, 1, 64, None, "random", None, True, torch.float16),
    "mixed_lengths_two_launch": ([300, 5000, 128, 2048, 129], 16, 1, 64, None, "random", None, False, torch.float16),
    "group4_two_kv_heads_d128": ([1000, 70], 8, 2, 128, None, "recent", None, True, torch.float16),
    "one_split_direct_write": ([2100, 1], 16, 1, 64, None, "random", (128, 1), True, torch.float16),
    "half_page_units_32_splits": ([4000, 257, 4031], 16, 1, 64, None, "random", (64, 32), True, torch.float16),
    # fp8 K/V load as int32 words widened by bit operations (e4m3_words_to_f16); "_byte_loads" runs the
    # byte loads kept for caches whose strides are not whole words (MSA_FP8_WORDS=0).
    "fp8_cache": ([3000, 200], 16, 1, 64, "fp8", "random", None, True, torch.float16),
    "fp8_cache_byte_loads": ([3000, 200], 16, 1, 64, "fp8", "random", None, True, torch.float16),
    # bf16 q on an fp8 cache: the products run in fp16; the output is bf16, hence its bound.
    "fp8_cache_bf16_q": ([2500, 300, 1023], 16, 1, 64, "fp8", "random", None, True, torch.bfloat16),
    "fp8_cache_bf16_q_byte_loads": ([2500, 300], 16, 1, 64, "fp8", "random", None, True, torch.bfloat16),
    "fp8_words_half_page_units": ([4000, 257, 4031], 16, 1, 64, "fp8", "random", (64, 32), True, torch.float16),
    "fp8_words_group8_d128_two_launch": ([3000, 200, 1023], 8, 2, 128, "fp8", "random", None, False,
                                         torch.bfloat16),
}
# fp16 q/k/v, fp32 accumulation (fp8 is compared with its own dequantized values); bf16 outputs round at 2^-8.
BOUND = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _run_case(name: str) -> float:
    from msa_kernels.reference import sparse_attention_paged
    from msa_kernels.triton import decode_attention
    from msa_kernels.triton._attn_cases import build_case, rel_error

    seqs, hq, hkv, dim, cache, style, cfg, fused, q_dtype = CASES[name]
    c = build_case(seqs, [1] * len(seqs), hq, hkv, dim=dim, dtype=q_dtype,
                   cache_dtype=torch.float8_e4m3fn if cache else None, style=style)
    if cfg:
        os.environ["MSA_DECODE_CHUNK"], os.environ["MSA_DECODE_NSPLIT"] = map(str, cfg)
    if name.endswith("_per_unit_lookup"):
        os.environ["MSA_DECODE_PAGES_FIRST"] = "0"
    worst = 0.0
    if name.endswith("_byte_loads"):
        os.environ["MSA_FP8_WORDS"] = "0"
        if q_dtype == torch.bfloat16:
            # bf16 q on fp8 K bytes with the products in fp16 (MSA_FP8_F16=both). The byte path's default (bf16
            # products) is checked on the GPU only: the interpreter widens e4m3 to bf16 wrongly (error ~1e8).
            os.environ["MSA_FP8_F16"] = "both"
    for _ in range(2):  # the second call reuses the plan's partials and tickets: they must be left clean
        out = torch.full_like(c.q, float("nan"))
        decode_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, c.selected, None, c.k_scale,
                                          c.v_scale, fused_merge=fused, out=out)
        ref = sparse_attention_paged(c.plan, c.q, c.k_cache, c.v_cache, c.selected, None, c.k_scale, c.v_scale)
        worst = max(worst, rel_error(out, ref))
        for bufs in c.plan.extras.values():
            bufs[0].fill_(float("nan"))
            bufs[1].fill_(float("nan"))
    for var in ("MSA_DECODE_CHUNK", "MSA_DECODE_NSPLIT", "MSA_FP8_F16", "MSA_DECODE_PAGES_FIRST", "MSA_FP8_WORDS"):
        os.environ.pop(var, None)
    return worst


@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    return run_interpreter_child(__file__, timeout=600)


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_matches_reference_in_interpreter(interpreter_report: dict, name: str) -> None:
    row = interpreter_report.get(name)
    assert row is not None, f"case {name} missing from the child's report"
    assert "error" not in row, row.get("error")
    bound = BOUND[CASES[name][8]]
    assert row["rel_err"] < bound, f"{name}: relative error {row['rel_err']:.3g} >= {bound}"


def test_decode_rejects_bad_inputs() -> None:
    from msa_kernels import MSAInputError
    from msa_kernels.triton import decode_attention
    from msa_kernels.triton._attn_cases import build_case

    c = build_case([300, 700], [1, 1], 8, 2, dim=64, dtype=torch.float16)
    with pytest.raises(MSAInputError, match="int32"):
        decode_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, c.selected.long())
    with pytest.raises(MSAInputError, match="selected"):
        decode_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, c.selected[:, :1])
    with pytest.raises(MSAInputError, match="KV groups"):
        decode_attention.sparse_attention(c.plan, c.q[:, :7], c.k_cache, c.v_cache, c.selected)
    with pytest.raises(MSAInputError, match="dtype"):
        decode_attention.sparse_attention(c.plan, c.q, c.k_cache.float(), c.v_cache.float(), c.selected)
    with pytest.raises(MSAInputError, match="k_scale"):
        f8 = c.k_cache.to(torch.float8_e4m3fn)
        decode_attention.sparse_attention(c.plan, c.q, f8, f8, c.selected)
    ext = build_case([300], [5], 16, 1, dim=64, dtype=torch.float16)
    with pytest.raises(MSAInputError, match="one new token"):
        decode_attention.sparse_attention(ext.plan, ext.q, ext.k_cache, ext.v_cache, ext.selected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads", [(64, 4), (16, 1), (8, 1)])
@pytest.mark.parametrize("cache", [None, "fp8", "fp8_bytes"])
def test_decode_full_shapes_on_gpu(heads: tuple[int, int], cache: str | None, monkeypatch) -> None:
    from msa_kernels.triton import decode_attention
    from msa_kernels.triton._attn_cases import build_case, rel_error
    from msa_kernels.triton._attn_gpucheck import gathered_reference

    hq, hkv = heads
    seqs = [61000, 300, 128, 2048, 5000, 129] + [60000] * 26
    c = build_case(seqs, [1] * len(seqs), hq, hkv, dtype=torch.bfloat16,
                   cache_dtype=torch.float8_e4m3fn if cache else None, device="cuda")
    ref = gathered_reference(c)
    if cache == "fp8_bytes":  # the byte loads kept for caches not laid out in whole words
        monkeypatch.setenv("MSA_FP8_WORDS", "0")
    for fused in (True, False):
        out = torch.full_like(c.q, float("nan"))
        decode_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, c.selected, None, c.k_scale,
                                          c.v_scale, fused_merge=fused, out=out)
        assert rel_error(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_replays_in_cuda_graph() -> None:
    """Captured once, replayed on new selections: tickets must reset and partials must not go stale."""
    from msa_kernels.triton import decode_attention
    from msa_kernels.triton._attn_cases import build_case, random_selection, rel_error
    from msa_kernels.triton._attn_gpucheck import gathered_reference

    c = build_case([60000, 9000, 300, 129], [1] * 4, 64, 4, dtype=torch.bfloat16, device="cuda")
    sel = c.selected.clone()
    decode_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, sel)  # buffers made before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, sel)
    gen = torch.Generator("cuda").manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    for _ in range(3):
        sel.copy_(random_selection(c.plan.q_pos, 4, "random", gen))
        out.fill_(float("nan"))
        graph.replay()
        c.selected = sel
        assert rel_error(out, gathered_reference(c)) < 1e-2


if __name__ == "__main__" and "--child" in sys.argv:
    for case in CASES:
        try:
            print(json.dumps({"name": case, "rel_err": _run_case(case)}), flush=True)
        except Exception as exc:  # reported per case, so one failure does not hide the others
            print(json.dumps({"name": case, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
