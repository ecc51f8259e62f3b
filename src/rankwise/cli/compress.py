"""``rankwise compress``: compress a packaged (or local) causal LM and report held-out perplexity before
and after compression (and after an optional recovery fine-tune)."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

from .common import Formatter, UsageError, add_flag, check_model_name, check_writable, text_loader

DESCRIPTION = """\
Compress a causal LM with rw.compress and measure it. Prints parameter counts and
perplexity on the first --eval-blocks blocks of the BBC and stdlib-code test splits
before and after compression (and after the optional recovery fine-tune), writes
report.json + report.md to --output and saves the compressed model there in the
rankwise compressed format (OUTPUT/model, rankwise.compression.load_compressed)."""
EPILOG = """\
examples:
  rankwise compress --method welore --ratio 0.5
  rankwise compress --model smollm2-135m --method svd --rank 64 --recover-steps 16
  rankwise compress --method lord --ratio 0.7 --calibration-batches 8 --no-save
  rankwise compress --method slicegpt --ratio 0.8 --calibration-batches 16
  rankwise compress --method loraprune --ratio 0.8 --max-steps 24 --output runs/prune
  rankwise compress --model ./my-llama --method pela --ratio 0.6 --max-length 256"""
#: Methods that train during compression (``--max-steps``), with their default step counts.
TRAINING_METHODS = {"loraprune": 24, "dsee": 0, "pela": 0}
#: Methods that take calibration batches (``--calibration-batches``), with their default counts
#: (LoRD: optional, data-free without; SliceGPT, DSnoT and ECoFLaP need them).
CALIBRATED_METHODS = {"lord": 0, "slicegpt": 16, "dsnot": 16, "ecoflap": 16, "modegpt": 16, "spqr": 16}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``compress`` to the ``rankwise`` subcommands."""
    from ..compress.api import COMPRESS_METHODS

    p = subparsers.add_parser("compress", help=f"compress a model ({', '.join(sorted(COMPRESS_METHODS))})",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=Formatter)
    add_flag(p, "model", "packaged model name or local HF directory [default: smollm2-135m]", default="smollm2-135m")
    add_flag(p, "method", f"compression method: {', '.join(sorted(COMPRESS_METHODS))} (required)", required=True,
             choices=sorted(COMPRESS_METHODS))
    p.add_argument("--ratio", type=float, default=0.5,
                   help="kept fraction of the targeted weights, in (0, 1] [default: 0.5]")
    add_flag(p, "rank", "fixed rank for every matrix (svd, lord, pela) instead of one from --ratio")
    add_flag(p, "max_steps", "training steps of the method itself (loraprune: pruning schedule [default: 24]; "
                             "dsee; pela distillation [default: 0])")
    p.add_argument("--recover-steps", type=int, default=0, metavar="N",
                   help="recovery fine-tuning steps after compression [default: 0]")
    p.add_argument("--calibration-batches", type=int, default=None, metavar="N",
                   help="calibration training batches: lord decomposes the layer outputs on them (data-aware LoRD; "
                        "default 0: data-free truncated SVD); slicegpt (PCA), dsnot, ecoflap (input statistics), "
                        "modegpt (module correlations) and spqr (Hessians) need them [default: 16]")
    add_flag(p, "lr", "learning rate of the method's training and the recovery [default: 1e-4]", default=1e-4)
    p.add_argument("--eval-blocks", type=int, default=16, metavar="N", help="held-out blocks per corpus [default: 16]")
    add_flag(p, "max_length", "tokens per LM block, for evaluation and training [default: 128]", default=128)
    add_flag(p, "batch_size", "evaluation batch size [default: 8]", default=8)
    p.add_argument("--train-batch-size", type=int, default=4, metavar="N",
                   help="batch size of the method's training, calibration and recovery [default: 4]")
    add_flag(p, "seed", "seed of the training data sample and order [default: 0]", default=0)
    add_flag(p, "output", "report + model directory [default: ./compress-<method>-<ratio>]")
    p.add_argument("--no-save", action="store_true", help="write the report only, not the compressed model")
    add_flag(p, "progress", "no progress bars")
    p.set_defaults(func=run)
    return p


