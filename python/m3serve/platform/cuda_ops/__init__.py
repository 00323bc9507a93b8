"""Fused Triton ops for the portable CUDA platform, where SGLang would call its CUDA kernel package.

Without `sgl_kernel`, SGLang runs every RMSNorm and rotary embedding through its torch-native forward: one
CUDA kernel per elementwise step, 7-9 for a norm and about a dozen for a rotary embedding. In a served M3
decode step that is ~1,100 launches and 1.9 ms of a 6.4 ms step (benchmarks/results/
served_step_split_r13_notes.md, H200), in both arms of the end-to-end benchmark. These kernels do each op
in one launch; `sglang_forwards` hands them to SGLang through `BaseFusedOp.register_oot_forward`, the
plugin API SGLang provides for out-of-tree platforms.

  * `norm.rms_norm`: RMSNorm and Gemma's (1 + w) RMSNorm, with the residual add fused in;
  * `rope.rotary`: rotary embedding (Neox and GPT-J layouts, partial rotary dimension) for a [tokens,
    heads * head_dim] tensor.
Each follows SGLang's torch-native forward (its oracle in the tests), computing in fp32 and rounding once.
The kernel modules import Triton; this package's top level does not, so the platform can name its dispatch
key without it.
"""
