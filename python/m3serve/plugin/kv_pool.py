"""Let M3's sparse-index KV pool through on an out-of-tree platform.

SGLang 0.5.23 refuses OOT platforms at `reject_out_of_tree_path(..., subsystem="the MiniMax sparse-index
KV pool")` because the pool has no platform seam yet. The pool itself (MiniMaxSparseKVPool) is plain torch
that allocates on the given device, so for that one subsystem we skip the rejection; every other
subsystem still goes through SGLang's check.
"""

from __future__ import annotations

from . import marker

TARGET = "sglang.srt.platforms.interface.reject_out_of_tree_path"
ALLOWED_SUBSYSTEM = "the MiniMax sparse-index KV pool"


def allow_sparse_kv_pool(original, platform, *, subsystem: str):
    if subsystem == ALLOWED_SUBSYSTEM:
        marker.record("sparse_kv_pool_allowed", "M3 sparse-index KV pool allowed on the portable platform")
        return None
    return original(platform, subsystem=subsystem)