def _measure(model: Any, tokenizer: Any, blocks: dict, args: argparse.Namespace) -> dict[str, Any]:
    from ..compress.evaluate import evaluate_corpora, weight_count

    t0 = time.perf_counter()
    ppl = evaluate_corpora(model, tokenizer, batch_size=args.batch_size, blocks=blocks, progress=args.progress)
    state = getattr(model, "rankwise_compress", None)
    out = {"parameters": weight_count(model), "perplexity": ppl, "eval_seconds": round(time.perf_counter() - t0, 1)}
    if state is not None:
        out["targeted_weights"] = state.weights_after
        out["kept_fraction"] = round(state.kept_fraction, 4)
    return out


def markdown_report(report: dict[str, Any]) -> str:
    """``report.md``: one table row per stage (before, compressed, recovered)."""
    from ..compress.evaluate import EVAL_CORPORA
    from ..report import Column, markdown_table

    stages = [("before", report["before"]), ("compressed", report["after"])]
    if report.get("recovered"):
        stages.append((f"recovered ({report['recover_steps']} steps)", report["recovered"]))
    rows = [{"stage": label, "parameters": m["parameters"], "targeted_weights": m.get("targeted_weights"),
             **{f"ppl {c}": m["perplexity"][c] for c in EVAL_CORPORA}} for label, m in stages]
    columns = [Column("stage", "stage", align="<"), Column("parameters", "parameters", "{:,}".format),
               Column("targeted_weights", "targeted weights", "{:,}".format),
               *(Column(f"ppl {c}", f"ppl {c}", "{:.2f}".format) for c in EVAL_CORPORA)]
    saved = f"Compressed model: `{report['saved_to']}`" if report.get("saved_to") else "Model not saved."
    return "\n".join([
        f"# rankwise compress: {report['model']} / {report['method']} / ratio {report['ratio']}", "",
        markdown_table(rows, columns), "",
        f"Held-out: first {report['eval_blocks']} blocks of {report['block_size']} tokens of each test split.",
        saved, "",
    ])


