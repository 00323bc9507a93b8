"""Block-sparse extend/prefill attention (msa_kernels.triton.extend_attention) against the reference.

Both passes are exercised: the tile-union walk (high overlap) and the KV-block-major pass (little overlap),
forced one way or the other with `union_max`. On the CPU the kernels run under the Triton interpreter in one
child process (this file run as a script); full M3 shapes run on a GPU (marked `gpu`).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from interpreter_child import interpreter_report as run_interpreter_child

# name -> (seq_lens, q_lens, q heads, kv heads, head dim, cache dtype, style, union_max, wide pass, TMA loads)
CASES = {
    "mixed_lengths_hybrid": ([2100, 129, 300], [20, 129, 17], 16, 1, 64, None, "random", 30, None, True),
    "mixed_lengths_union_walk_only": ([2100, 129, 300], [20, 129, 17], 16, 1, 64, None, "random", 10**9, None, True),
    "mixed_lengths_query_pass_only": ([2100, 129, 300], [20, 129, 17], 16, 1, 64, None, "random", -1, None, True),
    "high_overlap_kv_major_only": ([2500, 300], [24, 9], 16, 1, 64, None, "recent", -1, "kv_major", True),
    "group4_two_kv_heads_d128": ([3000, 2500], [5, 9], 8, 2, 128, None, "random", 20, None, True),
    "group4_kv_major": ([3000, 2500], [5, 9], 8, 2, 64, None, "random", 20, "kv_major", True),
    "fp8_cache_kv_major": ([2000, 700], [10, 30], 16, 1, 64, "fp8", "random", 24, "kv_major", True),
    # 130 queries in chunks of 16 (kv_major_pass sorts all chunks at once): chunk slices across two requests
    "kv_major_many_chunks": ([3000, 400], [100, 30], 16, 1, 64, None, "random", -1, "kv_major", True),
    # hot blocks picked by all 100 queries: runs longer than one KV-major segment (8 chunks x 8 queries)
    "kv_major_long_runs": ([3000, 400], [100, 3], 16, 1, 64, None, "recent", -1, "kv_major", True),
    "exactly_16_blocks_and_empty_prefix": ([2048, 200], [3, 200], 16, 1, 64, None, "random", None, None, True),
    "fp8_cache": ([2000, 700], [10, 30], 16, 1, 64, "fp8", "random", 24, None, True),
    # 64-row tiles (4 queries x 16 heads; the default is 128): MSA_EXTEND_TILE_ROWS=64
    "tiles_of_64_rows": ([2100, 129], [20, 40], 16, 1, 64, None, "random", 30, None, True),
    # the gathered (pointer) loads that TMA replaces on whole pages, kept for caches TMA cannot address
    "mixed_lengths_gather_loads": ([2100, 129, 300], [20, 129, 17], 16, 1, 64, None, "random", 30, None, False),
    "fp8_cache_gather_loads": ([2000, 700], [10, 30], 16, 1, 64, "fp8", "random", 24, None, False),
    # fp8 caches run on 16-bit copies of the batch's pages (triton.widen); these keep the kernels' own fp8 paths:
    # widening off (MSA_FP8_WIDEN=0), and a batch over the widening cap (MSA_FP8_WIDEN_MAX_MB=0)
    "fp8_cache_no_widen": ([2000, 700], [10, 30], 16, 1, 64, "fp8", "random", 24, None, True),
    "fp8_cache_kv_major_no_widen": ([2000, 700], [10, 30], 16, 1, 64, "fp8", "random", 24, "kv_major", True),
    "fp8_cache_over_widen_cap": ([2100, 129, 300], [20, 129, 17], 16, 1, 64, "fp8", "random", 30, None, True),
    # queries scaled by Q_GAIN: row maxima jump by several powers of two between blocks, so the O tile must be
    # rescaled mid-walk (a walk that rescaled only when a row max moved by more than 2^8 passed every other case)
    "wide_score_range": ([2100, 300], [20, 17], 16, 1, 64, None, "random", 30, None, True),
}
Q_GAIN = {"wide_score_range": 24.0}
BOUND = 2e-3  # fp16 q/k/v, fp32 accumulation (fp16 partials in the KV-major pass)


def _run_case(name: str) -> float:
    from msa_kernels.reference import sparse_attention_paged
    from msa_kernels.triton import extend_attention
    from msa_kernels.triton._attn_cases import build_case, rel_error

    seqs, qls, hq, hkv, dim, cache, style, union_max, wide_pass, tma = CASES[name]
    c = build_case(seqs, qls, hq, hkv, dim=dim, dtype=torch.float16,
                   cache_dtype=torch.float8_e4m3fn if cache else None, style=style)
    c.q = (c.q.float() * Q_GAIN.get(name, 1.0)).to(c.q.dtype)
    out = torch.full_like(c.q, float("nan"))
    if name == "tiles_of_64_rows":
        os.environ["MSA_EXTEND_TILE_ROWS"] = "64"
    if name.endswith("_no_widen"):
        os.environ["MSA_FP8_WIDEN"] = "0"
    if name.endswith("_over_widen_cap"):
        os.environ["MSA_FP8_WIDEN_MAX_MB"] = "0"
    from msa_kernels.triton import _attn_kvmajor

    chunk_tokens = _attn_kvmajor._CHUNK_TOKENS
    if name == "kv_major_many_chunks":
        _attn_kvmajor._CHUNK_TOKENS = 16
    try:
        extend_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, c.selected, None, c.k_scale,
                                          c.v_scale, out=out, union_max=union_max, wide_pass=wide_pass, tma=tma)
    finally:  # the next case runs in this process with the defaults
        for var in ("MSA_EXTEND_TILE_ROWS", "MSA_FP8_WIDEN", "MSA_FP8_WIDEN_MAX_MB"):
            os.environ.pop(var, None)
        _attn_kvmajor._CHUNK_TOKENS = chunk_tokens
    ref = sparse_attention_paged(c.plan, c.q, c.k_cache, c.v_cache, c.selected, None, c.k_scale, c.v_scale)
    return rel_error(out, ref)


@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    return run_interpreter_child(__file__, timeout=900)


@pytest.mark.parametrize("name", sorted(CASES))
def test_extend_matches_reference_in_interpreter(interpreter_report: dict, name: str) -> None:
    row = interpreter_report.get(name)
    assert row is not None, f"case {name} missing from the child's report"
    assert "error" not in row, row.get("error")
    assert row["rel_err"] < BOUND, f"{name}: relative error {row['rel_err']:.3g} >= {BOUND}"


def test_extend_rejects_bad_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    from msa_kernels import MSAInputError
    from msa_kernels.triton import extend_attention
    from msa_kernels.triton._attn_cases import build_case

    c = build_case([300, 700], [5, 7], 16, 1, dim=64, dtype=torch.float16)
    with pytest.raises(MSAInputError, match="tokens"):
        extend_attention.sparse_attention(c.plan, c.q[:-1], c.k_cache, c.v_cache, c.selected[:-1])
    with pytest.raises(MSAInputError, match="int32"):
        extend_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, c.selected.long())
    with pytest.raises(MSAInputError, match="slots"):
        extend_attention.sparse_attention(c.plan, c.q, c.k_cache[:-1], c.v_cache[:-1], c.selected)
    with pytest.raises(MSAInputError, match="out"):
        extend_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, c.selected, out=c.q[:, :8])
    monkeypatch.setenv("MSA_EXTEND_TILE_ROWS", "256")
    with pytest.raises(MSAInputError, match="MSA_EXTEND_TILE_ROWS"):
        extend_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, c.selected)


def test_tiles_cover_every_query_once() -> None:
    """The tile list (built with tensor ops) against a plain walk over each request's queries, with requests
    of 0, 1, fewer than a tile and many tiles of new tokens."""
    from msa_kernels import plan as make_plan
    from msa_kernels.triton import extend_attention

    seqs, qls = [300, 129, 2100, 5, 1000], [17, 0, 20, 5, 999]
    pt = torch.arange(len(seqs) * 20, dtype=torch.int32).view(len(seqs), 20)
    p = make_plan(pt, seqs, qls)
    for qg in (1, 4, 8, 16):
        req, q0, qn, tile_of = (t.tolist() for t in extend_attention._tiles(p, qg, torch.device("cpu")))
        want, start = [], 0
        for b, n in enumerate(qls):
            want += [(b, start + lo, min(qg, n - lo)) for lo in range(0, n, qg)]
            start += n
        assert list(zip(req, q0, qn)) == want, qg
        assert tile_of == [i for i, (_, _, n) in enumerate(want) for _ in range(n)], qg


def test_tile_rows_default_and_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    from msa_kernels import MSAInputError
    from msa_kernels.triton import extend_attention as ea

    monkeypatch.delenv("MSA_EXTEND_TILE_ROWS", raising=False)
    assert ea.tile_rows() == ea.TILE_ROWS == 128
    assert ea.queries_per_tile(16) == 8 and ea.queries_per_tile(8) == 16 and ea.queries_per_tile(2) == 16
    monkeypatch.setenv("MSA_EXTEND_TILE_ROWS", "64")
    assert ea.queries_per_tile(16) == 4 and ea.queries_per_tile(64) == 1
    monkeypatch.setenv("MSA_EXTEND_TILE_ROWS", "8")
    with pytest.raises(MSAInputError, match="MSA_EXTEND_TILE_ROWS"):
        ea.tile_rows()


def test_tma_descriptors_only_for_addressable_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    from msa_kernels import MSAInputError
    from msa_kernels.triton._attn_common import kv_descriptors

    k = torch.randn(256, 2, 64, dtype=torch.float16)
    assert kv_descriptors(k, k, 64, True) is not None
    assert kv_descriptors(k, k, 64, False) is None
    packed = torch.randn(256, 2, 2, 64, dtype=torch.float16)[:, :, 0]  # heads not adjacent: no 2D tile view
    assert kv_descriptors(packed, packed, 64, True) is None
    monkeypatch.setenv("MSA_TMA", "0")
    assert kv_descriptors(k, k, 64, None) is None
    monkeypatch.setenv("MSA_TMA", "yes")
    with pytest.raises(MSAInputError, match="MSA_TMA"):
        kv_descriptors(k, k, 64, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads", [(64, 4), (16, 1), (8, 1)])
@pytest.mark.parametrize("cache", [None, "fp8", "fp8_no_widen"])
@pytest.mark.parametrize("style", ["random", "recent"])
def test_extend_full_shapes_on_gpu(heads: tuple[int, int], cache: str | None, style: str, monkeypatch) -> None:
    from msa_kernels.triton import extend_attention
    from msa_kernels.triton._attn_cases import build_case, rel_error
    from msa_kernels.triton._attn_gpucheck import gathered_reference

    hq, hkv = heads
    c = build_case([61952, 1000, 300], [2048, 1000, 17], hq, hkv, dtype=torch.bfloat16,
                   cache_dtype=torch.float8_e4m3fn if cache else None, style=style, device="cuda")
    ref = gathered_reference(c)
    if cache == "fp8_no_widen":  # the kernels' own fp8 paths (batches over the widening cap take them)
        monkeypatch.setenv("MSA_FP8_WIDEN", "0")
    settings = [(None, None, True), (None, None, False), (-1, "query", True), (-1, "kv_major", True),
                (10**9, None, True)]
    for union_max, wide_pass, tma in settings:
        out = torch.full_like(c.q, float("nan"))
        extend_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, c.selected, None, c.k_scale,
                                          c.v_scale, out=out, union_max=union_max, wide_pass=wide_pass, tma=tma)
        assert rel_error(out, ref) < 1e-2, (union_max, wide_pass, tma)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("style", ["random", "recent"])
def test_extend_wide_score_range_on_gpu(style: str) -> None:
    """M3 shapes with queries scaled up, so that row maxima jump by several powers of two mid-walk (random data
    at gain 1 keeps every score within a few units of its row's first block)."""
    from msa_kernels.triton import extend_attention
    from msa_kernels.triton._attn_cases import build_case, rel_error
    from msa_kernels.triton._attn_gpucheck import gathered_reference

    c = build_case([61952, 1000], [2048, 300], 64, 4, dtype=torch.bfloat16, style=style, device="cuda")
    c.q = (c.q.float() * 24.0).to(c.q.dtype)
    ref = gathered_reference(c)
    for union_max in (None, -1, 10**9):
        out = torch.full_like(c.q, float("nan"))
        extend_attention.sparse_attention(c.plan, c.q, c.k_cache, c.v_cache, c.selected, out=out,
                                          union_max=union_max)
        assert rel_error(out, ref) < 1e-2, union_max


if __name__ == "__main__" and "--child" in sys.argv:
    for case in CASES:
        try:
            print(json.dumps({"name": case, "rel_err": _run_case(case)}), flush=True)
        except Exception as exc:  # reported per case, so one failure does not hide the others
            print(json.dumps({"name": case, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
