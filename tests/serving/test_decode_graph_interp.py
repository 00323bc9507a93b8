"""The plugin's CUDA-graph decode flow (m3serve.plugin.sparse_attention) on the CPU, kernels interpreted.

SGLang's graph runner calls `init_forward_metadata_out_graph(view, in_capture=True)`, runs warm-up forwards
and captures them, then for every step writes the batch into its static buffers, calls
`init_forward_metadata_out_graph(view)` and replays. Here a fake backend and pool stand in for SGLang: the
capture-time forward builds the graph plan (sized for the longest context); each "replay" refreshes it
through the hook and runs the same kernels on the same buffers the graph would, which is what a replay
executes. Output must equal the reference on the real batch (selection up to near-ties), twice in a row
with different batches, including a padded entry (seq_len 1 on request row 0, as SGLang pads) and a
shared prefix. Fresh random inputs each run; outputs poisoned.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from interpreter_child import interpreted_main, run_interpreted

CONTEXT = 4096  # the fake pool's longest context (32 pages)
POOL_PAGES = 120


def _setup(bs: int, heads_q: int = 16, heads_kv: int = 2, dim: int = 64, idx_dim: int = 32):
    import torch

    slots = POOL_PAGES * 128
    pool = SimpleNamespace(
        k=torch.randn(slots, heads_kv, dim).half(), v=torch.randn(slots, heads_kv, dim).half(),
        ik=torch.randn(slots, 1, idx_dim).half(),
    )
    pool.get_kv_buffer = lambda layer_id: (pool.k, pool.v)
    pool.get_index_k_buffer = lambda layer_id: pool.ik
    backend = SimpleNamespace(
        req_to_token=torch.zeros(8, CONTEXT, dtype=torch.int32), topk_blocks=16, max_context_len=CONTEXT,
        kv_pool=pool, _is_sparse_kv_cached_by_fusion=lambda fb, layer_id: True,
    )
    static = SimpleNamespace(seq_lens=torch.ones(bs, dtype=torch.int64), req_pool_indices=torch.zeros(bs, dtype=torch.int64))
    decode = SimpleNamespace(is_decode=lambda: True)
    layer = SimpleNamespace(layer_id=3, scaling=dim**-0.5, k_scale_float=None, v_scale_float=None)
    shapes = dict(heads_q=heads_q, heads_kv=heads_kv, dim=dim, idx_dim=idx_dim)
    return backend, static, decode, layer, shapes


def _view(static, decode, seq_cpu):
    return SimpleNamespace(forward_mode=decode, seq_lens=static.seq_lens, seq_lens_cpu=seq_cpu,
                           req_pool_indices=static.req_pool_indices, out_cache_loc=None)


def _fill_rows(backend, rows: dict[int, list[int]]):
    """Give each request row its pages (lists of page ids) in req_to_token."""
    import torch

    for r, pages in rows.items():
        slots = (torch.tensor(pages)[:, None] * 128 + torch.arange(128)[None, :]).reshape(-1)
        backend.req_to_token[r, : slots.numel()] = slots.to(torch.int32)


def _forward(backend, fb, layer, shapes, recorded):
    import torch

    from m3serve.plugin import sparse_attention as sa

    t = fb.seq_lens.shape[0]
    q = torch.randn(t, shapes["heads_q"], shapes["dim"]).half()
    idx_q = torch.randn(t, shapes["heads_kv"], shapes["idx_dim"]).half()
    _, o = sa._sparse_forward(backend, q, None, None, layer, fb, False, idx_q, None, "decode")
    return q, idx_q, o, recorded[-1]


def case_capture_then_two_replays():
    import torch

    import msa_kernels
    from m3serve.plugin import sparse_attention as sa
    from msa_kernels import ops, reference
    from msa_kernels.triton._attn_cases import rel_error
    from msa_kernels.triton._topk_testcases import check_selection

    # Run the Triton kernels (interpreted) on CPU tensors, and record each layer's selection.
    recorded = []
    real_topk = ops.index_topk
    ops._use_triton = lambda backend, *tensors: True
    ops.index_topk = lambda plan, q_idx, kc, backend="auto": recorded.append(real_topk(plan, q_idx, kc)) or recorded[-1]
    sa.graphs_possible = lambda tensor: True

    bs = 3
    backend, static, decode, layer, shapes = _setup(bs)
    # Capture: the runner's dummy batch (seq_lens 1, row 0), the out-graph hook, then a warm-up forward.
    sa.prepare_decode_graph(None, backend, _view(static, decode, static.seq_lens.clone()), in_capture=True)
    _forward(backend, _view(static, decode, static.seq_lens.clone()), layer, shapes, recorded)
    g = sa.graph_decode(backend, _view(static, decode, None))
    assert g is not None and g.plan is not None, "the capture forward did not build a graph plan"
    captured_items = g.plan.extras

    perm = torch.randperm(POOL_PAGES).tolist()
    shared = perm[:12]  # a 12-page prefix shared by rows 5 and 6
    batches = [
        ({5: shared + perm[12:20], 6: shared + perm[20:24]}, [5, 6, 0], [20 * 128 - 50, 14 * 128 + 1, 1]),
        ({2: perm[30:62], 4: perm[62:64]}, [2, 4, 0], [CONTEXT, 129, 1]),
    ]
    results = []
    for rows, req, seqs in batches:
        _fill_rows(backend, rows)
        static.seq_lens.copy_(torch.tensor(seqs))
        static.req_pool_indices.copy_(torch.tensor(req))
        sa.prepare_decode_graph(None, backend, _view(static, decode, static.seq_lens.clone()))
        assert g.plan.extras is captured_items, "the refresh must reuse the captured buffers"
        q, idx_q, o, selected = _forward(backend, _view(static, decode, None), layer, shapes, recorded)
        # The reference on the real batch.
        page_table = backend.req_to_token[torch.tensor(req)][:, ::128] // 128
        real = msa_kernels.plan(page_table.to(torch.int32), seqs, num_pages=POOL_PAGES)
        sel = check_selection(real, idx_q, backend.kv_pool.ik, selected)
        want = reference.sparse_attention_paged(real, q, backend.kv_pool.k, backend.kv_pool.v, selected,
                                                layer.scaling)
        err = rel_error(o.view_as(want), want)
        assert err < 2e-3, f"attention relative error {err}"
        results.append({"rel_err": err, **sel})
    return results


def case_fp8_cache_without_scales():
    """An fp8 (e4m3) KV cache whose layer carries no scales (SGLang's default, None: K/V stored as plain casts),
    through an eager decode batch: the plugin must treat them as 1.0, not stop (a served fp8 run on an H100 did,
    round 12)."""
    import torch

    from m3serve.plugin import sparse_attention as sa
    from msa_kernels import ops, reference
    from msa_kernels.triton._attn_cases import rel_error

    ops._use_triton = lambda backend, *tensors: True
    sa.graphs_possible = lambda tensor: False
    backend, static, decode, layer, shapes = _setup(2)
    pool = backend.kv_pool
    pool.k, pool.v = pool.k.to(torch.float8_e4m3fn), pool.v.to(torch.float8_e4m3fn)
    perm = torch.randperm(POOL_PAGES).tolist()
    _fill_rows(backend, {1: perm[:20], 3: perm[20:23]})
    seqs = [20 * 128 - 7, 2 * 128 + 5]
    fb = SimpleNamespace(forward_mode=decode, seq_lens=torch.tensor(seqs), seq_lens_cpu=torch.tensor(seqs),
                         req_pool_indices=torch.tensor([1, 3]), out_cache_loc=None)
    q = torch.randn(2, shapes["heads_q"], shapes["dim"]).half()
    idx_q = torch.randn(2, shapes["heads_kv"], shapes["idx_dim"]).half()
    _, o = sa._sparse_forward(backend, q, None, None, layer, fb, False, idx_q, None, "decode")
    plan = sa.batch_plan(backend, fb, POOL_PAGES)
    selected = reference.index_topk(plan, idx_q, pool.ik)
    want = reference.sparse_attention_paged(plan, q, pool.k, pool.v, selected, layer.scaling, 1.0, 1.0)
    return [{"rel_err": rel_error(o.view_as(want), want)}]


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_graph_flow_interpreter(name):
    rows = run_interpreted(__file__, name, timeout=900)
    want_rows = 1 if name == "fp8_cache_without_scales" else 2
    assert len(rows) == want_rows and all(r["rel_err"] < 2e-3 for r in rows), rows


def test_missing_cache_scales_mean_one():
    from m3serve.plugin.sparse_attention import cache_scales

    assert cache_scales(SimpleNamespace(k_scale_float=None, v_scale_float=None)) == (1.0, 1.0)
    assert cache_scales(SimpleNamespace(k_scale_float=0.5, v_scale_float=None)) == (0.5, 1.0)


def test_eager_batches_do_not_touch_graph_plans():
    import torch

    from m3serve.plugin import sparse_attention as sa

    backend, static, decode, _, _ = _setup(2)
    # Without a capture, the hook does nothing and no batch is treated as a graph batch.
    sa.prepare_decode_graph(None, backend, _view(static, decode, static.seq_lens.clone()))
    assert sa.graph_decode(backend, _view(static, decode, None)) is None
    # A batch of a captured size on its own (non-static) buffers stays eager.
    backend.__dict__[sa._GRAPH_ATTR] = {2: sa.GraphDecode(2, static.seq_lens.data_ptr())}
    other = SimpleNamespace(forward_mode=decode, seq_lens=torch.ones(2, dtype=torch.int64))
    assert sa.graph_decode(backend, other) is None
    assert sa.graph_decode(backend, _view(static, decode, None)) is not None


if __name__ == "__main__":
    interpreted_main(CASES)
