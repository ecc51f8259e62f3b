"""The calibrated one-shot methods on SmolLM2-135M: held-out perplexity of ``slicegpt`` (slicing 10 /
20 / 30 % of the hidden width; PCA bases against random orthogonal bases) and ``dsnot`` (50 / 60 %
unstructured sparsity; the Wanda mask alone, ``max_cycles=0``, against DSnoT's refinement), ``modegpt``
(90 / 80 % of every module's inner dimension), ``spqr`` (3-bit groups of 16 without and with the
fp16 outliers; 4-bit groups without outliers) and ``ecoflap`` (50 % sparsity, its zeroth-order block
sparsities against Wanda at one uniform sparsity on the same batches), against the dense model.

Calibration: ``--calibration`` seeded batches of 4×128 tokens from the BBC + stdlib-code train splits
(``compress_smollm2.train_batches``). Held-out: the first ``--eval-blocks`` 128-token blocks of the
BBC and stdlib-code test splits (as ``compress_smollm2.py``).

    python benchmarks/calibrated_smollm2.py --method slicegpt --threads 1   # results/slicegpt_smollm2.{json,md}
    python benchmarks/calibrated_smollm2.py --method dsnot --threads 1      # results/dsnot_smollm2.{json,md}
    python benchmarks/calibrated_smollm2.py --method modegpt --threads 1    # results/modegpt_smollm2.{json,md}
    python benchmarks/calibrated_smollm2.py --method spqr --threads 1       # results/spqr_smollm2.{json,md}
    python benchmarks/calibrated_smollm2.py --method ecoflap --calibration 2 --threads 1  # ecoflap_smollm2.*
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
from rankwise.memory import total_params
from rankwise.models import load_model

RESULTS = Path(__file__).parent / "results"
#: (ratio, options) per method: the method's settings and its control.
RUNS = {
    "slicegpt": [(0.9, {}), (0.8, {}), (0.7, {}), (0.9, {"basis": "random"})],
    "dsnot": [(0.5, {"max_cycles": 0}), (0.5, {}), (0.4, {"max_cycles": 0}), (0.4, {})],
    "modegpt": [(0.9, {}), (0.8, {})],
    # ratio unused: 3-bit GPTQ groups without / with outliers, and 4-bit groups without outliers
    "spqr": [(1.0, {"threshold": None}), (1.0, {}), (1.0, {"bits": 4, "threshold": None})],
    # block sparsities from zeroth-order scores, then Wanda in each layer; the control: Wanda at one uniform
    # sparsity (DSnoT without its refinement cycles) on the same calibration batches
    "ecoflap": [(0.5, {}), (0.5, {"max_cycles": 0}, "dsnot")],
}


def markdown(result: dict) -> str:
    base, cfg = result["base"], result["config"]
    lines = [
        f"# {cfg['method']} on SmolLM2-135M: held-out perplexity", "",
        f"Calibration: {cfg['calibration']} batches of 4×128 tokens (BBC + stdlib-code train); held-out: first "
        f"{cfg['eval_blocks']} blocks of 128 tokens of each test split. `kept`: kept fraction of the targeted "
        "weights (all block linears; slicegpt: the sliced linears plus the shortcut matrices).",
        "",
        "| ratio | options | kept | parameters | ppl BBC | ppl code | seconds |",
        "|---:|---|---:|---:|---:|---:|---:|",
        f"| 1 (dense) | – | 1 | {base['parameters'] / 1e6:.1f}M | {base['ppl']['bbc']:.1f} | "
        f"{base['ppl']['stdlib-code']:.1f} | – |",
    ]
    for r in result["rows"]:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "default"
        if r.get("method", cfg["method"]) != cfg["method"]:
            opts = f"{r['method']} {opts} (control)"
        if "bits_per_param" in r["details"]:
            opts += f" ({r['details']['bits_per_param']:.2f} bits/param)"
        lines.append(f"| {r['ratio']} | {opts} | {r['kept_fraction']:.3f} | {r['parameters'] / 1e6:.1f}M "
                     f"| {r['ppl']['bbc']:.4g} | {r['ppl']['stdlib-code']:.4g} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(RUNS), required=True)
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base, tok = load_model("smollm2-135m")
    blocks = {c: eval_blocks(tok, c, args.eval_blocks, 128) for c in EVAL_CORPORA}
    batches = train_batches(tok, args.calibration, 4, 128, args.seed)
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "base": {"parameters": total_params(base), "ppl": evaluate_corpora(base, None, blocks=blocks)},
              "rows": []}
    print(result["base"])
    for ratio, options, *other in RUNS[args.method]:
        method = other[0] if other else args.method  # a control row may run another method
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        rw.compress(model, method, ratio=ratio, data=batches, **options)
        state = model.rankwise_compress
        row = {"ratio": ratio, "method": method, "options": options, "parameters": total_params(model),
               "kept_fraction": state.kept_fraction, "seconds": round(time.perf_counter() - t0, 1),
               "details": {k: v for k, v in state.details.items() if k not in ("mean_error", "outliers")},
               "ppl": evaluate_corpora(model, None, blocks=blocks)}
        print(json.dumps(row))
        result["rows"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.method}_smollm2.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.method}_smollm2.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
