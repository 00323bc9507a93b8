"""Shared-prefix dense decode (msa_kernels.triton.dense_decode) against the reference.

On the CPU the kernels run under the Triton interpreter in one child process (this file run as a script); each
pytest case checks its line of the child's report: the output against `reference.dense_decode`, the device's
sharing map against `reference.chunk_leaders`, and that chunks really were shared where the case shares them.
Every buffer the kernels write (output, leaders, partials) is poisoned first. Full M3 shapes run on a GPU.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from interpreter_child import interpreter_report as run_interpreter_child

# name -> (q heads, kv heads, head dim, dtype, shared prefix, tails of the requests sharing it, private lengths,
#          chunk, page-aligned slots). Every case draws its slots at random: scattered slots, or whole 128-slot
#          pages in random order (SGLang's paged allocator). fp16 only: the interpreter's bf16 tl.dot is wrong
#          (errors ~1e10 on a plain 16x16 product, Triton 3.8); bf16 runs in the GPU tests below.
CASES = {
    "prefix_2500_mixed_tails_empty_request": (16, 2, 64, torch.float16, 2500, [5, 300, 0, 1200], [700, 0], 256, False),
    "m3_group16_exactly_16_blocks": (16, 1, 128, torch.float16, 2048, [0, 1, 130], [1000, 129, 1], None, True),
    "twenty_members_three_tiles": (16, 1, 64, torch.float16, 1024, [3, 60, 1, 0, 17] * 4, [], 128, True),
    "mha_group1": (4, 4, 32, torch.float16, 640, [7, 0, 100], [90], 128, False),
    "no_sharing_at_all": (8, 2, 64, torch.float16, 0, [], [1500, 129, 2], 256, False),
    "identical_requests": (8, 1, 64, torch.float16, 700, [0, 0], [300], 128, True),
}
BOUND = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def build(name: str, device: str = "cpu", gen: torch.Generator | None = None):
    """q, k/v caches (unused slots NaN), kv_indptr, kv_indices for a case."""
    hq, hkv, dim, dtype, prefix, tails, private, _, paged = CASES[name]
    lengths = [prefix + t for t in tails] + private
    need = prefix + sum(tails) + sum(private)
    num_slots = 128 * (need // 128 + len(lengths) + 8)
    if paged:  # whole pages in random order, each request's tail starting on a fresh page
        pages = torch.randperm(num_slots // 128, generator=gen)
        order = (pages[:, None] * 128 + torch.arange(128)).reshape(-1)
    else:
        order = torch.randperm(num_slots, generator=gen)
    cursor = 0

    def take(n: int) -> torch.Tensor:
        nonlocal cursor
        if paged:
            cursor = -(-cursor // 128) * 128
        out = order[cursor:cursor + n]
        cursor += n
        return out

    shared = take(prefix)
    rows = [torch.cat([shared, take(t)]) for t in tails] + [take(n) for n in private]
    indptr = torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    indices = torch.cat(rows).to(torch.int32) if rows else torch.zeros(0, dtype=torch.int32)
    k = torch.full((num_slots, hkv, dim), float("nan"), dtype=dtype)
    v = torch.full_like(k, float("nan"))
    used = indices.long()
    k[used] = torch.randn(used.numel(), hkv, dim, generator=gen).to(dtype)
    v[used] = torch.randn(used.numel(), hkv, dim, generator=gen).to(dtype)
    q = torch.randn(len(lengths), hq, dim, generator=gen).to(dtype)
    return [t.to(device) for t in (q, k, v, indptr, indices)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def _run_case(name: str) -> dict:
    from msa_kernels import reference
    from msa_kernels.triton import dense_decode as dd

    q, k, v, indptr, indices = build(name)
    max_len = max(int((indptr[1:] - indptr[:-1]).max()), 1)
    chunk = CASES[name][7] or dd.chunk_size(max_len)
    nch = -(-max_len // chunk)
    batch, hq, dim = q.shape
    worst, leaders_ok = 0.0, True
    want = reference.dense_decode(q, k, v, indptr, indices)
    want_leaders = reference.chunk_leaders(indptr, indices, chunk, nch)
    for _ in range(2):  # nothing carries over between calls
        ws = (torch.full((nch, batch), -7, dtype=torch.int32), torch.full((batch, hq, nch, dim), float("nan")),
              torch.full((batch, hq, nch), float("nan")))
        out = torch.full_like(q, float("nan"))
        dd.dense_decode(q, k, v, indptr, indices, None, max_len, out=out, chunk=CASES[name][7], workspace=ws)
        worst = max(worst, rel_err(out, want))
        leaders_ok &= torch.equal(ws[0], want_leaders)
    rows = torch.arange(batch)[None, :]
    shared = int(((want_leaders >= 0) & (want_leaders != rows)).sum())
    return {"rel_err": worst, "leaders_equal": leaders_ok, "shared_chunks": shared}


def _run_max_len_too_small() -> dict:
    """A caller that passes a max_len below a request's length: keys past the chunks it spans are ignored (the
    kernels must not index past the sharing map or the partials), so the result is attention over those chunks."""
    from msa_kernels import reference
    from msa_kernels.triton import dense_decode as dd

    q, k, v, indptr, indices = build("prefix_2500_mixed_tails_empty_request")
    chunk, max_len = 256, 1000  # 4 chunks: keys 0..1023 of each request
    lengths = (indptr[1:] - indptr[:-1]).clamp(max=1024)
    kept = torch.cat([indices[int(a):int(a) + int(n)] for a, n in zip(indptr[:-1], lengths)])
    kept_indptr = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    want = reference.dense_decode(q, k, v, kept_indptr, kept)
    out = torch.full_like(q, float("nan"))
    dd.dense_decode(q, k, v, indptr, indices, None, max_len, out=out, chunk=chunk)
    return {"rel_err": rel_err(out, want), "leaders_equal": True, "shared_chunks": -1}


def test_keys_past_max_len_are_ignored_not_overrun(interpreter_report: dict) -> None:
    row = interpreter_report.get("max_len_too_small")
    assert row is not None and "error" not in row, row
    assert row["rel_err"] < BOUND[torch.float16], row


@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    return run_interpreter_child(__file__, timeout=900)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dense_decode_matches_reference_in_interpreter(interpreter_report: dict, name: str) -> None:
    row = interpreter_report.get(name)
    assert row is not None, f"case {name} missing from the child's report"
    assert "error" not in row, row.get("error")
    bound = BOUND[CASES[name][3]]
    assert row["rel_err"] < bound, f"{name}: relative error {row['rel_err']:.3g} >= {bound}"
    assert row["leaders_equal"], f"{name}: the device's sharing map differs from the reference's"
    shares = CASES[name][4] > 0 and len(CASES[name][5]) > 1
    assert (row["shared_chunks"] > 0) == shares, row


def test_reference_leaders_share_only_complete_identical_chunks() -> None:
    from msa_kernels.reference import chunk_leaders

    indptr = torch.tensor([0, 300, 600, 850, 1150])
    same = torch.arange(300)
    other = torch.arange(1000, 1300)
    indices = torch.cat([same, same, same[:250], torch.cat([same[:128], other[:172]])])
    got = chunk_leaders(indptr, indices, 128, 3)
    # chunk 0: all four list slots 0..127; chunk 1: requests 0 and 1 agree, request 2's is partial (250 keys),
    # request 3's lists other slots; chunk 2: partial everywhere, and past request 2's end.
    assert got.tolist() == [[0, 0, 0, 0], [0, 0, 2, 3], [0, 1, -1, 3]]


def test_reference_matches_plain_attention() -> None:
    from msa_kernels.reference import dense_decode

    q = torch.randn(2, 4, 16, dtype=torch.float64)
    k = torch.randn(10, 2, 16, dtype=torch.float64)
    v = torch.randn(10, 2, 16, dtype=torch.float64)
    indptr = torch.tensor([0, 3, 3])
    indices = torch.tensor([7, 2, 5])
    out = dense_decode(q, k, v, indptr, indices)
    kk, vv = k[[7, 2, 5]].repeat_interleave(2, 1), v[[7, 2, 5]].repeat_interleave(2, 1)
    p = torch.einsum("hd,lhd->hl", q[0], kk).mul(16 ** -0.5).softmax(-1)
    assert torch.allclose(out[0], torch.einsum("hl,lhd->hd", p, vv))
    assert torch.equal(out[1], torch.zeros(4, 16, dtype=torch.float64))  # no keys: zeros


def test_dense_decode_rejects_bad_inputs() -> None:
    from msa_kernels import MSAInputError
    from msa_kernels.triton import dense_decode as dd

    q, k, v, indptr, indices = build("mha_group1")
    with pytest.raises(MSAInputError, match="KV heads"):
        dd.dense_decode(q[:, :3], k, v, indptr, indices, None, 800)
    with pytest.raises(MSAInputError, match="16-bit"):
        dd.dense_decode(q.float(), k.float(), v.float(), indptr, indices, None, 800)
    with pytest.raises(MSAInputError, match="batch \\+ 1"):
        dd.dense_decode(q, k, v, indptr[:2], indices, None, 800)
    with pytest.raises(MSAInputError, match="int32 or int64"):
        dd.dense_decode(q, k, v, indptr.float(), indices, None, 800)
    with pytest.raises(MSAInputError, match="chunk"):
        dd.dense_decode(q, k, v, indptr, indices, None, 800, chunk=100)
    q6, k6, v6 = (torch.zeros(2, 6, 32, dtype=torch.float16), torch.zeros(9, 2, 32, dtype=torch.float16),
                  torch.zeros(9, 2, 32, dtype=torch.float16))
    with pytest.raises(MSAInputError, match="powers of two"):
        dd.dense_decode(q6, k6, v6, indptr[:3], indices, None, 800)


def test_chunk_size_keeps_partials_bounded() -> None:
    from msa_kernels.triton import dense_decode as dd

    assert dd.chunk_size(60_000) == dd.DEFAULT_CHUNK
    assert dd.chunk_size(1 << 20) == (1 << 20) // dd.MAX_CHUNKS
    for n in (1, 2047, 131_072, 300_001, 1 << 20):
        assert -(-n // dd.chunk_size(n)) <= dd.MAX_CHUNKS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads", [(64, 4), (16, 1), (8, 1)])
def test_dense_decode_full_shapes_on_gpu(heads: tuple[int, int]) -> None:
    """M3's heads (and the TP4 / TP8 splits) on a 60k shared prefix, tails of mixed length, private requests."""
    from msa_kernels import reference
    from msa_kernels.triton import dense_decode as dd

    hq, hkv = heads
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    prefix, tails, private = 60_000, [1, 129, 2048, 0, 3000, 5, 77], [61_000, 300]
    lengths = [prefix + t for t in tails] + private
    pages = torch.randperm(sum(lengths) // 128 + 64, generator=gen)
    slots = (pages[:, None] * 128 + torch.arange(128)).reshape(-1)
    shared, rest = slots[:prefix], slots[prefix:]
    rows, cur = [], 0
    for t in tails:
        rows.append(torch.cat([shared, rest[cur:cur + t]]))
        cur += -(-t // 128) * 128
    for n in private:
        rows.append(rest[cur:cur + n])
        cur += -(-n // 128) * 128
    indices = torch.cat(rows).to(torch.int32).cuda()
    indptr = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32).cuda()
    num_slots = slots.numel()
    k = torch.randn(num_slots, hkv, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(len(lengths), hq, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.full_like(q, float("nan"))
    dd.dense_decode(q, k, v, indptr, indices, None, 131_072, out=out)
    want = reference.dense_decode(q, k, v, indptr, indices)
    assert rel_err(out, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dense_decode_replays_in_cuda_graph() -> None:
    """Captured once, replayed on other slot lists and lengths (sharing found anew on the device each replay)."""
    from msa_kernels import reference
    from msa_kernels.triton import dense_decode as dd

    batch, max_len, cap = 8, 131_072, 8 * 70_000
    k = torch.randn(cap + 1024, 4, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(batch, 64, 128, dtype=torch.bfloat16, device="cuda")
    indptr = torch.zeros(batch + 1, dtype=torch.int32, device="cuda")
    indices = torch.zeros(cap, dtype=torch.int32, device="cuda")

    def fill(prefix: int, tails: list[int]) -> None:
        perm = torch.randperm(cap + 1024, device="cuda")[: prefix + sum(tails)].to(torch.int32)
        rows, cur = [], prefix
        for t in tails:
            rows.append(torch.cat([perm[:prefix], perm[cur:cur + t]]))
            cur += t
        flat = torch.cat(rows)
        indices[: flat.numel()] = flat
        lens = torch.tensor([prefix + t for t in tails], device="cuda")
        indptr[1:] = lens.cumsum(0).to(torch.int32)

    fill(1000, [1] * batch)
    out = dd.dense_decode(q, k, v, indptr, indices, None, max_len)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dd.dense_decode(q, k, v, indptr, indices, None, max_len)
    for prefix, tails in ((60_000, [1, 2, 3, 200, 1, 0, 9, 4000]), (0, [5000, 1, 128, 129, 64_000, 3, 2, 1]),
                          (30_001, [0] * batch)):
        fill(prefix, tails)
        q.normal_()
        out.fill_(float("nan"))
        graph.replay()
        want = reference.dense_decode(q, k, v, indptr, indices)
        assert rel_err(out, want) < 1e-2


if __name__ == "__main__" and "--child" in sys.argv:
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))  # fresh inputs on every run
    runs = {case: (lambda c=case: _run_case(c)) for case in CASES}
    runs["max_len_too_small"] = _run_max_len_too_small
    for case, run in runs.items():
        try:
            print(json.dumps({"name": case, **run()}), flush=True)
        except Exception as exc:  # reported per case, so one failure does not hide the others
            print(json.dumps({"name": case, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
