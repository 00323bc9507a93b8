"""The M3 plugin for SGLang (entry point `sglang.srt.plugins: m3serve_m3 = m3serve.plugin:register`).

Active when the portable platform is selected (SGLANG_PLATFORM=m3serve_portable) or when
M3SERVE_M3_PLUGIN=1 (the m3serve worker sets it); inert otherwise, so installing m3serve changes nothing
for other SGLang deployments. When active it registers, through SGLang's HookRegistry:
  * M3's sparse-attention layers -> msa_kernels (plan once per batch, index top-k + sparse attention;
    decode also inside CUDA graphs, through a plan refreshed before each replay);
  * the sparse-index KV pool allowed on the portable platform;
  * the SwiGLU-OAI gate/up layout fix in the torch-native MoE;
  * the dense layers' prefill/extend on FlashAttention-2 where SGLang's Triton backend serves them (CUDA);
  * the dense layers' decode on msa_kernels' shared-prefix kernel (a prefix shared by the batch read once);
  * the image hand-off hooks of m3serve.plugin.mm_handoff, when that module exists.

SGLang swallows exceptions raised by plugins (and logs them before logging is configured), so a
version mismatch or a hook target that no longer exists is reported on stderr and ends the process
with SystemExit: loud, at start-up, instead of a server that silently runs the unpatched code.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

from . import compile_log, dense_decode, dense_extend, kv_pool, marker, moe_layout, sparse_attention
from .version import SUPPORTED_SGLANG, UnsupportedSGLangError, check_sglang_version

PLUGIN_ENV = "M3SERVE_M3_PLUGIN"
PLATFORM_NAME = "m3serve_portable"

__all__ = ["PLUGIN_ENV", "SUPPORTED_SGLANG", "enabled", "hooks", "register"]


def enabled() -> bool:
    return os.environ.get(PLUGIN_ENV) == "1" or os.environ.get("SGLANG_PLATFORM") == PLATFORM_NAME


def hooks():
    """(target, hook, hook type name) of every hook this plugin installs."""
    return [
        (kv_pool.TARGET, kv_pool.allow_sparse_kv_pool, "AROUND"),
        (moe_layout.TARGET, moe_layout.fix_moe_layout, "AROUND"),
        (dense_extend.TARGET, dense_extend.flash_extend, "AROUND"),
        (dense_decode.TARGET, dense_decode.install_shared_decode, "AFTER"),
        (sparse_attention.INIT_TARGET, sparse_attention.check_backend, "AFTER"),
        (sparse_attention.EXTEND_TARGET, sparse_attention.sparse_forward_extend, "REPLACE"),
        (sparse_attention.DECODE_TARGET, sparse_attention.sparse_forward_decode, "REPLACE"),
        (sparse_attention.OUT_GRAPH_TARGET, sparse_attention.prepare_decode_graph, "AFTER"),
    ]


def _fail(message: str) -> None:
    print(f"[m3serve] FATAL: {message}", file=sys.stderr, flush=True)
    raise SystemExit(f"m3serve plugin: {message}")


def _check_target(target: str) -> None:
    obj_path, attr = target.rsplit(".", 1)
    try:
        owner = pkgutil.resolve_name(obj_path)
    except Exception as e:  # any import failure means the hook cannot apply
        _fail(f"hook target {target} cannot be imported ({type(e).__name__}: {e})")
    if not hasattr(owner, attr):
        _fail(f"hook target {target} does not exist in sglang {SUPPORTED_SGLANG}'s layout")


def register() -> None:
    """Install the hooks (called by SGLang's load_plugins() in every server process)."""
    if not enabled():
        return
    try:
        check_sglang_version()
    except UnsupportedSGLangError as e:
        _fail(str(e))
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, hook, kind in hooks():
        _check_target(target)
        HookRegistry.register(target, hook, HookType[kind])
    sparse_attention.remember_unpatched(pkgutil.resolve_name(sparse_attention.BACKEND))
    try:
        handoff = importlib.import_module("m3serve.plugin.mm_handoff")
    except ModuleNotFoundError as e:
        if e.name != "m3serve.plugin.mm_handoff":
            raise
        handoff = None
    if handoff is not None:
        try:
            handoff.install(HookRegistry)
        except Exception as e:  # SGLang would swallow it and serve without the image hand-off
            _fail(f"m3serve.plugin.mm_handoff.install failed ({type(e).__name__}: {e})")
    compile_log.install()  # opt-in (M3SERVE_TRITON_COMPILE_LOG=1): every Triton specialization, for diagnosis
    marker.note("sglang_version", SUPPORTED_SGLANG)
    marker.record("plugin_registered")
