"""``rw.plan`` against ``torch.cuda.max_memory_allocated`` on a GPU: for each configuration, the plan's
peak and the measured peak of three real training steps (forward, backward, optimizer step,
``zero_grad(set_to_none=True)``; the first step allocates the optimizer state and, for projected
optimizers, runs the first subspace refresh), side by side; the check passes when every plan is
within 10% of the measurement.

The models are built from their configs with random weights (memory does not depend on the values):
SmolLM2-135M's config (offline, from the packaged asset) and the scratch 60M Llama.

    python benchmarks/plan_gpu_check.py                  # on a CUDA machine: JSON + Markdown in results/
    python benchmarks/plan_gpu_check.py --dry-run        # anywhere: the same code on CPU with a tiny
                                                         # model, no comparison (checks the script runs)

Without CUDA and without ``--dry-run`` it prints that it needs a GPU and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import rankwise as rw
from rankwise.planner import batch_for, build_meta_model, loss_of

RESULTS = Path(__file__).parent / "results"
TOLERANCE = 0.10

#: (label, rw.plan keyword arguments); model names resolve offline.
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("smollm2 lora r8 bf16 8x512", dict(model="smollm2", method="lora", method_options={"r": 8}, dtype="bf16",
                                       batch_size=8, seq_len=512)),
    ("smollm2 lora r8 bf16 8x512 ckpt", dict(model="smollm2", method="lora", method_options={"r": 8},
                                            dtype="bf16", batch_size=8, seq_len=512, checkpointing=True)),
    ("smollm2 full adamw fp32 4x512", dict(model="smollm2", batch_size=4, seq_len=512)),
    ("smollm2 full adamw bf16 8x1024 ckpt", dict(model="smollm2", dtype="bf16", batch_size=8, seq_len=1024,
                                                 checkpointing=True)),
    ("smollm2 galore r128 fp32 4x512", dict(model="smollm2", optimizer="galore",
                                            optimizer_options={"rank": 128}, batch_size=4, seq_len=512)),
    ("smollm2 galore-svd r128 fp32 4x512", dict(model="smollm2", optimizer="galore",
                                                optimizer_options={"rank": 128, "projector": "svd"},
                                                batch_size=4, seq_len=512)),
    ("scratch-60m apollo r128 fp32 8x512", dict(model="scratch-60m", optimizer="apollo",
                                                optimizer_options={"rank": 128}, batch_size=8, seq_len=512)),
    ("scratch-60m fira r128 fp32 8x512 layerwise", dict(model="scratch-60m", optimizer="fira",
                                                        optimizer_options={"rank": 128}, batch_size=8,
                                                        seq_len=512, layerwise=True)),
    ("scratch-60m lisa fp32 8x512", dict(model="scratch-60m", optimizer="lisa",
                                         optimizer_options={"lr": 1e-4, "n_layers": 2}, batch_size=8,
                                         seq_len=512)),
    ("smollm2 lora r16 nf4 bf16 8x512", dict(model="smollm2", method="lora", method_options={"r": 16},
                                             dtype="bf16", quant="nf4", batch_size=8, seq_len=512)),
]
DRY_RUN: list[tuple[str, dict[str, Any]]] = [  # the tiny model: short sequences, rank 4, no 4-bit
    (label, {**kw, "batch_size": 2, "seq_len": 16,
             **({"optimizer_options": {**kw["optimizer_options"], "rank": 4}}
                if "rank" in kw.get("optimizer_options", {}) else {})})
    for label, kw in CONFIGS if "quant" not in kw
]


def _tiny_config() -> Any:
    from rankwise.models.loaders import tiny_llama

    return tiny_llama(vocab_size=96, hidden=32, layers=2, heads=4, intermediate=64, seed=0).config


def _optimizer(model: torch.nn.Module, kw: dict[str, Any]) -> torch.optim.Optimizer:
    name, options = kw.get("optimizer", "adamw"), dict(kw.get("optimizer_options", {}))
    if kw.get("layerwise"):
        from rankwise.optim.layerwise import LayerwiseOptimizer

        rest = {k: v for k, v in options.items() if k not in ("rank", "targets")}
        groups = rw.optim.param_groups(model, rank=options.get("rank", 128)) if "rank" in options else model
        return LayerwiseOptimizer(groups, lambda g: rw.optim.make(name, g, **rest))
    return rw.optim.make(name, model, **options)


def measure(kw: dict[str, Any], device: torch.device, config: Any | None = None, steps: int = 3) -> int:
    """Peak bytes allocated over ``steps`` real training steps of the configuration ``kw``."""
    from transformers import AutoModelForCausalLM

    from rankwise.planner import DTYPES

    meta_config = config if config is not None else build_meta_model(kw["model"])[0].config
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(meta_config), dtype=DTYPES[kw.get("dtype", "fp32")])
    model.to(device)
    if kw.get("quant"):
        rw.quantize(model, kw["quant"])
    if kw.get("method"):
        rw.adapt(model, kw["method"], **kw.get("method_options", {}))
    if kw.get("checkpointing"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = _optimizer(model, kw)
    model.train()
    inputs = batch_for(model, "causal-lm", kw["batch_size"], kw["seq_len"], device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for _ in range(steps):
        loss_of(model(**inputs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    peak = int(torch.cuda.max_memory_allocated(device))
    del model, opt, inputs
    return peak


def markdown(rows: list[dict[str, Any]], device: str) -> str:
    lines = [f"# rw.plan vs torch.cuda.max_memory_allocated ({device})", "",
             "| configuration | planned peak (MiB) | measured peak (MiB) | error | phase | within 10% |",
             "|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['planned'] / 2**20:.0f} | {r['measured'] / 2**20:.0f} | "
                     f"{r['error']:+.1%} | {r['phase']} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run the code path on CPU with a tiny model")
    parser.add_argument("--only", help="run the configurations whose label contains this text")
    parser.add_argument("--out", type=Path, default=RESULTS / "plan_gpu_check.json")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("plan_gpu_check: no CUDA device; nothing to measure (use --dry-run to exercise the code on CPU)")
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    configs = [c for c in (DRY_RUN if args.dry_run else CONFIGS) if not args.only or args.only in c[0]]
    rows = []
    for label, kw in configs:
        if kw.get("quant") and device.type == "cuda":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                print(f"{label}: skipped (bitsandbytes missing)")
                continue
        config = _tiny_config() if args.dry_run else None
        t0 = time.time()
        planned = rw.plan(config if config is not None else kw["model"],
                          **{k: v for k, v in kw.items() if k != "model"})
        measured = measure(kw, device, config)
        error = (planned.peak - measured) / measured if measured else 0.0
        row = {"label": label, "planned": planned.peak, "measured": measured, "error": error,
               "ok": abs(error) <= TOLERANCE, "phase": planned.peak_phase, "plan": planned.to_dict(),
               "seconds": time.time() - t0}
        rows.append(row)
        print(f"{label:45s} plan {planned.peak / 2**20:9.1f} MiB  measured {measured / 2**20:9.1f} MiB  "
              f"{error:+.1%}", flush=True)
    if args.dry_run:
        print(f"dry run: {len(rows)} configurations ran on CPU")
        return 0
    name = torch.cuda.get_device_name(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": name, "tolerance": TOLERANCE, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, name))
    bad = [r["label"] for r in rows if not r["ok"]]
    print("all within 10%" if not bad else f"outside 10%: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
