"""Log every Triton kernel specialization a server process builds or loads (M3SERVE_TRITON_COMPILE_LOG=1).

Why: a Triton kernel is compiled (or loaded from the disk cache) the first time a process launches it with a
new specialization: other constexpr values, or integer arguments that change divisibility by 16 or equality
with 1. In a server that happens at the first batch of a new shape and stalls every request in flight.
SGLang warns only about uncached compiles over one second; this log shows each one, cached or not, with its
wall-clock time (to line up with a benchmark's request timestamps), duration and constexpr values, so the
shapes that still specialize after warm-up can be found and fixed.

One stderr line per event, `[m3serve] triton compile|load <kernel> <ms> ms at <unix time> <constexprs>`,
and a `triton_compile` / `triton_load` count in the plugin marker. Chains any listener already installed.
"""

from __future__ import annotations

import os
import sys
import time

from . import marker

ENV = "M3SERVE_TRITON_COMPILE_LOG"


def _constexprs(src) -> str:
    fn = getattr(src, "fn", None)
    names = getattr(fn, "arg_names", None) or []
    parts = []
    for key, value in sorted(getattr(src, "constants", {}).items()):
        index = key[0] if isinstance(key, tuple) and key else key
        name = names[index] if isinstance(index, int) and index < len(names) else str(key)
        if name.isupper():  # the kernels' own constexprs (upper case), not None-valued arguments
            parts.append(f"{name}={value}")
    return " ".join(parts)[:400]


def install() -> bool:
    """Install the listener when M3SERVE_TRITON_COMPILE_LOG=1 (returns whether it did)."""
    if os.environ.get(ENV) != "1":
        return False
    try:
        import triton.knobs as knobs
    except ImportError:
        return False
    compilation = getattr(knobs, "compilation", None)
    if compilation is None or not hasattr(compilation, "listener"):
        return False
    previous = compilation.listener

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        if previous is not None:
            previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit)
        kind = "load" if cache_hit else "compile"
        marker.record(f"triton_{kind}")
        ms = getattr(times, "total", 0) / 1e3
        print(f"[m3serve] triton {kind} {getattr(src, 'name', '?')} {ms:.0f} ms at {time.time():.3f} "
              f"{_constexprs(src)}", file=sys.stderr, flush=True)

    compilation.listener = listener
    return True
