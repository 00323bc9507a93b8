"""SGLang plugin for the benchmark's "upstream" arm: M3 on the portable platform, sparse layers on SGLang's own
Triton MSA kernels.

m3serve's M3 plugin (m3serve.plugin) always sends the sparse layers to msa_kernels. For the upstream arm
the run script excludes it with SGLang's plugin allow-list (SGLANG_PLUGINS=m3serve_portable,
m3serve_upstream_arm) and loads this one instead, which installs only the two hooks SGLang needs to run M3
at all on an out-of-tree platform, and the dense-layer one (the same ones m3serve's plugin installs):
  * the MiniMax sparse-index KV pool allowed on the portable platform;
  * the SwiGLU-OAI gate/up layout fix in the torch-native MoE;
  * the dense layers' extend on FlashAttention-2 (m3serve.plugin.dense_extend): upstream SGLang on Hopper
    would run them on FA3 from its CUDA kernel package, which the portable platform lacks.
So the arms differ only in who computes the sparse layers. Registered as the `sglang.srt.plugins` entry
point `m3serve_upstream_arm` by a dist-info the run script writes (run_e2e.write_arm_dist).
Inert unless M3SERVE_SPARSE_BACKEND=upstream.
"""

from __future__ import annotations

import os
import sys

SWITCH_ENV = "M3SERVE_SPARSE_BACKEND"
ENTRY_POINT = "m3serve_upstream_arm"


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV) == "upstream"


def hooks() -> list[tuple[str, object, str]]:
    from m3serve.plugin import dense_extend, kv_pool, moe_layout

    return [
        (kv_pool.TARGET, kv_pool.allow_sparse_kv_pool, "AROUND"),
        (moe_layout.TARGET, moe_layout.fix_moe_layout, "AROUND"),
        (dense_extend.TARGET, dense_extend.flash_extend, "AROUND"),
    ]


def register() -> None:
    """Called by SGLang's load_plugins() in every server process."""
    if not enabled():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from m3serve.plugin import marker
    from m3serve.plugin.version import UnsupportedSGLangError, check_sglang_version

    try:
        check_sglang_version()
    except UnsupportedSGLangError as e:
        print(f"[m3serve-upstream-arm] FATAL: {e}", file=sys.stderr, flush=True)
        raise SystemExit(str(e)) from e
    for target, hook, kind in hooks():
        HookRegistry.register(target, hook, HookType[kind])
    marker.note("sparse_backend", "upstream")
    marker.record("upstream_arm_registered",
                  "upstream arm: M3 sparse layers on SGLang's own Triton MSA kernels (m3serve plugin excluded)")
