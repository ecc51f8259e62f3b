"""S²FT (and PaCA) against LoRA at equal trainable parameters: step time and training memory on MiniLM.

MiniLM-L6 (all-MiniLM-L6-v2) sequence classification on BBC News, batch 16 x 128. All adapt the same
layers of every block, the attention output projection and the MLP output projection: LoRA at rank 8
(8·(384 + 384) + 8·(1536 + 384) = 21,504 weights per block), S²FT with one attention head (384·32) and
24 MLP channels (384·24) per block, PaCA with 28 random input columns of each (384·28·2): 21,504 as well.
Full fine-tuning is the reference. The arms take
turns round by round (order flipping) so machine load hits them alike. Reported: median seconds per
step (forward, backward, AdamW step), activation bytes saved for backward (unique storages, through
``torch.autograd.graph.saved_tensors_hooks``), optimizer-state bytes and trainable parameters.

    python benchmarks/s2ft_vs_lora.py            # writes benchmarks/results/s2ft_vs_lora.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from adapter_step_time import saved_activation_bytes, write

import rankwise as rw
from rankwise.data import classification_loader, load_classification
from rankwise.memory import count_params, optimizer_state_bytes
from rankwise.models import load_model

RESULTS = Path(__file__).parent / "results"
CONSUMERS = ["attention.output.dense", "output.dense"]  # suffixes: both output projections of each block


def build(name: str, base):
    model = copy.deepcopy(base)
    if name == "lora r=8":
        return rw.adapt(model, "lora", targets=CONSUMERS, r=8, alpha=16)
    if name == "s2ft 1 head + 24 channels":
        return rw.adapt(model, "s2ft", r=24, heads=1)
    if name == "paca r=28":
        return rw.adapt(model, "paca", targets=CONSUMERS, r=28)
    if name == "full-ft":
        return model
    raise ValueError(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per arm per round")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS / "s2ft_vs_lora"))
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    base, tok = load_model("minilm-l6", task="seq-cls", num_labels=5)
    ds = load_classification("bbc", split="train", seed=0, limit=args.batch)
    batch = next(iter(classification_loader(ds, tok, batch_size=args.batch, max_length=args.seq, shuffle=False)))
    batch = {k: v[:, : args.seq].to(device) if v.dim() == 2 else v.to(device) for k, v in batch.items()}

    names = ["lora r=8", "s2ft 1 head + 24 channels", "paca r=28", "full-ft"]
    models = {n: build(n, base).to(device).train() for n in names}
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in names}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Not rankwise.train.train: the arms take turns a few steps at a time (see the module docstring).
    def step(n: str) -> None:
        models[n](**batch).loss.backward()
        opts[n].step()
        opts[n].zero_grad(set_to_none=True)

    for n in names:  # warm-up (also creates optimizer state)
        step(n)
    for rnd in range(args.rounds):
        for n in names if rnd % 2 == 0 else reversed(names):
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(n)
            sync()
            times[n].append((time.perf_counter() - t0) / args.steps)
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)

    rows = {n: {"median_s_per_step": statistics.median(times[n]), "min_s_per_step": min(times[n]),
                "max_s_per_step": max(times[n]), "trainable_params": count_params(models[n])[0],
                "optimizer_state_bytes": optimizer_state_bytes(opts[n]),
                "saved_activation_bytes": saved_activation_bytes(models[n], batch)} for n in names}
    lora = rows["lora r=8"]
    ratios = {f"{short} / lora {what}": rows[n][key] / lora[key]
              for short, n in (("s2ft", "s2ft 1 head + 24 channels"), ("paca", "paca r=28"))
              for what, key in (("step time", "median_s_per_step"), ("saved activations", "saved_activation_bytes"))}
    result = {"setup": {"model": "all-MiniLM-L6-v2, seq-cls (5 BBC topics)", "batch": args.batch, "seq": args.seq,
                        "rounds": args.rounds, "steps_per_round": args.steps, "device": str(device),
                        "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "load_avg_at_end": os.getloadavg(), "machine": platform.processor() or platform.machine()},
              "rows": rows, "ratios": ratios, "all_s": times}
    lines = [
        "# S²FT vs LoRA at equal trainable parameters (MiniLM-L6)\n",
        f"BBC News sequence classification, batch {args.batch}x{args.seq}, {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds x {args.steps} steps (load average "
        f"at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: the machine was shared, absolute times move "
        "with the load). LoRA r=8, S²FT (1 head + 24 MLP channels per block) and PaCA (28 columns per matrix) adapt "
        "the attention and MLP output projections with 21,504 weights per block; all train the classifier head "
        "too.\n",
        "| arm | trainable | median s/step | min | max | saved activations (MB) | optimizer state (MB) |",
        "|---|---|---|---|---|---|---|",
        *[f"| {n} | {r['trainable_params']:,} | {r['median_s_per_step']:.3f} | {r['min_s_per_step']:.3f} | "
          f"{r['max_s_per_step']:.3f} | {r['saved_activation_bytes'] / 2**20:.1f} | "
          f"{r['optimizer_state_bytes'] / 2**20:.2f} |" for n, r in rows.items()],
        "", "| ratio | measured |", "|---|---|", *[f"| {k} | {v:.3f} |" for k, v in ratios.items()],
    ]
    write(args.out, result, lines)


if __name__ == "__main__":
    main()
