"""Where a served forward step spends its GPU time: split a torch-profiler trace of an SGLang worker by step
and by kind of work (index scoring + top-k, sparse attention, dense attention, MoE experts, GEMMs, other).

Input: the Chrome trace SGLang's /start_profile + /stop_profile write (`*.trace.json.gz`). SGLang wraps every
forward in a `step[EXTEND bs=8 toks=16384]` / `step[DECODE bs=8]` range; each GPU kernel carries the
correlation id of the CPU call that launched it (a kernel launch, or a CUDA-graph launch for a decode step
replayed from a graph), so a kernel belongs to the step whose range holds its launch.

Kinds, first by the range the launch lies in, then by the kernel's name:
- `moe`: launched inside an `m3serve.moe` range (the plugin's MoE hook, whichever path it takes: the
  grouped Triton kernels or a loop of cuBLAS GEMMs), or one of the grouped MoE kernels by name (decode
  replays from a graph have no CPU ranges);
- `msa_index`, `msa_attn`: the sparse layers' index scoring + top-k and their attention. Names come from
  the kernel sources themselves (every `@triton.jit` function of msa_kernels, and of SGLang's own
  minimax_sparse package for the upstream arm), sorted by the file they live in;
- `dense_attn`: FlashAttention and SGLang's Triton attention kernels (M3's full-attention layers);
- `gemm`: every other matrix multiply (projections, the shared expert, the dense MLP, lm_head);
- `other`: the rest (norms, rotary, routing, sampling, copies), its largest kernels listed by name.

    python benchmarks/agentic/gpu/trace_split.py TRACE.json.gz [--json OUT.json]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("msa_index", "msa_attn", "dense_attn", "moe", "gemm", "other")
MOE_RANGE = "m3serve.moe"
_STEP_RE = re.compile(r"^step\[(?P<mode>[A-Z_]+) bs=(?P<bs>\d+)(?: toks=(?P<toks>\d+))?")
_JIT_DEF_RE = re.compile(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def (\w+)")
_DENSE_RE = re.compile(r"flash|fmha|_fwd_kernel|_fwd_grouped_kernel|cudnn.*attention|sdpa", re.I)
_MOE_RE = re.compile(r"^_gate_up_kernel|^_down_kernel|fused_moe|moe_align", re.I)
_GEMM_RE = re.compile(r"gemm|nvjet|cutlass|xmma|cublas|sm90_|splitk|matmul", re.I)
# msa_kernels keeps index scoring + top-k (and the graph plan update they read) in their own files; SGLang's
# minimax_sparse files mix both, so there the kernel's name decides: attention kernels say attn/fwd.
_INDEX_FILE_RE = re.compile(r"topk|index|graph_update", re.I)
_INDEX_NAME_RE = re.compile(r"score|topk|index|candidates", re.I)
_ATTN_NAME_RE = re.compile(r"attn|fwd", re.I)


def _kind_by_file(path: Path, name: str) -> str:
    return "msa_index" if _INDEX_FILE_RE.search(path.name) else "msa_attn"


def _kind_by_name(path: Path, name: str) -> str:
    return "msa_index" if _INDEX_NAME_RE.search(name) and not _ATTN_NAME_RE.search(name) else "msa_attn"


def triton_kernel_kinds(roots: list[tuple[Path, str]]) -> dict[str, str]:
    """{kernel name: msa_index | msa_attn} for every `@triton.jit` function under each root (Python sources),
    sorted by file ("file") or by kernel name ("name")."""
    kinds: dict[str, str] = {}
    for root, rule in roots:
        if not root.exists():
            continue
        kind_of = _kind_by_file if rule == "file" else _kind_by_name
        for path in sorted(root.rglob("*.py")):
            for name in _JIT_DEF_RE.findall(path.read_text(errors="replace")):
                kinds.setdefault(name, kind_of(path, name))
    return kinds


def default_kernel_kinds() -> dict[str, str]:
    """Our kernels (msa_kernels, beside this repository) and, when SGLang is importable, its MSA kernels."""
    repo = Path(__file__).resolve().parents[3]
    roots = [(repo / "kernels" / "msa_kernels" / "triton", "file")]
    try:
        import importlib.util

        spec = importlib.util.find_spec("sglang")
        if spec is not None and spec.submodule_search_locations:
            base = Path(list(spec.submodule_search_locations)[0])
            roots.append((base / "kernels" / "ops" / "attention" / "minimax_sparse", "name"))
    except (ImportError, ValueError):
        pass
    kinds = triton_kernel_kinds(roots)
    kinds.pop("_gate_up_kernel", None)
    kinds.pop("_down_kernel", None)
    return kinds


def classify(name: str, in_moe_range: bool, msa_kinds: dict[str, str]) -> str:
    """The kind of one kernel (see the module docstring for the order of the rules)."""
    if in_moe_range or _MOE_RE.search(name):
        return "moe"
    if name in msa_kinds:
        return msa_kinds[name]
    if _DENSE_RE.search(name):
        return "dense_attn"
    if _GEMM_RE.search(name):
        return "gemm"
    return "other"


@dataclass
class Step:
    mode: str  # EXTEND, DECODE, ... (SGLang's forward mode)
    batch: int
    tokens: int | None  # new tokens of an extend step
    cpu_start: float  # µs, trace clock
    cpu_end: float
    kernel_us: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    gpu_first: float | None = None
    gpu_last: float | None = None
    kernels: int = 0

    def add(self, kind: str, ts: float, dur: float) -> None:
        self.kernel_us[kind] += dur
        self.kernels += 1
        self.gpu_first = ts if self.gpu_first is None else min(self.gpu_first, ts)
        self.gpu_last = ts + dur if self.gpu_last is None else max(self.gpu_last, ts + dur)

    @property
    def gpu_span_us(self) -> float:
        return 0.0 if self.gpu_first is None else self.gpu_last - self.gpu_first


def load_events(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


class _Ranges:
    """Sorted, non-overlapping [start, end) ranges with a lookup by time."""

    def __init__(self, items: list[tuple[float, float, Any]]) -> None:
        self.items = sorted(items, key=lambda x: x[0])
        self.starts = [x[0] for x in self.items]

    def find(self, t: float) -> Any:
        i = bisect.bisect_right(self.starts, t) - 1
        if i >= 0 and t < self.items[i][1]:
            return self.items[i][2]
        return None


def split_trace(events: list[dict[str, Any]], msa_kinds: dict[str, str] | None = None) -> dict[str, Any]:
    """Per-step GPU time by kind, and those steps summarized per (mode, batch, tokens)."""
    msa_kinds = default_kernel_kinds() if msa_kinds is None else msa_kinds
    steps, moe_ranges, launches = [], [], {}
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, name = e.get("cat", ""), e.get("name", "")
        ts, dur = float(e.get("ts", 0.0)), float(e.get("dur", 0.0))
        if cat == "user_annotation":
            m = _STEP_RE.match(name)
            if m:
                steps.append((ts, ts + dur, Step(m["mode"], int(m["bs"]), int(m["toks"]) if m["toks"] else None,
                                                 ts, ts + dur)))
            elif name.startswith(MOE_RANGE):
                moe_ranges.append((ts, ts + dur, True))
        elif cat in ("cuda_runtime", "cuda_driver"):
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launches[corr] = ts
    step_of, in_moe = _Ranges(steps), _Ranges(moe_ranges)
    other_names: dict[str, float] = defaultdict(float)
    unattributed = 0.0
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "kernel":
            continue
        launch = launches.get((e.get("args") or {}).get("correlation"))
        step = step_of.find(launch) if launch is not None else None
        if step is None:
            unattributed += float(e.get("dur", 0.0))
            continue
        kind = classify(e.get("name", ""), bool(in_moe.find(launch)), msa_kinds)
        step.add(kind, float(e["ts"]), float(e.get("dur", 0.0)))
        if kind == "other":
            other_names[e.get("name", "")] += float(e.get("dur", 0.0))
    ordered = [s for _, _, s in step_of.items]
    return {
        "steps": [step_row(s) for s in ordered],
        "groups": summarize(ordered),
        "unattributed_kernel_us": round(unattributed, 1),
        "top_other": [{"name": n[:120], "us": round(us, 1)}
                      for n, us in sorted(other_names.items(), key=lambda x: -x[1])[:10]],
    }


def step_row(s: Step) -> dict[str, Any]:
    return {"mode": s.mode, "batch": s.batch, "tokens": s.tokens, "cpu_us": round(s.cpu_end - s.cpu_start, 1),
            "gpu_span_us": round(s.gpu_span_us, 1), "kernels": s.kernels,
            "kernel_us": {k: round(s.kernel_us.get(k, 0.0), 1) for k in KINDS}}


def summarize(steps: list[Step]) -> list[dict[str, Any]]:
    """Median per step of every kind, over the steps of one (mode, batch, tokens) with kernels in them."""
    groups: dict[tuple, list[Step]] = defaultdict(list)
    for s in steps:
        if s.kernels:
            groups[(s.mode, s.batch, s.tokens)].append(s)
    out = []
    for (mode, batch, tokens), members in sorted(groups.items(), key=lambda x: (x[0][0], x[0][1], x[0][2] or 0)):
        row = {"mode": mode, "batch": batch, "tokens": tokens, "steps": len(members),
               "gpu_span_us": round(statistics.median(s.gpu_span_us for s in members), 1),
               "kernel_us": {k: round(statistics.median(s.kernel_us.get(k, 0.0) for s in members), 1)
                             for k in KINDS}}
        row["busy_us"] = round(sum(row["kernel_us"].values()), 1)
        out.append(row)
    return out


def format_groups(groups: list[dict[str, Any]], title: str = "") -> str:
    """A markdown table: one row per step group, µs per step (median) of every kind."""
    head = "| step | steps | " + " | ".join(KINDS) + " | kernels busy | GPU span |"
    lines = ([f"**{title}**", ""] if title else []) + [head, "|" + "---|" * (len(KINDS) + 4)]
    for g in groups:
        label = f"{g['mode']} bs={g['batch']}" + (f" toks={g['tokens']}" if g["tokens"] else "")
        cells = " | ".join(f"{g['kernel_us'][k]:,.0f}" for k in KINDS)
        lines.append(f"| {label} | {g['steps']} | {cells} | {g['busy_us']:,.0f} | {g['gpu_span_us']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--json", type=Path, help="write the split here")
    a = p.parse_args()
    result = split_trace(load_events(a.trace))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    print(format_groups(result["groups"], str(a.trace.name)))


if __name__ == "__main__":
    main()
