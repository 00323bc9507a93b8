"""MiniMax Sparse Attention (MSA) kernels: Triton kernels beside pure-PyTorch references.

This package knows nothing of SGLang: it takes tensors in SGLang's paged-pool layout
(token slots; K/V [slots, kv_heads, 128]; index-K [slots, 1, 128]; page = 128 tokens = one MSA block).
"""
