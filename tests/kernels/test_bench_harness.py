"""The MSA benchmark harness's case construction and roofline math, on the CPU (no timing assertions)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "kernels" / "bench_msa.py"
    spec = importlib.util.spec_from_file_location("bench_msa_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_decode_bytes_match_the_brief_formula(bench):
    # perf_anchors.md 3.2: B x (256 N + 4 MiB) for private contexts once N >= 2048.
    for b, n in [(1, 60000), (8, 262144), (32, 8192)]:
        assert bench.decode_touched_bytes(b, n) == b * (256 * n + 4 * 2**20)
    # Short contexts select every block they have.
    assert bench.decode_touched_bytes(1, 1000) == 256 * 1000 + 4 * 1000 * 2 * 128 * 2
    # Shared prefix: the index-K of the shared pages once, plus each request's private tail and K/V.
    shared = bench.decode_touched_bytes(8, 60000, shared_prefix=True)
    tail = 60000 - 468 * 128
    assert shared == 256 * 60000 + 7 * 256 * tail + 8 * 4 * 2**20
    assert bench.decode_touched_bytes(32, 60000, fp8=True) * 2 == bench.decode_touched_bytes(32, 60000)
    assert bench.dense_decode_bytes(1, 60000) == 2048 * 60000


def test_extend_flops_match_the_research_notes(bench):
    # upstream_msa_h100.md 3: 137 GFLOP of useful attention and 128 GFLOP of indexing per 2k-token extend.
    attn = bench.sparse_attn_flops_upper(59904, 2048)
    assert attn == 16 * 128 * 64 * 128 * 4 * 2048
    assert abs(attn / 1e9 - 137.4) < 0.1
    idx = bench.index_flops(59904, 2048)
    assert abs(idx / 1e9 - 128) < 1.5
    assert bench.index_flops(59904, 2048, batch=8) == 8 * idx
    # Causal sum: positions p .. p+n-1 see p+1 .. p+n keys.
    assert bench.causal_key_sum(0, 4) == 1 + 2 + 3 + 4
    assert bench.causal_key_sum(10, 3) == 11 + 12 + 13
    # Prefill from 0: queries below 2048 see pos+1 keys, later ones 2048.
    n = 5000
    want = sum(min(p + 1, 2048) for p in range(n)) * 64 * 128 * 4
    assert bench.sparse_attn_flops_upper(0, n) == want
    assert bench.dense_flops(0, n) == sum(p + 1 for p in range(n)) * 64 * 128 * 4


def test_exact_attention_flops_count_causal_keys(bench):
    # One query at position 300 selecting blocks 0, 1, 2 (its own block holds 300 - 256 + 1 = 45 keys).
    sel = torch.tensor([[[0, 1, 2] + [-1] * 13]], dtype=torch.int32)
    pos = torch.tensor([300])
    assert bench.sparse_attn_flops_exact(sel, pos) == (128 + 128 + 45) * 16 * 128 * 4


def test_roofline_and_rotation(bench):
    assert bench.bound_us(1e12, 1e9, 1e15, 1e12) == pytest.approx(1000.0)
    assert bench.bound_us(1e9, 3e12, 1e15, 3e12) == pytest.approx(1e6)
    assert bench.rotation_sets(6 * 2**20) == 32  # small sets: rotate many
    assert bench.rotation_sets(300 * 10**6) == 1  # bigger than 4x L2: one set
    assert bench.rotation_sets(20 * 10**6) == 10


def test_case_grids(bench):
    full = bench.decode_cases("full")
    assert {(c.batch, c.context) for c in full if not c.shared_prefix} == {
        (b, n) for b in (1, 8, 32) for n in (8192, 60000, 262144, 1 << 20)}
    assert any(c.shared_prefix and c.batch == 8 and c.context == 60000 for c in full)
    ext = bench.extend_cases("full")
    assert {(c.batch, c.selection) for c in ext} == {(1, "random"), (1, "overlap"), (8, "random"), (8, "overlap")}
    assert all(c.prefix == 59904 and c.new_tokens == 2048 for c in ext)
    assert bench.prefill_cases("full")[0].new_tokens == 65536
    assert bench.fp8_cases("full")[0].batch == 32


def test_page_table_and_inputs(bench):
    gen = torch.Generator().manual_seed(0)
    table, pages = bench.make_page_table([1000, 1000, 1000], shared_prefix=True, gen=gen)
    assert table.shape == (3, 8)
    assert torch.equal(table[0, :7], table[1, :7]) and torch.equal(table[0, :7], table[2, :7])
    assert len({int(table[r, 7]) for r in range(3)}) == 3  # private last pages
    assert int(table.min()) >= 1 and int(table.max()) < pages  # page 0 unused
    table, pages = bench.make_page_table([300, 700], shared_prefix=False, gen=gen)
    used = torch.cat([table[0, :3], table[1, :6]])
    assert used.unique().numel() == used.numel()

    inp = bench.build_inputs([300, 700], [1, 50], False, "cpu", seed=3)
    assert inp.q.shape == (51, 64, 128) and inp.q_idx.shape == (51, 4, 128)
    assert inp.k_cache.shape[0] % 128 == 0 and inp.idx_k_cache.shape[1:] == (1, 128)
    # upstream's req_to_token agrees with the page table
    for r, n in enumerate([300, 700]):
        p = torch.arange(n)
        want = inp.page_table[r].long()[p // 128] * 128 + p % 128
        assert torch.equal(inp.req_to_token[r, :n].long(), want)
    assert inp.q_pos.tolist() == [299] + list(range(650, 700))
    assert inp.cu_seqlens.tolist() == [0, 1, 51] and inp.prefix_lens.tolist() == [299, 650]

    # "overlap" inputs rank every query's recent blocks first
    ov = bench.build_inputs([1500], [4], False, "cpu", seed=4, selection="overlap")
    pos = bench.slot_positions(ov.page_table.cpu(), [1500], ov.k_cache.shape[0] // 128)
    blk = ov.idx_k_cache[:, 0, 0].float()
    assert torch.equal(blk[pos >= 0], (pos[pos >= 0] // 128).float())

    f8 = bench.to_fp8(inp)
    assert f8.k_cache.dtype == torch.float8_e4m3fn and f8.k_scale > 0
    deq = f8.k_cache.float() * f8.k_scale
    assert (deq - inp.k_cache.float()).abs().max() < 0.1 * inp.k_cache.float().abs().max()


def test_random_selection_and_agreement(bench):
    pos = torch.tensor([5, 130, 1000, 5000])
    sel = bench.random_selection(pos, heads=4, seed=1)
    assert sel.shape == (4, 4, 16) and sel.dtype == torch.int32
    for t, p in enumerate(pos.tolist()):
        for h in range(4):
            row = [b for b in sel[t, h].tolist() if b >= 0]
            assert row == sorted(set(row)) and p // 128 in row
            assert all(b <= p // 128 for b in row)
            assert len(row) == min(16, p // 128 + 1)
    assert bench.selection_agreement(sel, sel) == 1.0
    other = sel.clone()
    other[3, :, 0] = 4000  # a block no row holds: one of 16 differs in each of that token's rows
    assert bench.selection_agreement(other, sel) == pytest.approx(1 - 4 / (16 * 16))
    assert bench.distinct_blocks_per_tile(sel[:1]) == 1.0  # position 5 sees block 0 only
    assert bench.distinct_blocks_per_tile(sel[3:4]) == 16.0


def test_dense_causal_two_part_equals_direct_math(bench):
    """The cuDNN-style two-part (prefix + causal new part, LSE merge) computes bottom-right causal attention;
    checked with the math identity on the CPU by replacing the fused ops with a float reference."""
    torch.manual_seed(0)
    b, prefix, new = 1, 256, 64
    q = torch.randn(b, new, 64, 128)
    k = torch.randn(b, prefix + new, 4, 128)
    v = torch.randn(b, prefix + new, 4, 128)
    out = torch.empty(b, 64, new, 128)
    for r in range(new):
        n = prefix + r + 1
        qq = q[0, r].view(4, 16, 128)
        logit = torch.einsum("gnd,sgd->gns", qq, k[0, :n]) * 128**-0.5
        out[0, :, r] = torch.einsum("gns,sgd->gnd", logit.softmax(-1), v[0, :n]).reshape(64, 128)
    # The harness's own spot check must call this exact result correct.
    assert bench.Bench._dense_spot_check(None, out, q, k, v, prefix) < 1e-5


def test_kernel_sweep_parser_groups_settings_per_call_case_and_kernel(tmp_path):
    path = ROOT / "benchmarks" / "kernels" / "plot_kernel_sweep.py"
    spec = importlib.util.spec_from_file_location("plot_kernel_sweep_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(
        "# call 1, NVIDIA H200, 580.159.04\n"
        "extend_b1_overlap          MSA_TMA=0          extend attention    467.2 us/layer\n"
        "extend_b1_overlap          MSA_EXTEND_WS=1    extend attention        0 us/layer\n"
        "# call 2, NVIDIA H100 80GB HBM3, 580.159.04\n"
        "decode_b1_60k              MSA_TMA=1          _score_kernel         5.5 us/layer\n"
        "decode_b1_60k              MSA_NONE=1         _score_kernel         6.25 us/layer\n"
    )
    groups = mod.parse(str(sweep))
    assert groups == {
        ("call 1, H200", "extend_b1_overlap", "attention"): [("MSA_TMA=0", 467.2)],  # the failed setting (0) is out
        ("call 2, H100 80GB HBM3", "decode_b1_60k", "scoring"): [("MSA_TMA=1", 5.5), ("defaults", 6.25)],
    }
