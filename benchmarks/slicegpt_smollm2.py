"""SliceGPT on SmolLM2-135M: held-out perplexity at slicing 10 / 20 / 30 % of the hidden width, PCA
bases against random orthogonal bases, against the dense model.

Calibration: ``--calibration`` seeded batches of 4×128 tokens from the BBC + stdlib-code train splits
(``compress_smollm2.train_batches``). Held-out: the first ``--eval-blocks`` 128-token blocks of the
BBC and stdlib-code test splits (as ``compress_smollm2.py``).

    python benchmarks/slicegpt_smollm2.py --threads 1   # writes benchmarks/results/slicegpt_smollm2.{json,md}
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


def markdown(result: dict) -> str:
    base = result["base"]
    lines = [
        "# SliceGPT on SmolLM2-135M: held-out perplexity against the slicing fraction", "",
        f"Calibration: {result['config']['calibration']} batches of 4×128 tokens (BBC + stdlib-code train); "
        f"held-out: first {result['config']['eval_blocks']} blocks of 128 tokens of each test split. "
        "Width: the sliced hidden size (of 576); parameters include the shortcut matrices and the full-width head.",
        "",
        "| slicing | basis | width | parameters | ppl BBC | ppl code | seconds |",
        "|---:|---|---:|---:|---:|---:|---:|",
        f"| 0 % (dense) | – | 576 | {base['parameters'] / 1e6:.1f}M | {base['ppl']['bbc']:.1f} | "
        f"{base['ppl']['stdlib-code']:.1f} | – |",
    ]
    for r in result["rows"]:
        lines.append(f"| {round(100 * (1 - r['ratio']))} % | {r['basis']} | {r['width']} "
                     f"| {r['parameters'] / 1e6:.1f}M | {r['ppl']['bbc']:.4g} | {r['ppl']['stdlib-code']:.4g} "
                     f"| {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.9, 0.8, 0.7])
    parser.add_argument("--random-ratios", nargs="*", type=float, default=[0.9],
                        help="ratios also measured with random orthogonal bases (the control)")
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
    runs = [(r, "pca") for r in args.ratios] + [(r, "random") for r in args.random_ratios]
    for ratio, basis in runs:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        rw.compress(model, "slicegpt", ratio=ratio, data=batches, basis=basis)
        state = model.rankwise_compress
        row = {"ratio": ratio, "basis": basis, "width": state.details["width"], "parameters": total_params(model),
               "kept_fraction": state.kept_fraction, "seconds": round(time.perf_counter() - t0, 1),
               "ppl": evaluate_corpora(model, None, blocks=blocks)}
        print(json.dumps(row))
        result["rows"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "slicegpt_smollm2.json").write_text(json.dumps(result, indent=2))
    (args.out / "slicegpt_smollm2.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
