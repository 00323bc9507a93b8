"""Store + index top-k on a CUDA GPU at M3's full shapes (run by hand on the lent H100; never in CI).

The checks live in msa_kernels.triton._topk_gpucheck, which also runs standalone on the device machine
(where pytest may be missing): PYTHONPATH=kernels python -m msa_kernels.triton._topk_gpucheck.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _fresh_log():
    from msa_kernels.triton import _topk_gpucheck

    _topk_gpucheck.LOG.clear()
    _topk_gpucheck.BUDGET_S = float("inf")
    yield


def test_store_matches_reference_bitwise():
    from msa_kernels.triton._topk_gpucheck import check_store

    check_store()


@pytest.mark.parametrize("case", [
    "decode B1 60k H4", "decode B8 shared 60k H4", "decode B8 shared 60k H1", "decode B32 mixed H4",
    "decode B32 mixed H2", "decode B8 60k fp8", "extend B1 2048+59904 H4", "extend mixed short/long H1",
    "prefill 8k H4", "extend 2048+20k fp8 H4", "extend shared prefix fp8 H4",
])
def test_selection_matches_reference(case):
    from msa_kernels.triton import _topk_gpucheck as g

    seqs, qls, heads, shared, kdt = g.SELECTION_CASES[case]
    p, q_idx, kc = g.make_batch(seqs, qls, heads, shared_blocks=shared, q_dtype=torch.bfloat16, k_dtype=kdt,
                                device="cuda")
    got = g.run_poisoned(p, q_idx, kc)
    g.check_selection(p, q_idx, kc, got)


@pytest.mark.parametrize("case", ["extend 2048+20k fp8 H4", "extend shared prefix fp8 H4"])
def test_fp8_extend_selection_unwidened(case, monkeypatch):
    """The scoring kernel's own fp8 path for extend (batches over the widening cap take it; MSA_FP8_WIDEN=0)."""
    from msa_kernels.triton import _topk_gpucheck as g

    monkeypatch.setenv("MSA_FP8_WIDEN", "0")
    seqs, qls, heads, shared, kdt = g.SELECTION_CASES[case]
    p, q_idx, kc = g.make_batch(seqs, qls, heads, shared_blocks=shared, q_dtype=torch.bfloat16, k_dtype=kdt,
                                device="cuda")
    g.check_selection(p, q_idx, kc, g.run_poisoned(p, q_idx, kc))


def test_decode_graph_replay():
    from msa_kernels.triton._topk_gpucheck import check_graph_replay

    check_graph_replay()
