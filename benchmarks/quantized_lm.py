"""Adapters over full-precision and 4-bit bases on SmolLM2-135M: LoRA (fp32 base), QLoRA (NF4 base),
LoftQ (NF4 base chosen with the factors) and LQ-LoRA (per-matrix bitsandbytes configs under a
bits-per-parameter budget, base chosen with the factors), all at the same rank on the same layers, so
the trainable parameters are equal.

Each variant runs in its own process (so its peak RSS is its own): SmolLM2-135M as a causal LM, the
adapter on every attention and MLP linear of the 30 blocks, ``--steps`` AdamW steps on one fixed,
seeded sequence of 4x128 blocks from the BBC + stdlib-code train splits (the same for every
variant), then held-out perplexity on the first ``--eval-blocks`` 128-token blocks of the BBC and
stdlib-code test splits (before training too: where each init starts). Reported per variant:
perplexities, stored weight bytes of the base (codes, block scales and their second-level scales
counted from what bitsandbytes stores; adapters apart), trainable parameters, median step time,
peak memory of the training window (the loop's measurement: on CPU the resident set, reset when
training starts) and of the whole process (which includes loading the fp32 checkpoint before it is
quantized), and the time the base and init took.

    python benchmarks/quantized_lm.py --threads 2     # writes benchmarks/results/quantized_lm.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from compress_smollm2 import train_batches  # noqa: E402  (run from benchmarks/ or with it on sys.path)

import rankwise as rw
from rankwise.adapters.lq_lora import lq_lora_report
from rankwise.callbacks import Callback
from rankwise.compress import eval_blocks, evaluate_corpora
from rankwise.compress.evaluate import EVAL_CORPORA
from rankwise.memory import count_params
from rankwise.models import load_model
from rankwise.quant import stash, stored_bits
from rankwise.targets import is_linear4bit
from rankwise.train import TrainConfig, train

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "lora": ("lora", {}),
    "qlora": ("qlora", {}),
    "loftq": ("loftq", {"loftq_iter": 2}),
    "lq_lora": ("lq_lora", {}),  # budget_bits from --budget-bits
}


def stored_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes the model stores besides its trainable adapter factors: the base's parameters and
    buffers, the bitsandbytes 4-bit layers' quantization state (block scales, their second-level
    scales and code books), and the adapters' own frozen buffers (LoftQ keeps its initial factors
    B₀, A₀ to give back W₀ ≈ Q + s·B₀A₀ on unload and export)."""
    layers = [layer for _, layer in rw.adapter_layers(model)]
    own = {id(t) for layer in layers for t in layer.parameters(recurse=False)}
    init = {id(t): t for layer in layers for t in layer.buffers(recurse=False)}
    base = sum(t.numel() * t.element_size() for t in model.parameters() if id(t) not in own)
    base += sum(t.numel() * t.element_size() for t in model.buffers() if id(t) not in init)
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            base += sum(t.numel() * t.element_size() for t in state.as_dict().values() if torch.is_tensor(t))
    adapter_buffers = sum(t.numel() * t.element_size() for t in init.values())
    return {"base": base, "adapter_buffers": adapter_buffers}


