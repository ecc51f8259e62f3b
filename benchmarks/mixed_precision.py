"""fp32 vs bf16 training, side by side: adapters and GaLore, on MiniLM/BBC and SmolLM2.

Four tasks, each trained from the same start on the same batches in every arm:

* ``minilm-lora``: all-MiniLM-L6-v2 + LoRA (r = 8, all linear layers), BBC News classification;
* ``smollm2-lora``: SmolLM2-135M + LoRA (r = 8), language modelling on bbc+stdlib-code;
* ``minilm-galore`` / ``smollm2-galore``: full-parameter training with GaLore (rank 32) on the same data.

Arms: ``fp32`` (the reference: fp32 weights, adapters and optimizer), ``bf16`` (bf16 base weights; the
adapters in fp32 by default — ``adapter_dtype`` — and, for GaLore, an fp32 master copy of the bf16
weights — ``master_weights=True``), and ``bf16-naive`` (everything in bf16: ``adapter_dtype="base"``,
no master copy: small updates are lost to rounding). Reports the loss curves (one plot), the final
training loss (mean of the last 10 steps), a held-out metric, the largest gap to the fp32 curve, the
error of each arm's total update against the fp32 arm's, the share of trained entries that moved, and
the median step time.

    python benchmarks/mixed_precision.py      # writes benchmarks/results/mixed_precision.{json,md,png}

Note: on a CPU without native bf16 matmuls (AVX2) bf16 steps are much slower than fp32; the timing
column says so rather than hiding it. The accuracy comparison is what this benchmark is for.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import rankwise as rw
from rankwise.data import classification_loader, lm_blocks, load_classification, load_text
from rankwise.models import load_model
from rankwise.models.loaders import quiet_transformers

RESULTS = Path(__file__).parent / "results"
TASKS = ("minilm-lora", "minilm-galore", "smollm2-lora", "smollm2-galore")
ARMS = ("fp32", "bf16", "bf16-naive")


def batches_for(task: str, tok: Any, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(training batches, held-out batches), the same in every arm."""
    if task.startswith("minilm"):
        train = classification_loader(load_classification("bbc", split="train", seed=0), tok,
                                      batch_size=args.batch, max_length=args.seq, shuffle=True, seed=0)
        test = classification_loader(load_classification("bbc", split="test", seed=0, limit=args.eval_batches * 32),
                                     tok, batch_size=32, max_length=args.seq, shuffle=False)
        it = iter(train)
        return [next(it) for _ in range(args.steps)], list(test)[: args.eval_batches]
    blocks = lm_blocks(load_text("bbc+stdlib-code", split="train", seed=0), tok, args.seq)
    held = lm_blocks(load_text("bbc+stdlib-code", split="test", seed=0), tok, args.seq)

    def batch(x: torch.Tensor) -> dict:
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(blocks), generator=g)
    train = [batch(blocks[order[i * args.lm_batch:(i + 1) * args.lm_batch]]) for i in range(args.steps)]
    test = [batch(held[i * 8:(i + 1) * 8]) for i in range(args.eval_batches)]
    return train, test


