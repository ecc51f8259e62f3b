"""Held-out perplexity of compressed SmolLM2-135M against the kept-weight ratio.

Methods ``svd`` (uniform truncated SVD, the baseline), ``welore``, ``lord`` (and ``lord-data``, its
data-aware variant calibrated on the first ``--prune-steps`` training batches) and ``loraprune`` at
ratios 0.9 / 0.7 / 0.5 of the targeted weights (every attention and MLP linear of the 30 blocks,
106.2M of the 134.5M parameters; embeddings are tied and untouched). Each configuration is measured
right after compression and after a short recovery fine-tune with the method's own trainable part:
the factor pairs (svd, lord), the LRC factors only (welore), LoRA r=8 on the shrunk model, merged
(loraprune: its pruned heads and channels are physically removed). LoRAPrune is not one-shot: its
pruning schedule itself fine-tunes LoRA for ``--prune-steps`` steps before the "compressed" measurement.

Held-out data: the first ``--eval-blocks`` 128-token blocks of the BBC News and stdlib-code test
splits. Training batches (pruning and recovery) are one fixed, seeded sequence of 4x128 blocks from
the BBC + stdlib-code train splits, the same for every method.

Budget (2 CPU cores): one SVD of every matrix (~45 s, cached across ratios and methods), 25
evaluations of 2 x 16 blocks, 12 recoveries of 16 steps at 4x128 (51 s each single-threaded once the
other load had dropped) and 3 pruning runs of 16 steps: about 20 minutes. The committed results took 31 min
because the cores were shared with other jobs; use ``--threads 1`` on a shared machine.

    python benchmarks/compress_smollm2.py --threads 1   # writes benchmarks/results/compress_smollm2.{json,md,png}
    python benchmarks/compress_smollm2.py --threads 1 --methods lord-data --extend   # add rows to the committed result
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import rankwise as rw
from rankwise.compress import SVDCache, eval_blocks, evaluate_corpora, recover
from rankwise.compress.evaluate import EVAL_CORPORA
from rankwise.data import lm_blocks, load_text
from rankwise.memory import total_params
from rankwise.models import load_model

RESULTS = Path(__file__).parent / "results"
METHODS = ("svd", "welore", "lord", "lord-data", "loraprune")
DEFAULT_METHODS = ("svd", "welore", "lord", "loraprune")
RECOVERY = {"svd": "factor pairs", "welore": "LRC factors only", "lord": "factor pairs", "lord-data": "factor pairs",
            "loraprune": "LoRA r=8 on the shrunk model, merged"}


def train_batches(tokenizer, n: int, batch_size: int, block_size: int, seed: int) -> list[dict]:
    """A fixed list of ``n`` LM batches (seeded sample of BBC + stdlib-code train documents)."""
    docs = load_text("bbc+stdlib-code", split="train", seed=seed, limit=max(64, n * batch_size // 2))
    blocks = lm_blocks(docs, tokenizer, block_size)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=g)
    out = []
    for i in range(n):
        idx = order[(torch.arange(batch_size) + i * batch_size) % len(blocks)]
        ids = blocks[idx]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def geo_mean(ppl: dict[str, float]) -> float:
    return math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl))


def run_one(base, method: str, ratio: float, args, cache: SVDCache, batches: list[dict], blocks) -> dict:
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    if method == "loraprune":
        rw.compress(model, "loraprune", ratio=ratio, data=batches[: args.prune_steps], steps=args.prune_steps,
                    lr=args.lora_lr, r=8, alpha=16.0, prune_every=2, warmup=0.1, cooldown=0.0)
    elif method == "lord-data":
        rw.compress(model, "lord", ratio=ratio, data=batches[: args.prune_steps], cache=cache)
    else:
        rw.compress(model, method, ratio=ratio, cache=cache)
    compress_s = time.perf_counter() - t0
    state = model.rankwise_compress
    row = {"method": method, "ratio": ratio, "kept_fraction": state.kept_fraction,
           "targeted_weights": state.weights_after, "parameters": total_params(model),
           "compress_seconds": round(compress_s, 1)}
    row["ppl"] = evaluate_corpora(model, None, batch_size=args.eval_batch, blocks=blocks)
    if args.recover_steps > 0:
        t0 = time.perf_counter()
        lr = args.lora_lr if method == "loraprune" else args.factor_lr
        data = batches[args.prune_steps : args.prune_steps + args.recover_steps]
        recover(model, data, args.recover_steps, lr=lr)
        row["recover_seconds"] = round(time.perf_counter() - t0, 1)
        row["ppl_recovered"] = evaluate_corpora(model, None, batch_size=args.eval_batch, blocks=blocks)
    if method == "welore":
        row["lrc"] = len(state.details["lrc"])
        row["nlrc"] = len(state.details["nlrc"])
    return row


def markdown(result: dict) -> str:
    rows = result["rows"]
    base = result["base"]["ppl"]
    svd = {(r["ratio"]): r for r in rows if r["method"] == "svd"}
    lines = [
        "# Compressing SmolLM2-135M: held-out perplexity against kept weights",
        "",
        f"Base model: {result['base']['parameters']:,} parameters, perplexity BBC {base['bbc']:.2f}, "
        f"stdlib-code {base['stdlib-code']:.2f} (first {result['config']['eval_blocks']} blocks of 128 tokens "
        "of each test split). `kept` = kept fraction of the targeted weights (all attention + MLP linears, "
        f"{result['targeted_weights']:,} weights). Recovery: {result['config']['recover_steps']} steps at "
        f"{result['config']['train_batch']}x128 with the method's own trainable part "
        "(svd, lord, lord-data: factor pairs; welore: LRC factors only; loraprune: LoRA on the shrunk model, "
        f"merged; LoRAPrune's pruning schedule itself trains LoRA for {result['config']['prune_steps']} steps, "
        f"and lord-data is calibrated on those {result['config']['prune_steps']} batches). "
        "`vs svd` compares the geometric mean of the two perplexities with the SVD baseline at the same "
        "ratio and stage.",
        "",
        "| method | ratio | kept | parameters | ppl BBC | ppl code | vs svd | ppl BBC (recovered) "
        "| ppl code (recovered) | vs svd (recovered) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]

    def verdict(r: dict, ref: dict | None, key: str) -> str:
        if r["method"] == "svd" or ref is None or key not in r:
            return "—"
        return "beats" if geo_mean(r[key]) < geo_mean(ref[key]) else "worse"

    for r in rows:
        ref = svd.get(r["ratio"])
        rec = r.get("ppl_recovered", {})
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r['kept_fraction']:.3f} | {r['parameters'] / 1e6:.1f}M | "
            f"{r['ppl']['bbc']:.4g} | {r['ppl']['stdlib-code']:.4g} | {verdict(r, ref, 'ppl')} | "
            f"{rec.get('bbc', float('nan')):.4g} | {rec.get('stdlib-code', float('nan')):.4g} | "
            f"{verdict(r, ref, 'ppl_recovered')} |"
        )
    load = result.get("load_average")
    busy = f" (1/5/15-min load average at start {load['start']}, at end {load['end']})" if load else ""
    lines += ["", f"Total wall time {result['wall_seconds'] / 60:.1f} min on {result['machine']}{busy}.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, corpus in zip(axes, EVAL_CORPORA, strict=True):
        for i, method in enumerate(result["config"]["methods"]):
            rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["ratio"])
            if not rows:
                continue
            x = [r["kept_fraction"] for r in rows]
            color = f"C{i}"
            ax.plot(x, [r["ppl"][corpus] for r in rows], "o-", color=color, label=f"{method}")
            if all("ppl_recovered" in r for r in rows):
                ax.plot(x, [r["ppl_recovered"][corpus] for r in rows], "s--", color=color, label=f"{method} + recovery")
        ax.axhline(result["base"]["ppl"][corpus], color="k", lw=0.8, ls=":", label="uncompressed")
        ax.set_yscale("log")
        ax.set_xlabel("kept fraction of targeted weights")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"SmolLM2-135M, {corpus}")
        ax.invert_xaxis()
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--extend", action="store_true",
                        help="add these methods' rows to the existing result file (same settings) "
                        "instead of replacing it")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.9, 0.7, 0.5])
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--prune-steps", type=int, default=16)
    parser.add_argument("--recover-steps", type=int, default=16)
    parser.add_argument("--factor-lr", type=float, default=1e-4)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="compress_smollm2")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster when the cores are shared)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    load_start = os.getloadavg()
    torch.manual_seed(args.seed)
    base, tok = load_model("smollm2-135m")
    blocks = {c: eval_blocks(tok, c, args.eval_blocks, 128) for c in EVAL_CORPORA}
    batches = train_batches(tok, args.prune_steps + args.recover_steps, args.train_batch, 128, args.seed)
    base_row = {"parameters": total_params(base),
                "ppl": evaluate_corpora(base, None, batch_size=args.eval_batch, blocks=blocks)}
    targeted = sum(m.weight.numel() for _, m in rw.compression.api.find_targets(base, "all-linear"))
    print(f"base: {base_row}")
    cache = SVDCache()
    rows = []
    configs = [(m, r) for r in args.ratios for m in args.methods]
    for method, ratio in tqdm(configs, desc="configs"):
        row = run_one(base, method, ratio, args, cache, batches, blocks)
        rows.append(row)
        tqdm.write(json.dumps(row))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "extend"}
    wall = round(time.perf_counter() - start, 1)
    if args.extend:
        old = json.loads((args.out / f"{args.name}.json").read_text())
        settings = ("ratios", "eval_blocks", "train_batch", "prune_steps", "recover_steps", "factor_lr", "lora_lr",
                    "seed")
        for key in settings:
            if old["config"][key] != config[key]:
                raise SystemExit(
                    f"--extend: {key} differs from the existing result ({old['config'][key]} vs {config[key]})"
                )
        rows = [r for r in old["rows"] if r["method"] not in args.methods] + rows
        config["methods"] = [m for m in METHODS if any(r["method"] == m for r in rows)]
        wall += old["wall_seconds"]
    rows.sort(key=lambda r: (-r["ratio"], METHODS.index(r["method"])))
    result = {
        "config": config,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "base": base_row,
        "targeted_weights": targeted,
        "recovery": RECOVERY,
        "rows": rows,
        "wall_seconds": wall,
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    plot(result, args.out / f"{args.name}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
