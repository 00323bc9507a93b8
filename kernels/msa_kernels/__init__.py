"""MiniMax Sparse Attention (MSA) kernels: Triton kernels beside pure-PyTorch references.

This package knows nothing of SGLang: it takes tensors in SGLang's paged-pool layout
(token slots; K/V [slots, kv_heads, 128]; index-K [slots, 1, 128]; page = 128 tokens = one MSA block).

    p = plan(page_table, seq_lens, q_lens)          # once per forward batch
    store(slots, k, v, index_k, k_cache, v_cache, index_k_cache)   # per layer
    sel = index_topk(p, q_idx, index_k_cache)       # per sparse layer: [T, H_idx, 16] block ids
    o = sparse_attention(p, q, k_cache, v_cache, sel)

`msa_kernels.ops` dispatches each op to its Triton kernel on CUDA and to its reference elsewhere.

Given lengths as host lists and `check_pages=False` (a caller that owns its page table, like the SGLang plugin),
building and running an extend plan never synchronizes the GPU's stream (`transfer.py` says why that matters;
tests/kernels/test_gpu_no_sync.py checks it). The default checks every page id, which reads the table back.
"""

from .graph import (
           graph_decode_plan,
           pages_from_slots,
           update_graph_decode_plan,
           update_graph_decode_plan_from_slots,
)
from .layout import BLOCK_SIZE, TOPK_BLOCKS, MSAInputError
from .plan import MSAPlan, plan

__all__ = ["BLOCK_SIZE", "TOPK_BLOCKS", "MSAInputError", "MSAPlan", "graph_decode_plan", "pages_from_slots", "plan",
           "update_graph_decode_plan", "update_graph_decode_plan_from_slots"]
