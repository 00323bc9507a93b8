"""Pure-PyTorch references: the oracle every MSA kernel is tested against."""

from .attention import block_keep_mask, sparse_attention
from .dense import chunk_leaders, dense_decode
from .paged import gather_sequence, index_topk, sparse_attention_paged, store
from .scoring import index_block_scores, select_blocks

__all__ = [
    "block_keep_mask",
    "chunk_leaders",
    "dense_decode",
    "gather_sequence",
    "index_block_scores",
    "index_topk",
    "select_blocks",
    "sparse_attention",
    "sparse_attention_paged",
    "store",
]
