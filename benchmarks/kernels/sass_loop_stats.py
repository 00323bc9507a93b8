"""Compile an MSA Triton kernel for sm_90a on a machine without a GPU and count what each loop of its SASS runs.

Why: a device call costs minutes of a 30-minute budget; whether a change adds a barrier, a spill or an
un-pipelined load shows in the SASS, which Triton's own ptxas and cuobjdump produce offline. Round 11 read the
union pass this way (benchmarks/results/msa_kernels_r11_notes.md, section 2).

Setup (once): Triton as on the GPU machine, beside this tree's torch:
    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 numpy
Run:
    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages:.venv/lib/python3.11/site-packages \\
        /tmp/t36/bin/python benchmarks/kernels/sass_loop_stats.py union wide score [--keep DIR]

Kernels: `union` (extend attention's union pass, 128 rows, 4 warps, 64-key steps, 3 stages or env STAGES,
TMA), `wide` (its query-major wide pass), `score` (extend index scoring, 64-row items, 4 warps, 3 stages, TMA),
`decode_bf16`, `decode_fp8`, `decode_words` (decode attention at batch 32 on bf16 K/V, fp8 bytes, fp8 words),
`score_fp8` (graph decode scoring of private requests on fp8 keys). Per kernel: shared
memory, ptxas' registers and spills, and per loop (a backward branch) the instruction count and the counts of
HGMMA, MUFU.EX2, BAR.SYNC, LDGSTS/DEPBAR (loads pipelined through shared memory), local-memory spills, TMA
issues and global loads. Pointer and stride arguments are compiled as divisible by 16, as on the GPU; without
that the gathered loads compile to 2-byte loads. Watch the shared memory too: an H100 SM holds two union-pass
programs only below ~113 KB each, and a loop change can make Triton add a buffer (round 11: 98 -> 131 KB, 16-29%
slower).
Env: STAGES (union pass stages), MAXNREG (a register cap per thread, as Triton's maxnreg option).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "kernels"))

from msa_kernels.triton import _topk_kernels, decode_attention, extend_attention  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
COUNTS = {"HGMMA": r"HGMMA", "MUFU": r"MUFU\.EX2", "BAR": r"BAR\.SYNC", "LDGSTS": r"LDGSTS", "DEPBAR": r"\bDEPBAR",
          "spill": r"\b(LDL|STL)", "TMA": r"UTMALDG", "LDG": r"\bLDG\.E"}


def _signature(fn, constexprs: dict, types: dict) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = types.get(name) or ("*i32" if name.endswith("_ptr") else "i32")
        # as Triton specializes them on the GPU; stride_pb is a do_not_specialize argument of the kernels
        if (name.endswith("_ptr") or name.startswith("stride_")) and name != "stride_pb":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _extend(gated: bool):
    rows, qg = (16, 1) if gated else (128, 8)
    ksub = 128 if gated else 64
    const = dict(HKV=4, G=16, QG=qg, M=rows, D=128, TOPK=16, TOPK_P2=16, E=qg * 16, BLOCK=128, GATED=gated,
                 KSUB=ksub, TMA=not gated, QG_TILE=8 if gated else 1)
    desc = f"tensordesc<bf16[{ksub}, 128]>" if not gated else "*bf16"
    types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "k_desc": desc,
             "v_desc": desc, "qk_scale": "fp32", "v_scale": "fp32"}
    return extend_attention._extend_kernel, const, types, (4, 2 if gated else int(os.environ.get("STAGES", 3)))


def _score(keys: str = "bf16"):
    """Index scoring: extend items (64 rows) on bf16 keys, or graph decode items (16 rows, private requests) on
    fp8 keys."""
    fp8 = keys == "fp8"
    const = dict(H=4, D=128, PAGE=128, BLOCK_M=16 if fp8 else 64, KS=16, TOPK=16, TOPK_P2=16, FINAL=not fp8,
                 K_NEEDS_CAST=fp8, IN_F32=False, F16_FOR_FP8=keys == "fp8", GRID_ITEMS=fp8, BATCH_P2=32 if fp8 else 1,
                 SHARE=False, PDL=False, TMA=True)
    desc = {"bf16": "tensordesc<bf16[128, 128]>", "fp8": "tensordesc<fp8e4nv[128, 128]>"}[keys]
    kptr = {"bf16": "*bf16", "fp8": "*fp8e4nv"}[keys]
    types = {"q_ptr": "*bf16", "kc_ptr": kptr, "kc_desc": desc, "cand_ptr": "*i64"}
    return _topk_kernels._score_kernel, const, types, (4, 3)


def _decode(cache: str):
    """Decode attention at batch 32 (half-page units, 4 splits, per-unit lookups): bf16 K/V, fp8 K/V loaded as
    bytes (widened by Triton), or fp8 loaded as int32 words (e4m3_words_to_f16)."""
    words = cache == "words"
    const = dict(HKV=4, G=16, GPAD=16, D=128, TOPK=16, BLOCK=128, CHUNK=64, NSPLIT=4, FUSED_MERGE=True,
                 F16_FOR_FP8=False, PDL=False, PAGES_FIRST=False, UP2=8, FP8_WORDS=words)
    kv = {"bf16": "*bf16", "fp8": "*fp8e4nv", "words": "*i32"}[cache]
    types = {"q_ptr": "*bf16", "k_ptr": kv, "v_ptr": kv, "out_ptr": "*bf16", "part_o_ptr": "*fp32",
             "part_lse_ptr": "*fp32", "qk_scale": "fp32", "v_scale": "fp32"}
    return decode_attention._decode_kernel, const, types, (4, 3)


KERNELS = {"union": lambda: _extend(False), "wide": lambda: _extend(True), "score": _score,
           "score_fp8": lambda: _score("fp8"),
           "decode_bf16": lambda: _decode("bf16"), "decode_fp8": lambda: _decode("fp8"),
           "decode_words": lambda: _decode("words")}


def loop_stats(sass: str) -> list[dict]:
    """Per backward branch (a loop), the instruction count and COUNTS over its body."""
    lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", ln)]
    addr = [int(re.search(r"/\*([0-9a-f]{4,})\*/", ln).group(1), 16) for ln in lines]
    loops = []
    for ln, a in zip(lines, addr):
        m = re.search(r"BRA (0x[0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < a:
            body = [x for x, b in zip(lines, addr) if int(m.group(1), 16) <= b <= a]
            if len(body) > 8:  # skip the compiler's 2-instruction spin loops
                row = {"loop": f"{int(m.group(1), 16):#x}-{a:#x}", "instrs": len(body)}
                row.update({k: sum(1 for x in body if re.search(p, x)) for k, p in COUNTS.items()})
                loops.append(row)
    return loops


def main() -> None:
    args = sys.argv[1:]
    keep = Path(args[args.index("--keep") + 1]) if "--keep" in args else Path(tempfile.mkdtemp())
    keep.mkdir(parents=True, exist_ok=True)
    for name in [a for a in args if a in KERNELS] or list(KERNELS):
        fn, const, types, (warps, stages) = KERNELS[name]()
        sig, attrs = _signature(fn, const, types)
        k = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": stages,
                                    **({"maxnreg": int(os.environ["MAXNREG"])} if os.environ.get("MAXNREG") else {})})
        ptx, cubin = keep / f"{name}.ptx", keep / f"{name}.cubin"
        ptx.write_text(k.asm["ptx"])
        info = subprocess.run([str(BIN / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        (keep / f"{name}.sass").write_text(sass)
        regs = " ".join(re.sub(r"^ptxas info\s*:\s*", "", x.strip()) for x in info.splitlines()
                        if "Used" in x or "spill" in x)
        print(f"{name}: {warps} warps, {stages} stages, shared memory {k.metadata.shared} B | {regs}")
        for row in loop_stats(sass):
            print("   " + "  ".join(f"{key} {val}" for key, val in row.items()))
    print(f"PTX, cubin and SASS in {keep}")


if __name__ == "__main__":
    main()
