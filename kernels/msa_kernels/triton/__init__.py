"""Triton kernels for Hopper. Each module exposes the signature of the op in `msa_kernels.ops` it implements."""