def _training_data(args: argparse.Namespace, tokenizer: Any, steps: int, trains: bool) -> tuple[Any, Any]:
    """``(loader, data)``: the training loader (None when no step or batch needs one) and what the
    method gets as ``data`` (the loader when it trains, else the calibration batches, else None)."""
    calibration = calibration_batches(args)
    needed = steps + args.recover_steps + calibration
    loader = None
    if needed:  # a seeded sample of documents, enough for the batches needed (tokenizing all is slow)
        loader = text_loader("bbc+stdlib-code", "train", tokenizer, args.max_length, args.train_batch_size,
                             args.seed, limit=max(64, needed * args.train_batch_size // 2))
    data = loader if trains else (list(itertools.islice(loader, calibration)) if calibration else None)
    return loader, data


def _compress_options(args: argparse.Namespace, trains: bool) -> dict[str, Any]:
    """Method options from the flags: a fixed ``rank``, and the ``lr`` of a method that trains."""
    config: dict[str, Any] = {}
    if args.rank is not None:
        config["rank"] = args.rank
    if trains:
        config["lr"] = args.lr
    return config


def _recover(model: Any, tokenizer: Any, blocks: dict, loader: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """Recovery fine-tune for ``--recover-steps`` and measure again; None when there are no steps."""
    from ..compress.api import recover

    if args.recover_steps <= 0:
        return None
    t0 = time.perf_counter()
    recover(model, loader, args.recover_steps, lr=args.lr, progress=args.progress)
    recovered = _measure(model, tokenizer, blocks, args)
    recovered["recover_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"recovered ({args.recover_steps} steps): perplexity {recovered['perplexity']}")
    return recovered


def _write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` and say where."""
    from ..io import write_json
    from ..report import write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", json.loads(json.dumps(report, default=str)))
    write_text(out_dir / "report.md", markdown_report(report))
    print(f"report: {out_dir / 'report.json'}, {out_dir / 'report.md'}")


def calibration_batches(args: argparse.Namespace) -> int:
    """``--calibration-batches``, or the method's default count (0 for methods without calibration)."""
    given = args.calibration_batches
    return given if given is not None else CALIBRATED_METHODS.get(args.method, 0)


def check_args(args: argparse.Namespace) -> None:
    """Every number, the model name and the method's use of the flags, checked before anything is loaded."""
    from ..checks import fraction, integer, number

    fraction("--ratio", args.ratio)
    integer("--rank", args.rank, 1, optional=True)
    integer("--max-steps", args.max_steps, 0, optional=True)
    integer("--recover-steps", args.recover_steps, 0)
    integer("--calibration-batches", args.calibration_batches, 0, optional=True)
    for flag in ("eval_blocks", "max_length", "batch_size", "train_batch_size"):
        integer("--" + flag.replace("_", "-"), getattr(args, flag), 1)
    number("--lr", args.lr, 0, low_open=True)
    integer("--seed", args.seed)
    if args.calibration_batches and args.method not in CALIBRATED_METHODS:
        raise UsageError(f"--calibration-batches={args.calibration_batches} needs --method "
                         f"{' / '.join(CALIBRATED_METHODS)} and a count >= 0")
    if args.method in CALIBRATED_METHODS and CALIBRATED_METHODS[args.method] and calibration_batches(args) < 1:
        raise UsageError(f"--calibration-batches={args.calibration_batches}: method {args.method!r} needs at least 1")
    if args.max_steps and args.method not in TRAINING_METHODS:
        raise UsageError(f"--max-steps {args.max_steps}: method {args.method!r} is one-shot; methods that train: "
                         f"{sorted(TRAINING_METHODS)} (use --recover-steps for a recovery fine-tune)")
    check_model_name(args.model)


def run(args: argparse.Namespace) -> int:
    """Run the ``compress`` subcommand; returns the exit status."""
    from ..io import directory_lock

    check_args(args)
    out_dir = Path(args.output if args.output is not None else f"compress-{args.method}-{args.ratio:g}")
    check_writable(args.output if args.output is not None else out_dir)
    with directory_lock(out_dir):
        return _run(args, out_dir)


def _run(args: argparse.Namespace, out_dir: Path) -> int:
    import torch

    from ..compress.api import compress, save_compressed
    from ..compress.evaluate import EVAL_CORPORA, eval_blocks
    from ..models import load_model

    torch.manual_seed(args.seed)
    steps = args.max_steps if args.max_steps is not None else TRAINING_METHODS.get(args.method, 0)
    model, tokenizer = load_model(args.model)
    blocks = {c: eval_blocks(tokenizer, c, args.eval_blocks, args.max_length) for c in EVAL_CORPORA}
    before = _measure(model, tokenizer, blocks, args)
    print(f"before: {before['parameters']:,} parameters, perplexity {before['perplexity']}")

    trains = args.method in TRAINING_METHODS and steps > 0
    loader, data = _training_data(args, tokenizer, steps, trains)
    t0 = time.perf_counter()
    compress(model, args.method, args.ratio, data=data, steps=steps, progress=args.progress,
             **_compress_options(args, trains))
    seconds = time.perf_counter() - t0
    before["targeted_weights"] = model.rankwise_compress.weights_before
    after = _measure(model, tokenizer, blocks, args)
    after["compress_seconds"] = round(seconds, 1)
    print(f"compressed ({seconds:.0f}s): {after['parameters']:,} parameters, kept {after.get('kept_fraction')} "
          f"of the targeted weights, perplexity {after['perplexity']}")
    recovered = _recover(model, tokenizer, blocks, loader, args)

    saved = None if args.no_save else str(save_compressed(model, out_dir / "model", tokenizer))
    state = model.rankwise_compress
    _write_report(out_dir, {
        "model": args.model, "method": args.method, "ratio": args.ratio, "rank": args.rank, "steps": steps,
        "calibration_batches": calibration_batches(args),
        "recover_steps": args.recover_steps, "lr": args.lr, "eval_blocks": args.eval_blocks,
        "block_size": args.max_length, "before": before, "after": after, "recovered": recovered,
        "ranks": state.ranks, "details": state.to_dict()["details"], "saved_to": saved,
    })
    return 0
