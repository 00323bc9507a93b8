"""Dense decode of M3's full-attention layers: msa_kernels' shared-prefix kernel vs SGLang 0.5.23's Triton kernel.

One dense layer's decode attention (64 q / 4 KV heads x 128, bf16, 128-slot pages in random order), both in CUDA
graphs, on the same caches and slot lists:
  * ours: `msa_kernels.triton.dense_decode` with the grid of a server whose context length is --max-len;
  * sglang: `sglang.kernels.ops.attention.decode_attention.decode_attention_fwd` (what the portable platform's
    Triton backend runs), with the KV splits its backend's heuristic picks (get_num_kv_splits_triton, at most 8).
Bounds from the copy bandwidth measured in the same run: `unique` counts a shared prefix's K/V once (what ours can
reach), `per request` counts it once per request (what any kernel that reads requests separately must read).

Run on a GPU machine after `eval "$(bash benchmarks/agentic/gpu/setup_site.sh)"` (SGLang from the e2e bundle):
    python3 benchmarks/kernels/bench_dense_decode.py --out $OUT/dense_decode
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "kernels"))
sys.path.insert(0, str(ROOT / "benchmarks" / "kernels"))

import bench_msa as bm  # noqa: E402

HQ, HKV, D, PAGE = 64, 4, 128, 128


@dataclass(frozen=True)
class Case:
    batch: int
    prefix: int  # tokens every request shares (0: none)
    tail: int  # each request's own tokens after the prefix (or its whole length when prefix is 0)

    @property
    def name(self) -> str:
        if self.prefix:
            return f"B={self.batch} shared {self.prefix // 1000}k + {self.tail} own"
        return f"B={self.batch} private {self.tail // 1000}k"

    @property
    def lengths(self) -> list[int]:
        return [self.prefix + self.tail + 37 * i for i in range(self.batch)]  # unequal, not multiples of 128


CASES = [Case(1, 0, 60_000), Case(8, 60_000, 2_600), Case(8, 0, 60_000), Case(32, 60_000, 2_600),
         Case(32, 0, 60_000), Case(8, 8_000, 2_600), Case(8, 30_000, 2_600), Case(8, 120_000, 2_600),
         Case(8, 250_000, 2_600), Case(16, 60_000, 2_600)]


def build(case: Case, gen: torch.Generator) -> dict:
    """Pages in random order; requests share the prefix's pages, each tail starts on its own page."""
    lengths = case.lengths
    own = [n - case.prefix for n in lengths]
    pages_needed = -(-case.prefix // PAGE) + sum(-(-t // PAGE) for t in own) + 1
    order = torch.randperm(pages_needed, generator=gen)
    slots = (order[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)
    shared = slots[: case.prefix]
    cur = -(-case.prefix // PAGE) * PAGE
    rows = []
    for t in own:
        rows.append(torch.cat([shared, slots[cur:cur + t]]))
        cur += -(-t // PAGE) * PAGE
    dev = "cuda"
    k = torch.randn(pages_needed * PAGE, HKV, D, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    q = torch.randn(case.batch, HQ, D, dtype=torch.bfloat16, device=dev)
    indptr = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    indices = torch.cat(rows).to(torch.int64).to(dev)
    return {"q": q, "k": k, "v": v, "indptr": indptr, "indices": indices, "lengths": lengths}


def sglang_fn(inp: dict, max_splits: int = 8):
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

    q = inp["q"]
    b = q.shape[0]
    splits = torch.empty(b, dtype=torch.int32, device="cuda")
    seq_lens = (inp["indptr"][1:] - inp["indptr"][:-1]).to(torch.int32)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    get_num_kv_splits_triton[(1,)](splits, seq_lens, b, 1, HQ, HKV, max_splits, sms, MAX_NUM_SEQ=256)
    logits = torch.empty(b, HQ, max_splits, D, dtype=torch.float32, device="cuda")
    lse = torch.empty(b, HQ, max_splits, dtype=torch.float32, device="cuda")
    out = torch.empty_like(q)

    def run():
        decode_attention_fwd(q, inp["k"], inp["v"], out, inp["indptr"], inp["indices"], logits, lse, splits,
                             max_splits, D ** -0.5, 1.0, 1.0, page_size=PAGE)
        return out

    return run, splits


def ours_fn(inp: dict, max_len: int):
    from msa_kernels.triton.dense_decode import dense_decode

    out = torch.empty_like(inp["q"])
    return lambda: dense_decode(inp["q"], inp["k"], inp["v"], inp["indptr"], inp["indices"], None, max_len, out=out)


def kv_bytes(tokens: int) -> int:
    return tokens * HKV * D * 2 * 2  # K and V, bf16


def environment(args: argparse.Namespace) -> dict:
    import triton

    env = {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "python": platform.python_version(),
           "torch": torch.__version__, "triton": triton.__version__, "max_len": args.max_len,
           "ours_source_sha1": bm.source_digest(ROOT / "kernels" / "msa_kernels")}
    try:
        import sglang

        env["sglang"] = sglang.__version__
    except Exception as e:  # noqa: BLE001
        env["sglang"] = f"unavailable: {e}"
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    env["nvidia_smi"] = smi.stdout.strip()
    env["card"] = smi.stdout.split(",")[0].strip() or torch.cuda.get_device_name(0)
    return env


def copy_bandwidth() -> float:
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    r = bm.time_eager(lambda: b.copy_(a), "cuda", reps=20)
    return 2 * n / (r["us"] * 1e-6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output prefix (writes .md, .json, .png)")
    p.add_argument("--max-len", type=int, default=131_072, help="the server's context length (our grid)")
    p.add_argument("--cases", default="", help="comma-separated case indices (default: all)")
    args = p.parse_args(argv)
    env = environment(args)
    bw = copy_bandwidth()
    print(f"card {env['card']}; copy {bw / 1e12:.2f} TB/s", flush=True)
    picked = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    gen = torch.Generator().manual_seed(0)
    rows = []
    for case in picked:
        inp = build(case, gen)
        unique = case.prefix + sum(n - case.prefix for n in inp["lengths"])
        per_request = sum(inp["lengths"])
        row = {"case": case.name, "batch": case.batch, "prefix": case.prefix, "tail": case.tail,
               "unique_bound_us": kv_bytes(unique) / bw * 1e6, "per_request_bound_us": kv_bytes(per_request) / bw * 1e6}
        ours = ours_fn(inp, max(args.max_len, max(inp["lengths"])))
        up, splits = sglang_fn(inp)
        want = up().float()
        got = ours().float()
        row["max_abs_diff_vs_sglang"] = float((got - want).abs().max())
        row["kv_splits_sglang"] = int(splits.max())
        for name, fn in (("ours", ours), ("sglang", up)):
            r = bm.time_graph([fn], "cuda")
            row[f"{name}_us"] = r["us"]
            row[f"{name}_timing"] = r["timing"]
        row["speedup"] = row["sglang_us"] / row["ours_us"]
        row["ours_pct_unique_bound"] = 100 * row["unique_bound_us"] / row["ours_us"]
        row["sglang_pct_per_request_bound"] = 100 * row["per_request_bound_us"] / row["sglang_us"]
        rows.append(row)
        print(f"{case.name:<32} ours {row['ours_us']:8.1f} us  sglang {row['sglang_us']:8.1f} us  "
              f"x{row['speedup']:.2f}  bounds unique {row['unique_bound_us']:.1f} / per-request "
              f"{row['per_request_bound_us']:.1f}  diff {row['max_abs_diff_vs_sglang']:.2e}", flush=True)
        del inp
        torch.cuda.empty_cache()
    data = {"env": env, "copy_bytes_s": bw, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(markdown(data))
    plot(data, out.with_suffix(".png"))
    return 0


def markdown(data: dict) -> str:
    env = data["env"]
    lines = [f"# Dense decode (one M3 dense layer): shared-prefix kernel vs SGLang's Triton kernel, {env['card']}", "",
             f"- date (UTC): {env['date_utc']}", f"- command: `{env['command']}`",
             f"- versions: python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
             f"sglang {env['sglang']}", f"- card: {env['nvidia_smi']}",
             f"- copy bandwidth (this run): {data['copy_bytes_s'] / 1e12:.2f} TB/s; our grid for a context length of "
             f"{env['max_len']:,}; ours sources sha1 {env['ours_source_sha1']}",
             "- 64 q / 4 KV heads x 128, bf16, pages of 128 slots in random order; request r has 37*r more own "
             "tokens than request 0; both kernels in CUDA graphs", "",
             "| case | SGLang µs | ours µs | speed-up | bound µs: unique K/V / per request | ours % of unique bound "
             "| SGLang % of per-request bound | SGLang KV splits | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['case']} | {r['sglang_us']:.1f} | {r['ours_us']:.1f} | **{r['speedup']:.2f}x** | "
                     f"{r['unique_bound_us']:.1f} / {r['per_request_bound_us']:.1f} | {r['ours_pct_unique_bound']:.0f} "
                     f"| {r['sglang_pct_per_request_bound']:.0f} | {r['kv_splits_sglang']} | "
                     f"{r['max_abs_diff_vs_sglang']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    try:  # the object API, not pyplot: pyplot probes IPython, which the GPU bundle stubs out
        from matplotlib.figure import Figure
    except Exception:  # noqa: BLE001 - the plot is optional on machines without matplotlib
        return
    rows = [r for r in data["rows"] if r["batch"] == 8 and r["prefix"]]
    if not rows:
        return
    rows.sort(key=lambda r: r["prefix"])
    x = [r["prefix"] / 1000 for r in rows]
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    ax.plot(x, [r["sglang_us"] for r in rows], "o-", label="SGLang Triton decode")
    ax.plot(x, [r["ours_us"] for r in rows], "o-", label="ours (shared-prefix)")
    ax.plot(x, [r["per_request_bound_us"] for r in rows], "--", label="bytes bound, prefix read per request")
    ax.plot(x, [r["unique_bound_us"] for r in rows], ":", label="bytes bound, prefix read once")
    ax.set_xlabel("shared prefix (k tokens), batch 8, +2.6k own tokens each")
    ax.set_ylabel("µs per layer")
    ax.set_yscale("log")
    ax.set_title(f"Dense decode, one layer, {data['env']['card']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
