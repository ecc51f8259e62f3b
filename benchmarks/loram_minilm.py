"""LoRAM on all-MiniLM-L6-v2 / BBC News: LoRA trained on a pruned copy (half the attention heads and MLP
channels of every block, random or first-order Taylor choice), recovered onto the full model, against
LoRA trained on the full model itself — same steps, batches, rank, learning rate and head init.

    python benchmarks/loram_minilm.py                 # writes benchmarks/results/loram_minilm.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import rankwise as rw
from rankwise.data import classification_loader, load_classification
from rankwise.models import load_model
from rankwise.train import TrainConfig, evaluate, train

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test", type=int, default=200, help="test examples evaluated")
    ap.add_argument("--out", default=str(RESULTS / "loram_minilm"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base, tok = load_model("minilm", task="seq-cls", num_labels=5)
    train_data = classification_loader(load_classification("bbc", "train"), tok, batch_size=16, seed=0)
    batches = [b for _, b in zip(range(args.steps), train_data, strict=False)]
    test = classification_loader(load_classification("bbc", "test", limit=args.test), tok, batch_size=32,
                                 shuffle=False)
    rows = []

    def record(name: str, model: torch.nn.Module, seconds: float, **extra) -> None:
        metrics = evaluate(model, test)
        rows.append({"run": name, "accuracy": metrics["accuracy"], "loss": metrics["loss"], "train_s": seconds,
                     **extra})
        print(rows[-1], flush=True)

    record("no training (LoRA B = 0, random head)", rw.adapt(copy.deepcopy(base), "lora", r=args.r), 0.0)
    t = time.perf_counter()
    lora = rw.adapt(copy.deepcopy(base), "lora", r=args.r, alpha=2.0 * args.r)
    train(lora, batches, config=TrainConfig.plain(args.steps), optimizer=torch.optim.AdamW(
        [p for p in lora.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0))
    record("LoRA on the full model", lora, time.perf_counter() - t)
    for criterion in ("random", "taylor"):
        t = time.perf_counter()
        model = rw.compression.loram(copy.deepcopy(base), batches, args.ratio, steps=args.steps, r=args.r,
                                     alpha=2.0 * args.r, lr=args.lr, criterion=criterion)
        state = model.rankwise_loram["loram"]
        record(f"LoRAM-{criterion} (ratio {args.ratio}), recovered onto the full model", model,
               time.perf_counter() - t, block_weights=state.params_original, pruned_block_weights=state.params_pruned)
    result = {"settings": vars(args), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["| run | test accuracy | test loss | train s | block weights trained against |", "|---|---|---|---|---|"]
    for row in rows:
        size = row.get("pruned_block_weights")
        kept = "" if size is None else f"{size:,} of {row['block_weights']:,}"
        lines.append(f"| {row['run']} | {row['accuracy']:.3f} | {row['loss']:.3f} | {row['train_s']:.0f} | {kept} |")
    out.with_suffix(".md").write_text(
        f"# LoRAM on all-MiniLM-L6-v2 / BBC News\n\n{args.steps} AdamW steps x 16 examples (lr {args.lr}, r {args.r}, "
        f"alpha {2 * args.r}), {args.test} test examples, 1 thread.\n\n" + "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
