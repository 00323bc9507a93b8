"""Bar plot of a device call's kernel-time sweep (the `sweep.txt` lines that run_round7.sh's kernel_times prints).

    python3 benchmarks/kernels/plot_kernel_sweep.py benchmarks/results/kernel_sweeps_r7.txt out.png

Input: blocks that start with "# call N, CARD" followed by lines "case  SETTINGS...  [kernel]  TIME us/layer".
Each (call, case, kernel) gets one group of bars, one bar per setting; settings that failed (time 0) are left out.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^(?P<case>\S+)\s+(?P<rest>.*?)\s+(?P<us>[\d.]+) us/layer$")
KERNELS = ("extend attention", "_extend_kernel", "_decode_kernel", "_score_kernel|_merge_kernel", "_score_kernel")


def parse(path: str) -> dict[tuple[str, str, str], list[tuple[str, float]]]:
    """(call label, case, kernel) -> [(setting, us)] in file order."""
    groups: dict[tuple[str, str, str], list[tuple[str, float]]] = defaultdict(list)
    call = ""
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        raw = raw.rstrip()
        if raw.startswith("# call"):
            call = raw[2:].split(",")[0] + ", " + raw.split(",")[1].strip().replace("NVIDIA ", "")
            continue
        m = LINE.match(raw)
        if not m or float(m["us"]) <= 0:
            continue
        rest, kernel = m["rest"], "attention"
        for k in KERNELS:
            if rest.endswith(k):
                rest, kernel = rest[: -len(k)].strip(), "scoring" if "score" in k else "attention"
        setting = rest.replace("MSA_NONE=1", "defaults").replace("MSA_NONE=2", "defaults") or "defaults"
        groups[(call, m["case"], kernel)].append((setting, float(m["us"])))
    return groups


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = parse(sys.argv[1])
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.2 * len(groups)), squeeze=False)
    for ax, ((call, case, kernel), bars) in zip(axes[:, 0], groups.items()):
        labels = [s for s, _ in bars]
        values = [us for _, us in bars]
        ax.barh(range(len(bars)), values, color=["#999" if "TMA=0" in s else "#3a7" for s in labels])
        ax.set_yticks(range(len(bars)), labels, fontsize=7)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
        ax.set_title(f"{call}: {case}, {kernel} kernel (µs per layer; grey = gathered loads)", fontsize=8)
        ax.set_xlim(0, max(values) * 1.15)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