def run_variant(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    method, options = VARIANTS[args.variant]
    options = dict(options)
    if method == "lq_lora":
        options.update(budget_bits=args.budget_bits, lq_iter=args.lq_iter, quant_configs=args.lq_configs.split(","))
    base, tok = load_model("smollm2-135m")
    blocks = {c: eval_blocks(tok, c, args.eval_blocks, 128) for c in EVAL_CORPORA}
    batches = train_batches(tok, args.steps, 4, 128, args.seed)
    t0 = time.perf_counter()
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    rw.adapt(base, method, r=args.rank, alpha=2 * args.rank, targets=targets, **options)
    init_s = time.perf_counter() - t0
    row = {"variant": args.variant, "method": method, "options": options, "init_seconds": init_s,
           "weight_bytes": stored_bytes(base), "trainable_params": count_params(base)[0],
           "before": evaluate_corpora(base, None, blocks=blocks)}
    quantized = [layer for _, layer in rw.adapter_layers(base) if is_linear4bit(layer.base_layer)]
    if quantized:  # exact stored bits per weight of the adapted 4-bit matrices
        row["average_bits"] = (sum(stored_bits(stash(layer.base_layer)) for layer in quantized)
                               / sum(layer.in_features * layer.out_features for layer in quantized))
    if method == "lq_lora":
        report = lq_lora_report(base)
        row["configs_chosen"] = dict(Counter(report.configs.values()))
    times: list[float] = []

    class Timer(Callback):
        """Wall time of each step: from the previous step's end (or the start of training)."""

        def on_train_begin(self, s) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, s) -> None:
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

    result = train(base, batches, config=TrainConfig(max_steps=args.steps, lr=args.lr, warmup_steps=2,
                                                             progress=False, device=None), callbacks=[Timer()])
    row["after"] = evaluate_corpora(base, None, blocks=blocks)
    row["train_loss_first_last"] = [result.history[0]["loss"], result.history[-1]["loss"]]
    row["median_step_seconds"] = statistics.median(times)
    row["train_peak_bytes"] = result.peak_memory_bytes  # the loop's window: training only (CPU: peak RSS)
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # whole process
    return row


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantized_lm.json").write_text(json.dumps(result, indent=2))
    cfg = result["config"]
    lines = [
        f"# Adapters over fp32 and 4-bit bases, SmolLM2-135M (r={cfg['rank']}, {cfg['steps']} steps of 4x128 tokens, "
        f"lr {cfg['lr']})",
        "",
        f"Machine: {result['machine']}; {cfg['threads']} threads; each variant in its own process; fp32 compute.",
        "",
        "| variant | base weights MB | frozen adapter buffers MB | trainable | ppl BBC before → after | "
        "ppl code before → after | median step s | training peak MB | process peak MB | init s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        b, a = row["before"], row["after"]
        lines.append(
            f"| {row['variant']} | {row['weight_bytes']['base'] / 1e6:.1f} | "
            f"{row['weight_bytes']['adapter_buffers'] / 1e6:.1f} | {row['trainable_params']:,} | "
            f"{b['bbc']:.2f} → {a['bbc']:.2f} | {b['stdlib-code']:.2f} → {a['stdlib-code']:.2f} | "
            f"{row['median_step_seconds']:.2f} | "
            f"{'–' if row.get('train_peak_bytes') is None else round(row['train_peak_bytes'] / 1e6)} | "
            f"{row['peak_rss_bytes'] / 1e6:.0f} | {row['init_seconds']:.0f} |")
    lines += ["", "Stored bits per weight of the adapted matrices (codes + block scales + second-level scales):"]
    lines += [f"- {r['variant']}: {r['average_bits']:.3f}" + (f" (configs chosen: {r['configs_chosen']})"
              if "configs_chosen" in r else "") for r in result["rows"] if "average_bits" in r]
    lines += ["", f"LQ-LoRA budget: {cfg['budget_bits']} bits per weight, T = {cfg['lq_iter']}, candidates "
              f"{cfg['lq_configs']}."]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    (out / "quantized_lm.md").write_text("\n".join(lines) + "\n")
    plot(result, out)


def plot(result: dict, out: Path) -> None:
    """Held-out perplexity before (open) and after (filled) training, per variant and corpus; the tick
    labels give each variant's stored base weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for corpus, ax in zip(EVAL_CORPORA, axes, strict=True):
        for i, row in enumerate(rows):
            before, after = row["before"][corpus], row["after"][corpus]
            ax.annotate("", (i, after), (i, before), arrowprops={"arrowstyle": "->", "color": "0.6"})
            ax.scatter([i], [before], s=40, facecolors="none", edgecolors=f"C{i}")
            ax.scatter([i], [after], s=40, color=f"C{i}")
        ax.set_xticks(range(len(rows)),
                      [f"{r['variant']}\n{r['weight_bytes']['base'] / 1e6:.0f} MB" for r in rows])
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"{corpus}: before (open) → after (filled)")
    cfg = result["config"]
    fig.suptitle(f"SmolLM2-135M, r={cfg['rank']}, {cfg['steps']} steps; x: variant, stored base weights")
    fig.tight_layout()
    fig.savefig(out / "quantized_lm.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--budget-bits", type=float, default=4.13)  # QLoRA's NF4 (blocks of 64, double quant): 4.127
    parser.add_argument("--lq-iter", type=int, default=3)
    parser.add_argument("--lq-configs", default="nf4-b32-dq,nf4-b64-dq,nf4-b128-dq,nf4-b256-dq,nf4-b64",
                        help="LQ-LoRA's candidate bitsandbytes formats (comma-separated)")
    parser.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated module suffixes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    start = time.time()
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"--variants: {variant!r} is not one of {list(VARIANTS)}")
        cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)  # stderr: progress, errors
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(variant, r["before"], "->", r["after"], f"{r['median_step_seconds']:.2f}s/step",
              f"{r['weight_bytes']['base'] / 1e6:.1f} MB", flush=True)
    result = {"config": {k: v for k, v in vars(args).items() if k != "variant"}, "rows": rows,
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
              "seconds": time.time() - start}
    write_outputs(result, Path(args.out))
    print(f"done in {result['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
