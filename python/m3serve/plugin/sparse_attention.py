"""M3's sparse-attention layers on our kernel library `msa_kernels` instead of SGLang's Triton MSA path.

We replace `MiniMaxSparseAttnBackend.forward_extend` / `forward_decode` (the dense layers of the hybrid
backend keep SGLang's own backend). Per sparse layer:
    store K, V, index-K into the pool        (SGLang's own pool writer: it owns the pool's dtypes)
    plan = the batch's plan                  (built once per ForwardBatch, reused by every sparse layer)
    selected = msa_kernels.ops.index_topk(plan, idx_q, index_k_cache)
    o = msa_kernels.ops.sparse_attention(plan, q, k_cache, v_cache, selected, scale)
msa_kernels runs its Triton kernels on CUDA tensors and its PyTorch references elsewhere.

Decode in CUDA graphs: before capturing a batch size SGLang calls the backend's
`init_forward_metadata_out_graph(view, in_capture=True)`, whose `seq_lens` is the graph runner's static
buffer; an AFTER hook notes that buffer. Decode forwards on it (warm-ups, capture) run on a graph plan of
static buffers (msa_kernels.graph) sized for the pool's longest context: the first sparse layer of the
step writes the page table and lengths into it with device ops, inside the graph, and the top-k items
follow from them in the kernel. A replay therefore needs no host work. Every other batch builds its plan
on the host as before.

An AFTER hook on the backend's __init__ checks, at start-up, that the checkpoint and server settings
are ones msa_kernels serves (page 128 = MSA block, no init blocks, one local block, max scoring, K-only
index layers, no HiSparse / fp8 attention GEMMs / shared top-k), so unsupported setups fail loudly
instead of computing something else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import marker

BACKEND = "sglang.srt.layers.attention.minimax_sparse_backend.MiniMaxSparseAttnBackend"
INIT_TARGET = f"{BACKEND}.__init__"
EXTEND_TARGET = f"{BACKEND}.forward_extend"
DECODE_TARGET = f"{BACKEND}.forward_decode"
OUT_GRAPH_TARGET = f"{BACKEND}.init_forward_metadata_out_graph"

_PLAN_ATTR = "_m3serve_plan"  # (forward_batch, plan) cached on the backend instance
_GRAPH_ATTR = "_m3serve_graph_plans"  # batch size -> GraphDecode


class UnsupportedSparseSetup(NotImplementedError):
    """The checkpoint or server settings need a sparse-attention feature msa_kernels does not implement."""


def _msa():
    import msa_kernels
    import msa_kernels.ops

    return msa_kernels


_UNPATCHED: dict[str, object] = {}  # the backend's methods before HookRegistry replaced them


def remember_unpatched(backend_cls) -> None:
    """Called at plugin registration, before the hooks are applied."""
    _UNPATCHED.update(forward_extend=backend_cls.forward_extend, forward_decode=backend_cls.forward_decode)


def check_backend(result, backend, *args, **kwargs) -> None:
    """AFTER hook on MiniMaxSparseAttnBackend.__init__: refuse setups msa_kernels cannot serve."""
    msa = _msa()
    problems = []
    for name, original in _UNPATCHED.items():
        # HookRegistry logs (invisibly, this early) instead of raising when a hook fails to apply.
        if getattr(type(backend), name) is original:
            problems.append(f"the REPLACE hook on MiniMaxSparseAttnBackend.{name} was not applied")
    if backend.page_size != msa.BLOCK_SIZE:
        problems.append(f"page size is {backend.page_size}, expected {msa.BLOCK_SIZE} (pass --page-size 128)")
    if backend.block_size_k != msa.BLOCK_SIZE:
        problems.append(f"sparse_block_size is {backend.block_size_k}, expected {msa.BLOCK_SIZE}")
    if backend.init_blocks != 0:
        problems.append(f"sparse_init_block is {backend.init_blocks}, expected 0 (M3 forces no initial blocks)")
    if backend.local_blocks != 1:
        problems.append(f"sparse_local_block is {backend.local_blocks}, expected 1")
    if backend.score_type != "max":
        problems.append(f"sparse_score_type is {backend.score_type!r}, expected 'max'")
    value_layers = sorted(set(backend.sparse_layer_ids) - set(backend.disable_value_layer_ids))
    if value_layers:
        problems.append(f"sparse layers {value_layers} keep an index-value branch; M3 disables it on every layer")
    if backend.hisparse_coordinator is not None:
        problems.append("HiSparse (--enable-hisparse) is not supported by m3serve's sparse path")
    if backend.fp8_attn_gemm:
        problems.append("fp8 attention GEMMs (SM100 mode) are not supported by m3serve's sparse path")
    if backend.index_cache_enabled:
        problems.append("shared top-k across layers (SGLANG_MINIMAX_M3_INDEX_TOPK_FREQ>1) is not supported")
    if backend.is_npu:
        problems.append("NPU is not supported by m3serve's sparse path")
    if problems:
        raise UnsupportedSparseSetup("m3serve M3 plugin cannot serve this model: " + "; ".join(problems))
    marker.note("msa_kernels", msa.__file__)
    marker.record("sparse_backend_init", f"M3 sparse layers -> msa_kernels ({msa.__file__})")


def batch_plan(backend, forward_batch, num_pages: int):
    """The msa_kernels plan of this forward batch, built on its first sparse layer and then reused."""
    cached = getattr(backend, _PLAN_ATTR, None)
    if cached is not None and cached[0] is forward_batch:
        return cached[1]
    msa = _msa()
    seq_src = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
    seq_lens = [int(s) for s in seq_src.tolist()]
    if forward_batch.forward_mode.is_decode():
        q_lens = [1] * len(seq_lens)
    elif forward_batch.extend_seq_lens_cpu is not None:
        q_lens = [int(n) for n in forward_batch.extend_seq_lens_cpu]
    else:
        q_lens = [int(n) for n in forward_batch.extend_seq_lens.tolist()]
    n_pages = -(-max(seq_lens, default=0) // msa.BLOCK_SIZE)
    page_table = msa.pages_from_slots(backend.req_to_token, forward_batch.req_pool_indices, n_pages)
    # check_pages=False: the page ids come from SGLang's own allocator, and checking them would read the page
    # table back to the host, a stream sync in the middle of the forward (msa_kernels/transfer.py says what
    # that costs). With host lengths nothing in building or running this plan syncs.
    plan = msa.plan(page_table, seq_lens, q_lens, num_pages=num_pages, topk=backend.topk_blocks, check_pages=False)
    setattr(backend, _PLAN_ATTR, (forward_batch, plan))
    marker.record("plan_built")
    return plan


@dataclass
class GraphDecode:
    """The graph plan of one captured decode batch size."""

    batch_size: int
    seq_lens_ptr: int  # address of the graph runner's static seq_lens buffer
    plan: object = None  # msa_kernels.MSAPlan of static buffers, made by the first forward (a warm-up)
    first_layer: int | None = None  # the sparse layer that updates the plan at the start of each step




def graphs_possible(tensor: torch.Tensor) -> bool:
    """CUDA graphs exist on CUDA only (a seam: the CPU tests drive the graph flow with interpreted kernels)."""
    return tensor.is_cuda


def graph_decode(backend, forward_batch) -> GraphDecode | None:
    """The graph plan of this batch when it runs on the graph runner's static buffers, else None."""
    graphs = getattr(backend, _GRAPH_ATTR, None)
    if not graphs or not forward_batch.forward_mode.is_decode():
        return None
    g = graphs.get(forward_batch.seq_lens.shape[0])
    return g if g is not None and forward_batch.seq_lens.data_ptr() == g.seq_lens_ptr else None


