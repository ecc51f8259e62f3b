"""Which layout of the low-rank path's skinny GEMMs is fastest: the measurement behind ``adapters/kernels.py``.

The LoRA kernel forms two N×r intermediates, ``x Aᵀ`` (forward) and ``g B`` (backward), and may form each either
way round: as N×r (``x @ A.t()``, ``g @ B``) or as its r×N transpose (``A @ x.t()``, ``B.t() @ g.t()``). The
products are the same numbers; BLAS speed differs by layout. Timed on SmolLM2-135M's linear shapes (576→576
q/o, 576→192 k/v, 576→1536 gate/up, 1536→576 down), r = 8, at 128 and 1,024 tokens, the alternatives
interleaved and the best of several repeats kept. The kernel's rule: ``x Aᵀ`` as r×N while x takes at most
``TRANSPOSED_PRODUCT_MAX_BYTES`` (2 MiB), as N×r above; ``g B`` always as N×r.

    python benchmarks/skinny_gemm_layouts.py --threads 1   # writes benchmarks/results/skinny_gemm_layouts.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rankwise.adapters.kernels import TRANSPOSED_PRODUCT_MAX_BYTES

RESULTS = Path(__file__).parent / "results"
SHAPES = {"q/o 576→576": (576, 576), "k/v 576→192": (576, 192), "gate/up 576→1536": (576, 1536),
          "down 1536→576": (1536, 576)}


def time_us(fn: Callable[[], torch.Tensor], calls: int) -> float:
    """Mean µs per call of ``fn`` over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def layouts(tokens: int, d_in: int, d_out: int, r: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The alternatives, named by the intermediate's layout."""
    x, a = torch.randn(tokens, d_in), torch.randn(r, d_in)
    g, b = torch.randn(tokens, d_out), torch.randn(d_out, r)
    return {"x Aᵀ as r×N": lambda: a @ x.t(), "x Aᵀ as N×r": lambda: x @ a.t(),
            "g B as r×N": lambda: b.t() @ g.t(), "g B as N×r": lambda: g @ b}


def measure(tokens: int, d_in: int, d_out: int, r: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` µs per call of each alternative, the alternatives interleaved."""
    fns = layouts(tokens, d_in, d_out, r)
    calls = max(20, 20_000 // tokens)
    for fn in fns.values():
        time_us(fn, 5)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], time_us(fn, calls))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--tokens", default="64,128,256,512,1024,2048", help="comma-separated token counts N")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "skinny_gemm_layouts"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for shape, (d_in, d_out) in SHAPES.items():
            us = measure(tokens, d_in, d_out, args.r, args.repeats)
            rows.append({"tokens": tokens, "shape": shape, "us": us, "x_mib": tokens * d_in * 4 / 2**20,
                         "x_a_speedup_rxn": us["x Aᵀ as N×r"] / us["x Aᵀ as r×N"],
                         "g_b_speedup_nxr": us["g B as r×N"] / us["g B as N×r"]})
            print(f"N={tokens:5d} {shape:18s} " + "  ".join(f"{k} {v:7.1f}" for k, v in us.items()), flush=True)
    setup = {"r": args.r, "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
             "machine": platform.machine(), "load_avg_at_end": list(os.getloadavg())}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2, ensure_ascii=False))
    lines = ["# Layouts of the LoRA kernel's skinny GEMMs (r×N or N×r)", "",
             f"SmolLM2-135M's linear shapes, r = {args.r}, torch {torch.__version__}, {args.threads} thread(s), "
             f"best of {args.repeats} interleaved repeats, µs per call (load average at the end "
             f"{setup['load_avg_at_end'][0]:.1f}). The kernel (`src/rankwise/adapters/kernels.py`) forms x Aᵀ as "
             f"r×N while x (fp32) takes at most {TRANSPOSED_PRODUCT_MAX_BYTES / 2**20:g} MiB, as N×r above, and "
             "g B always as N×r.", "",
             "| N | shape | x MiB | x Aᵀ as r×N | x Aᵀ as N×r | speed-up of r×N | g B as r×N | g B as N×r "
             "| speed-up of N×r |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        us = row["us"]
        lines.append(f"| {row['tokens']} | {row['shape']} | {row['x_mib']:.2f} | {us['x Aᵀ as r×N']:.1f} | "
                     f"{us['x Aᵀ as N×r']:.1f} | "
                     f"{row['x_a_speedup_rxn']:.2f} | {us['g B as r×N']:.1f} | {us['g B as N×r']:.1f} | "
                     f"{row['g_b_speedup_nxr']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
