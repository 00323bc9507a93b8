"""Make SGLang treat a CUDA host as "not CUDA" (the portable platform's CUDA flavour), then chain on.

Only active when SGLANG_PLATFORM=m3serve_portable and M3SERVE_DEVICE=cuda. SGLang evaluates
`is_cuda()` at import time in many modules and then imports sgl_kernel; a plugin loads too late to
change that, but sitecustomize runs first in every Python process (the worker puts this folder on
PYTHONPATH, and SGLang's spawned processes inherit it). A meta-path finder waits for
`sglang.srt.utils.common` to execute and replaces its `is_cuda` with one returning False, so every
later importer sees False. Afterwards the next sitecustomize on sys.path (the image's own) still runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_TARGET = "sglang.srt.utils.common"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _not_cuda() -> bool:
    return False


class _PatchAfterExec(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._inner: importlib.abc.Loader | None = None

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._inner.create_module(spec) if hasattr(self._inner, "create_module") else None

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        module.is_cuda = _not_cuda


def _chain_next_sitecustomize() -> None:
    """Run the sitecustomize this one shadows (e.g. the distro's), if any."""
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == _HERE:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_m3serve_chained_sitecustomize", candidate)
            if spec and spec.loader:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


if os.environ.get("SGLANG_PLATFORM") == "m3serve_portable" and os.environ.get("M3SERVE_DEVICE") == "cuda":
    sys.meta_path.insert(0, _PatchAfterExec())
_chain_next_sitecustomize()
