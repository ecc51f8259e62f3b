"""``rankwise compress``: compress a packaged (or local) causal LM and report held-out perplexity.

    rankwise compress --model smollm2-135m --method welore --ratio 0.5 [--recover-steps N] [--output DIR]

Prints parameter counts and perplexity on the BBC and stdlib-code test blocks before and after
compression (and after the optional recovery fine-tune), writes ``report.json`` + ``report.md`` to
``--output`` and saves the compressed model there in the rankwise compressed format
(``model/``, loadable with ``rankwise.compression.load_compressed``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_file, write_json
from .api import COMPRESS_METHODS, compress, recover, save_compressed
from .evaluate import EVAL_CORPORA, eval_blocks, evaluate_corpora, weight_count

TRAINING_METHODS = ("loraprune", "dsee", "pela")
DEFAULT_STEPS = {"loraprune": 24, "dsee": 0, "pela": 0}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compress`` sub-command to an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser("compress", help="compress a model (svd, welore, lord, pela, loraprune, dsee)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="packaged model name or local HF directory")
    p.add_argument("--method", required=True, choices=sorted(COMPRESS_METHODS))
    p.add_argument("--ratio", type=float, default=0.5, help="kept fraction of the targeted weights, in (0, 1]")
    p.add_argument("--rank", type=int, default=None, help="fixed rank for every matrix (svd, lord, pela)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of the method itself (loraprune: pruning schedule; dsee; pela distillation)")
    p.add_argument("--recover-steps", type=int, default=0, help="recovery fine-tuning steps after compression")
    p.add_argument("--calibration-batches", type=int, default=0,
                   help="lord only: decompose the layer outputs on this many training batches (data-aware LoRD) "
                        "instead of the weights (0, the default: data-free truncated SVD)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the method's training and the recovery")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks per corpus")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    p.add_argument("--train-batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="report + model directory (default ./compress-<method>-<ratio>)")
    p.add_argument("--no-save", action="store_true", help="write the report only, not the compressed model")
    p.add_argument("--no-progress", action="store_true")
    return p


def _train_loader(tokenizer: Any, block_size: int, batch_size: int, seed: int, steps: int):
    """Shuffled training blocks from a seeded sample of BBC + stdlib-code train documents, enough for
    ``steps`` batches (documents are sampled, not the whole corpus, to keep tokenization quick)."""
    from ..data import lm_blocks, lm_loader, load_text

    docs = load_text("bbc+stdlib-code", split="train", seed=seed, limit=max(64, steps * batch_size // 2))
    return lm_loader(lm_blocks(docs, tokenizer, block_size), batch_size=batch_size, shuffle=True, seed=seed)


def _measure(model, tokenizer, blocks, args) -> dict[str, Any]:
    t0 = time.perf_counter()
    ppl = evaluate_corpora(model, tokenizer, batch_size=args.batch_size, blocks=blocks, progress=not args.no_progress)
    state = getattr(model, "rankwise_compress", None)
    out = {"parameters": weight_count(model), "perplexity": ppl, "eval_seconds": round(time.perf_counter() - t0, 1)}
    if state is not None:
        out["targeted_weights"] = state.weights_after
        out["kept_fraction"] = round(state.kept_fraction, 4)
    return out


def _markdown(report: dict[str, Any]) -> str:
    rows = [("before", report["before"]), ("compressed", report["after"])]
    if report.get("recovered"):
        rows.append((f"recovered ({report['recover_steps']} steps)", report["recovered"]))
    lines = [
        f"# rankwise compress: {report['model']} / {report['method']} / ratio {report['ratio']}",
        "",
        "| stage | parameters | targeted weights | " + " | ".join(f"ppl {c}" for c in EVAL_CORPORA) + " |",
        "|---|---:|---:|" + "---:|" * len(EVAL_CORPORA),
    ]
    for label, m in rows:
        ppl = " | ".join(f"{m['perplexity'][c]:.2f}" for c in EVAL_CORPORA)
        lines.append(f"| {label} | {m['parameters']:,} | {m.get('targeted_weights', 0):,} | {ppl} |")
    lines += ["", f"Held-out: first {report['eval_blocks']} blocks of {report['block_size']} tokens of each test split.",
              f"Compressed model: `{report['saved_to']}`" if report.get("saved_to") else "Model not saved.", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the ``compress`` sub-command; returns the exit status."""
    from ..models import load_model

    torch.manual_seed(args.seed)
    progress = not args.no_progress
    out_dir = Path(args.output or f"compress-{args.method}-{args.ratio:g}")
    model, tokenizer = load_model(args.model)
    blocks = {c: eval_blocks(tokenizer, c, args.eval_blocks, args.block_size) for c in EVAL_CORPORA}
    before = _measure(model, tokenizer, blocks, args)
    print(f"before: {before['parameters']:,} parameters, perplexity {before['perplexity']}")

    steps = args.steps if args.steps is not None else DEFAULT_STEPS.get(args.method, 0)
    if args.calibration_batches < 0 or (args.calibration_batches and args.method != "lord"):
        raise ValueError(f"--calibration-batches={args.calibration_batches} needs --method lord and a count >= 0")
    trains = args.method in TRAINING_METHODS and steps > 0
    needed = steps + args.recover_steps + args.calibration_batches
    loader = _train_loader(tokenizer, args.block_size, args.train_batch_size, args.seed, needed) if needed else None
    data = loader if trains else (list(itertools.islice(loader, args.calibration_batches))
                                  if args.calibration_batches else None)
    config: dict[str, Any] = {}
    if args.rank is not None:
        config["rank"] = args.rank
    if args.method in TRAINING_METHODS and steps > 0:
        config["lr"] = args.lr
    t0 = time.perf_counter()
    compress(model, args.method, args.ratio, data=data, steps=steps, progress=progress, **config)
    seconds = time.perf_counter() - t0
    before["targeted_weights"] = model.rankwise_compress.weights_before
    after = _measure(model, tokenizer, blocks, args)
    after["compress_seconds"] = round(seconds, 1)
    print(f"compressed ({seconds:.0f}s): {after['parameters']:,} parameters, kept {after.get('kept_fraction')} "
          f"of the targeted weights, perplexity {after['perplexity']}")

    recovered = None
    if args.recover_steps > 0:
        t0 = time.perf_counter()
        recover(model, loader, args.recover_steps, lr=args.lr, progress=progress)
        recovered = _measure(model, tokenizer, blocks, args)
        recovered["recover_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"recovered ({args.recover_steps} steps): perplexity {recovered['perplexity']}")

    saved = None
    if not args.no_save:
        saved = str(save_compressed(model, out_dir / "model", tokenizer))
    state = model.rankwise_compress
    report = {
        "model": args.model, "method": args.method, "ratio": args.ratio, "rank": args.rank, "steps": steps,
        "calibration_batches": args.calibration_batches,
        "recover_steps": args.recover_steps, "lr": args.lr, "eval_blocks": args.eval_blocks,
        "block_size": args.block_size, "before": before, "after": after, "recovered": recovered,
        "ranks": state.ranks, "details": state.to_dict()["details"], "saved_to": saved,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", json.loads(json.dumps(report, default=str)))
    with atomic_file(out_dir / "report.md") as f:
        f.write(_markdown(report))
    print(f"report: {out_dir / 'report.json'}, {out_dir / 'report.md'}")
    return 0