def build(task: str, arm: str, base: torch.nn.Module, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = copy.deepcopy(base)
    if arm != "fp32":
        model.to(torch.bfloat16)
    if task.endswith("lora"):
        rw.adapt(model, "lora", r=8, alpha=16, adapter_dtype="base" if arm == "bf16-naive" else "float32")
        return model, rw.optim.make("adamw", model, lr=lr)
    model.requires_grad_(True)
    options: dict[str, Any] = {"lr": lr, "rank": 32, "update_gap": 50, "scale": 0.25}
    if arm == "bf16":
        options["master_weights"] = True
    return model, rw.optim.make("galore", model, **options)


def trainable_fp32(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of the trained tensors (adapters and head, or every weight), by name."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def master_fp32(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor] | None:
    """The fp32 master copies an optimizer built with ``master_weights=True`` keeps (the run's real
    result: the bf16 weights only show it once it crosses a bf16 spacing), by name; None without them."""
    found = {n: opt.state[p]["master_weight"].float() for n, p in model.named_parameters()
             if p.requires_grad and "master_weight" in opt.state.get(p, {})}
    return {n: found.get(n, p.detach().float()) for n, p in model.named_parameters() if p.requires_grad} if found \
        else None


def relative_error(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """‖ΔW − ΔW_ref‖ / ‖ΔW_ref‖ over all trained tensors."""
    err = sum(float((update[k] - reference[k]).square().sum()) for k in reference)
    return (err / sum(float(reference[k].square().sum()) for k in reference)) ** 0.5


@torch.no_grad()
def held_out(task: str, model: torch.nn.Module, test: list[dict]) -> float:
    """Accuracy (MiniLM) or perplexity (SmolLM2) on the held-out batches."""
    model.eval()
    if task.startswith("minilm"):
        right = total = 0
        for b in test:
            pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
            right += int((pred == b["labels"]).sum())
            total += len(pred)
        return right / total
    losses = [float(model(**b).loss.float()) for b in test]
    return float(torch.tensor(losses).mean().exp())


def run_task(task: str, args: argparse.Namespace) -> dict[str, Any]:
    name = "minilm-l6" if task.startswith("minilm") else "smollm2-135m"
    torch.manual_seed(0)
    if name == "minilm-l6":
        base, tok = load_model(name, task="seq-cls", num_labels=5)
    else:
        base, tok = load_model(name)
    train, test = batches_for(task, tok, args)
    lr = args.lora_lr if task.endswith("lora") else args.galore_lr
    out: dict[str, Any] = {"lr": lr, "arms": {}}
    updates: dict[str, dict[str, torch.Tensor]] = {}
    for arm in ARMS:
        torch.manual_seed(1)
        model, opt = build(task, arm, base, lr)
        start = trainable_fp32(model)
        model.train()
        losses, times = [], []
        for i, b in enumerate(train):
            t0 = time.perf_counter()
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.float()))
            if i % 10 == 0:
                print(f"  {task} {arm:10s} step {i:3d} loss {losses[-1]:.4f} ({times[-1]:.2f}s)", flush=True)
        end = trainable_fp32(model)
        updates[arm] = {k: end[k] - start[k] for k in start}
        master = master_fp32(model, opt)
        changed = sum(int((updates[arm][k] != 0).sum()) for k in start) / sum(v.numel() for v in start.values())
        out["arms"][arm] = {"losses": losses, "final_loss": statistics.mean(losses[-10:]),
                            "held_out": held_out(task, model, test), "median_step_s": statistics.median(times),
                            "update_error_vs_fp32": relative_error(updates[arm], updates["fp32"]),
                            "master_update_error_vs_fp32": None if master is None else relative_error(
                                {k: master[k] - start[k] for k in start}, updates["fp32"]),
                            "entries_changed": changed}
        del model, opt, start, end
    ref = out["arms"]["fp32"]["losses"]
    for arm in ARMS:
        a = out["arms"][arm]
        a["max_gap_to_fp32"] = max(abs(x - y) for x, y in zip(a["losses"], ref, strict=True))
        a["mean_gap_to_fp32"] = statistics.mean(abs(x - y) for x, y in zip(a["losses"], ref, strict=True))
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, (task, res) in zip(axes[0], results.items(), strict=True):
        for arm, style in zip(ARMS, ("-", "--", ":"), strict=True):
            ax.plot(res["arms"][arm]["losses"], style, label=arm)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="which tasks to run")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per arm")
    parser.add_argument("--batch", type=int, default=8, help="MiniLM batch size")
    parser.add_argument("--lm-batch", type=int, default=2, help="SmolLM2 batch size (blocks)")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence / block")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches")
    parser.add_argument("--lora-lr", type=float, default=1e-4, help="adapter learning rate")
    parser.add_argument("--galore-lr", type=float, default=1e-5, help="GaLore learning rate (full-parameter)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "mixed_precision", help="output path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_transformers()
    t0 = time.perf_counter()
    results = {task: run_task(task, args) for task in args.tasks}
    meta = {"platform": platform.platform(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
            "steps": args.steps, "seq": args.seq, "batch": args.batch, "lm_batch": args.lm_batch,
            "wall_s": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    lines = [
        "# Mixed precision: fp32 vs bf16 training, side by side",
        "",
        f"{args.steps} steps per arm, same start and batches; MiniLM batch {args.batch} × {args.seq}, SmolLM2 batch "
        f"{args.lm_batch} × {args.seq}; CPU `{meta['cpu_capability']}`, {args.threads} threads, "
        f"torch {torch.__version__}. "
        "Arms: `fp32` (reference), `bf16` (bf16 base; fp32 adapters / fp32 master weights for GaLore: the rankwise "
        "defaults), `bf16-naive` (adapters in bf16, no master copy). Update error = ‖ΔW_arm − ΔW_fp32‖ / "
        "‖ΔW_fp32‖ over the trained tensors (the change from the common start, in fp32; 'master': of the fp32 "
        "master copy `master_weights=True` keeps, the run's real result); entries changed = share "
        "of trained entries that moved at all. Loss curves: `mixed_precision.png`.",
        "",
        "| task | lr | arm | update error vs fp32 | entries changed | final train loss | held-out | "
        "mean / max gap to fp32 loss | median step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, res in results.items():
        metric = "acc" if task.startswith("minilm") else "ppl"
        for arm in ARMS:
            a = res["arms"][arm]
            master = a.get("master_update_error_vs_fp32")
            shown = f"{a['update_error_vs_fp32']:.3f}" + ("" if master is None else f" (master {master:.3f})")
            lines.append(f"| {task} | {res['lr']:g} | {arm} | {shown} | "
                         f"{a['entries_changed']:.1%} | {a['final_loss']:.4f} | {metric} {a['held_out']:.4g} | "
                         f"{a['mean_gap_to_fp32']:.4f} / {a['max_gap_to_fp32']:.4f} | {a['median_step_s']:.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
