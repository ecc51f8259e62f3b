"""Compensating compressed SmolLM2-135M: held-out perplexity of a compressed model without
compensation, with plain SVD compensation (rank-r truncated SVD of W − W_c), with EoRA
(rw.compression.eora, training-free) and with INT2.1's LREC (rw.compression.lrec: the same rank,
``--lrec-steps`` AdamW steps of distillation from the original on the calibration batches), all at
the same rank.

    python benchmarks/eora_smollm2.py --threads 1 [--rank 16] [--ratios 0.7,0.5] [--calibration 16]

Compressions: ``svd`` and ``welore`` at each of ``--ratios`` (rw.compress) and NF4 (rw.quantize). Calibration:
``--calibration`` seeded batches of 4x128 tokens from the BBC + stdlib-code train splits (the same
sampler as benchmarks/compress_smollm2.py); evaluation: the first 16 blocks of 128 tokens of the BBC
and stdlib-code test splits. Writes benchmarks/results/eora_smollm2.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from compress_smollm2 import train_batches  # noqa: E402  (run from benchmarks/ or with it on sys.path)

import rankwise as rw
from rankwise.compress import eval_blocks, evaluate_corpora
from rankwise.compress.evaluate import EVAL_CORPORA
from rankwise.models import load_model

RESULTS = Path(__file__).parent / "results"


def write(result: dict) -> None:
    """The JSON and a markdown table (perplexity BBC / code per compensation) in ``--out``."""
    out = Path(result["config"]["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "eora_smollm2.json").write_text(json.dumps(result, indent=2))
    cfg = result["config"]
    base = result["base"]
    lines = [f"# Compensating compressed SmolLM2-135M at rank {cfg['rank']} (held-out perplexity BBC / code)", "",
             f"Uncompressed: {base['bbc']:.1f} / {base['stdlib-code']:.1f}. Calibration {cfg['calibration']} "
             f"batches of 4x128 tokens; LREC {cfg['lrec_steps']} steps at lr {cfg['lrec_lr']}.", "",
             "| compression | ratio | none | plain SVD of W − W_c | EoRA | LREC (INT2.1) |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        cells = [f"{row[k]['bbc']:.3g} / {row[k]['stdlib-code']:.3g}" if k in row else "–"
                 for k in ("none", "plain_svd", "eora", "lrec")]
        lines.append(f"| {row['compression']} | {row.get('ratio') or '–'} | " + " | ".join(cells) + " |")
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    (out / "eora_smollm2.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--ratios", default="0.7,0.5")
    parser.add_argument("--lrec-steps", type=int, default=32)
    parser.add_argument("--lrec-lr", type=float, default=1e-3)
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--compressions", default="svd,welore,nf4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    base, tok = load_model("smollm2-135m")
    base.eval()
    blocks = {c: eval_blocks(tok, c, args.eval_blocks, 128) for c in EVAL_CORPORA}
    calibration = train_batches(tok, args.calibration, 4, 128, args.seed)
    result = {"config": vars(args), "base": evaluate_corpora(base, None, blocks=blocks), "rows": []}
    print("base", result["base"], flush=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    plan = [(how, None) if how == "nf4" else (how, ratio)
            for how in args.compressions.split(",") for ratio in (ratios if how != "nf4" else [None])]
    for how, ratio in plan:
        model = copy.deepcopy(base)
        if how == "nf4":
            rw.quantize(model, "nf4")
        else:
            rw.compress(model, how, ratio=ratio)
        row = {"compression": how, "ratio": ratio, "none": evaluate_corpora(model, None, blocks=blocks)}
        print(how, ratio, "none", row["none"], flush=True)
        for projection, key in (("none", "plain_svd"), ("eigen", "eora")):
            t0 = time.time()
            comp = rw.compression.eora(copy.deepcopy(model), base, calibration, r=args.rank, projection=projection)
            row[key] = evaluate_corpora(comp, None, blocks=blocks)
            state = comp.rankwise_eora["eora"]
            errs = state.errors.values()
            row[key + "_weighted_error"] = sum(e["after"] for e in errs) / max(sum(e["before"] for e in errs), 1e-30)
            row[key + "_seconds"] = time.time() - t0
            row["layers"] = len(state.layers)
            print(how, key, row[key], f"weighted error after/before {row[key + '_weighted_error']:.3f}",
                  f"{row[key + '_seconds']:.0f}s", flush=True)
            del comp
        t0 = time.time()
        comp = rw.compression.lrec(copy.deepcopy(model), base, calibration, r=args.rank, steps=args.lrec_steps,
                                   lr=args.lrec_lr)
        row["lrec"] = evaluate_corpora(comp, None, blocks=blocks)
        row["lrec_seconds"] = time.time() - t0
        history = comp.rankwise_lrec["lrec"].history
        row["lrec_loss_first_last"] = [history[0]["loss"], history[-1]["loss"]]
        print(how, ratio, "lrec", row["lrec"], f"{row['lrec_seconds']:.0f}s", flush=True)
        del comp
        result["rows"].append(row)
        write(result)
    result["seconds"] = time.time() - start
    write(result)
    print(f"done in {result['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