def prepare_decode_graph(result, backend, forward_batch, in_capture: bool = False, *args, **kwargs) -> None:
    """AFTER hook on init_forward_metadata_out_graph: note the static buffers of a decode graph about to be
    captured. Replays need nothing here (the captured step updates its own plan)."""
    mode = forward_batch.forward_mode
    if not in_capture or not mode.is_decode() or not graphs_possible(forward_batch.seq_lens):
        return
    bs = forward_batch.seq_lens.shape[0]
    if bs == 0:
        return
    graphs = backend.__dict__.setdefault(_GRAPH_ATTR, {})
    graphs[bs] = GraphDecode(bs, forward_batch.seq_lens.data_ptr())
    marker.record("decode_graph_plan", f"M3 sparse decode: graph plan for batch size {bs} (CUDA graphs on)")


def _graph_step_plan(backend, g: GraphDecode, forward_batch, layer, heads: int, num_pages: int, device):
    """The graph plan, updated on the device by the step's first sparse layer."""
    msa = _msa()
    if g.plan is None:  # the first forward of this batch size (a warm-up before capture)
        from msa_kernels.triton.index_topk import prepare_graph_decode_topk

        width = -(-backend.req_to_token.shape[1] // msa.BLOCK_SIZE)
        g.plan = msa.graph_decode_plan(g.batch_size, width, device, topk=backend.topk_blocks)
        prepare_graph_decode_topk(g.plan, heads, num_pages, device)
        g.first_layer = layer.layer_id
    if layer.layer_id == g.first_layer:  # one launch: pages from the slot table, lengths, positions
        msa.update_graph_decode_plan_from_slots(g.plan, backend.req_to_token, forward_batch.req_pool_indices,
                                                forward_batch.seq_lens)
    return g.plan


def cache_scales(layer) -> tuple[float, float]:
    """(k_scale, v_scale) of a layer's KV cache. SGLang leaves them None unless a checkpoint calibrates them, and
    then stores fp8 K/V as plain casts (its pool's unit-scale path), so None means 1.0. (Index-K needs no scale
    here: a positive factor on every score of a row does not change which blocks it selects.)"""
    k_scale = layer.k_scale_float
    v_scale = layer.v_scale_float
    return (1.0 if k_scale is None else float(k_scale), 1.0 if v_scale is None else float(v_scale))


def _sparse_forward(backend, q, k, v, layer, forward_batch, save_kv_cache, idx_q, idx_k, phase: str):
    from msa_kernels import ops

    g = graph_decode(backend, forward_batch) if graphs_possible(q) else None
    if g is None and q.is_cuda and torch.cuda.is_current_stream_capturing():
        raise UnsupportedSparseSetup(
            "M3 sparse layers: a CUDA graph is being captured without a graph plan (only decode graphs are "
            "supported; pass --disable-cuda-graph for other graph modes)"
        )
    if save_kv_cache and not backend._is_sparse_kv_cached_by_fusion(forward_batch, layer.layer_id):
        backend.kv_pool.set_fused_kv_index_buffer(
            layer, forward_batch.out_cache_loc, k, v, idx_k, None,
            layer.k_scale_float, layer.v_scale_float, layer.idx_k_scale_float, layer.idx_v_scale_float,
        )
    k_cache, v_cache = backend.kv_pool.get_kv_buffer(layer.layer_id)
    idx_k_cache = backend.kv_pool.get_index_k_buffer(layer.layer_id)
    num_pages = k_cache.shape[0] // _msa().BLOCK_SIZE
    if g is not None:
        plan = _graph_step_plan(backend, g, forward_batch, layer, idx_q.shape[1], num_pages, q.device)
    else:
        plan = batch_plan(backend, forward_batch, num_pages=num_pages)

    total = q.shape[0]
    n = plan.num_tokens  # data-parallel attention may pad q past the batch's real tokens
    if idx_q.shape[1] != k_cache.shape[1]:
        raise UnsupportedSparseSetup(
            f"layer {layer.layer_id}: {idx_q.shape[1]} index heads per rank but {k_cache.shape[1]} KV heads; "
            "msa_kernels needs one index head per KV group"
        )
    selected = ops.index_topk(plan, idx_q[:n], idx_k_cache)
    k_scale, v_scale = cache_scales(layer)
    o = ops.sparse_attention(plan, q[:n], k_cache, v_cache, selected, layer.scaling, k_scale, v_scale)
    if n < total:
        o = torch.cat([o, o.new_zeros(total - n, *o.shape[1:])], dim=0)
    marker.record(f"sparse_{phase}", f"M3 sparse {phase} ran msa_kernels.ops.index_topk + sparse_attention")
    return None, o.reshape(total, -1)


def sparse_forward_extend(backend, q, k, v, layer, forward_batch, save_kv_cache=True, *, idx_q, idx_k, idx_v):
    """REPLACE for MiniMaxSparseAttnBackend.forward_extend (prefill, chunked prefill, mixed batches)."""
    return _sparse_forward(backend, q, k, v, layer, forward_batch, save_kv_cache, idx_q, idx_k, "extend")


def sparse_forward_decode(backend, q, k, v, layer, forward_batch, save_kv_cache=True, *, idx_q, idx_k, idx_v,
                          **kwargs):
    """REPLACE for MiniMaxSparseAttnBackend.forward_decode (one new token per request)."""
    if kwargs:
        raise UnsupportedSparseSetup(f"unexpected sparse decode arguments {sorted(kwargs)}")
    return _sparse_forward(backend, q, k, v, layer, forward_batch, save_kv_cache, idx_q, idx_k, "decode")
