"""bfloat16 vs float32 matmul speed of the randomized range finder's power round, on this machine.

The ``rsvd`` projector (docs/optimizers.md) runs its power round ``G·(Gᵀ·Q)`` in bfloat16 when
``power_dtype="auto"`` finds a CUDA GPU with bf16, or when ``power_dtype="bfloat16"`` asks for it; on a
CPU ``auto`` keeps float32. This benchmark times that round in both dtypes
for SmolLM2-135M's weight shapes (rank 128 + 8 oversampling columns) and records the CPU capability
and flags, so a speed claim in the docs has its measurement next to it.

    python benchmarks/bf16_matmul.py        # writes benchmarks/results/bf16_matmul.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from rankwise.optim.projectors import power_dtype

RESULTS = Path(__file__).parent / "results"
# SmolLM2-135M: q/o (576×576), k/v (192×576), gate/up (1536×576), down (576×1536)
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return sorted(f for f in line.split() if f.startswith(("avx512", "amx", "avx2")))


def time_power_round(m: int, n: int, k: int, dtype: torch.dtype, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, n, generator=g).to(dtype)
    q = torch.randn(n, k, generator=g).to(dtype)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ (a.T @ (a @ q))
        times.append((time.perf_counter() - t0) / 10)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128, help="projection rank r (sketch width r + 8)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per shape and dtype (median kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "bf16_matmul", help="output path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = args.rank + 8
    rows = []
    for m, n in SHAPES:
        fp32 = time_power_round(m, n, k, torch.float32, args.repeats)
        bf16 = time_power_round(m, n, k, torch.bfloat16, args.repeats)
        rows.append({"shape": [m, n], "fp32_ms": fp32 * 1e3, "bf16_ms": bf16 * 1e3, "bf16_speedup": fp32 / bf16})
        print(f"{m}x{n}: fp32 {fp32 * 1e3:.2f} ms, bf16 {bf16 * 1e3:.2f} ms, bf16 {fp32 / bf16:.2f}x", flush=True)
    auto = power_dtype("auto", torch.device("cpu"))
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cpu_flags": cpu_flags(), "threads": args.threads},
        "power_dtype_auto": str(auto or torch.float32),
        "rank": args.rank, "rows": rows,
        "geomean_bf16_speedup": statistics.geometric_mean(r["bf16_speedup"] for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# bf16 vs fp32: the rsvd power round G·(Gᵀ·(G·Q)) on SmolLM2-135M shapes",
        "",
        f"CPU capability `{result['machine']['cpu_capability']}`, flags {', '.join(result['machine']['cpu_flags'])}; "
        f"torch {torch.__version__}, {args.threads} thread(s); sketch width {k}. "
        f"`power_dtype=\"auto\"` picks **{result['power_dtype_auto']}** here.",
        "",
        "| shape | fp32 ms | bf16 ms | bf16 speedup |",
        "|---|---|---|---|",
        *[f"| {r['shape'][0]}×{r['shape'][1]} | {r['fp32_ms']:.2f} | {r['bf16_ms']:.2f} | {r['bf16_speedup']:.2f}× |"
          for r in rows],
        "",
        f"Geometric mean bf16 speedup: {result['geomean_bf16_speedup']:.2f}×.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
