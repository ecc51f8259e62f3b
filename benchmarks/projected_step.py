"""Ordinary (non-refresh) optimizer step time: AdamW vs GaLore vs APOLLO vs Fira on GaLore's LLaMA-60M.

The model and the parameter split are those of ``optim_vs_galore_torch.py``: GaLore's LLaMA-60M
(hidden 512, 8 layers, intermediate 1376, vocab 32,000, untied; 58.1M parameters), the 56 attention
and MLP matrices of the decoder layers projected at rank 128 (``proj_side="std"``), everything else
(embeddings, LM head, norms) plain AdamW inside the same optimizer. AdamW is ``rankwise.optim.make("adamw")``
(torch's ``AdamW`` with its defaults, on CPU the single-tensor loop) on every parameter: the
ratios are to it. Two context arms: ``adamw_foreach`` and ``engine_adamw`` (see ``CONTEXT``).

Each arm gets its own copy of the model and the same gradients (one fp32 forward/backward on a batch
of random tokens, ``--batch`` x ``--seq``), set once: the gradients are not modified by a step, so
every timed step is an ordinary step on real-shaped, real-spectrum gradients. ``update_gap`` is larger
than the run, so after the first (refresh) step no step recomputes a projector; the first steps are
warm-up and not timed. Then ``--repeats`` rounds: in each round every arm takes one ``step()``, the
order of the arms rotating from round to round, so load from other processes hits all arms alike.
Reported: median (and quartiles) of the ``step()`` wall time per arm, and its ratio to AdamW's median.
One thread (``torch.set_num_threads(1)``) unless ``--threads`` says otherwise.

    python benchmarks/projected_step.py                 # writes benchmarks/results/projected_step.{json,md}
    python benchmarks/projected_step.py --size tiny --rank 8 --repeats 5 --out /tmp/smoke   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from optim_vs_galore_torch import RESULTS, galore_60m, machine, split_params, write_results
from transformers import LlamaForCausalLM

import rankwise as rw
from rankwise.memory import total_params

ARMS = ("adamw", "galore", "apollo", "fira", "adamw_foreach", "engine_adamw", "galore_torch", "apollo_torch")
#: Context arms, not targets: torch's AdamW with ``foreach=True`` (a horizontally fused loop; not torch's
#: CPU default) and the projected engine's own AdamW on every parameter (no ``rank``: the plain path that
#: the embeddings, LM head and norms take inside the projected optimizers).
CONTEXT = ("adamw_foreach", "engine_adamw")
#: The reference implementations on the same groups: galore-torch ``GaLoreAdamW`` (its exact-SVD
#: projector; the ordinary step does not depend on how P was found) and apollo-torch ``APOLLOAdamW``.
ANCHORS = ("galore_torch", "apollo_torch")
BIG_GAP = 10**9  # no refresh after the first step


def build(arm: str, model: torch.nn.Module, args) -> torch.optim.Optimizer:
    if arm == "adamw":
        return rw.optim.make("adamw", model, lr=args.lr)
    if arm == "adamw_foreach":
        return rw.optim.make("adamw", model, lr=args.lr, foreach=True)
    if arm == "engine_adamw":
        return rw.optim.ProjectedOptimizer(model.parameters(), lr=args.lr)
    projected, plain = split_params(model)
    if arm in ANCHORS:
        import warnings

        import apollo_torch
        import galore_torch

        keys = {"rank": args.rank, "update_proj_gap": BIG_GAP, "proj_type": "std"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if arm == "galore_torch":
                return galore_torch.GaLoreAdamW([{"params": plain}, {"params": projected, **keys, "scale": 0.25}],
                                                lr=args.lr, no_deprecation_warning=True)
            apollo = {"scale": 1.0, "proj": "random", "scale_type": "channel"}
            return apollo_torch.APOLLOAdamW([{"params": plain}, {"params": projected, **keys, **apollo}], lr=args.lr)
    groups = [{"params": projected, "rank": args.rank}, {"params": plain}]
    scale = {"apollo": 1.0}.get(arm, 0.25)
    return rw.optim.make(arm, groups, lr=args.lr, update_gap=BIG_GAP, scale=scale, proj_side="std")


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--repeats", type=int, default=40, help="timed rounds (one step per arm each)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per arm after the first")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", choices=("60m", "tiny"), default="60m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "projected_step"))
    args = ap.parse_args(argv)
    t_script = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(galore_60m(args.size))
    x = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    base(input_ids=x, labels=x).loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in base.named_parameters()}
    base.zero_grad(set_to_none=True)

    runs: dict[str, dict[str, Any]] = {}
    for arm in args.arms:
        model = copy.deepcopy(base)
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        opt = build(arm, model, args)
        for _ in range(1 + args.warmup):
            opt.step()
        runs[arm] = {"model": model, "opt": opt, "times": []}
    for rnd in range(args.repeats):
        k = rnd % len(args.arms)
        for arm in args.arms[k:] + args.arms[:k]:
            opt = runs[arm]["opt"]
            t0 = time.perf_counter()
            opt.step()
            runs[arm]["times"].append(time.perf_counter() - t0)

    rows: dict[str, dict[str, Any]] = {}
    for arm in args.arms:
        q1, med, q3 = quartiles(runs[arm]["times"])
        rows[arm] = {"median_s": med, "q1_s": q1, "q3_s": q3, "all_s": runs[arm]["times"]}
    if "adamw" in rows:
        for arm in args.arms:
            rows[arm]["ratio_to_adamw"] = rows[arm]["median_s"] / rows["adamw"]["median_s"]
    result = {
        "benchmark": "projected_step",
        "model": {"config": "LLaMA-60M (hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 32000, untied)"
                  if args.size == "60m" else "tiny smoke-run Llama", "params": total_params(base),
                  "projected_matrices": len(split_params(base)[0])},
        "settings": {"rank": args.rank, "proj_side": "std", "repeats": args.repeats, "warmup": args.warmup,
                     "threads": args.threads, "grad_batch": [args.batch, args.seq],
                     "projectors": {"galore": "rsvd (default)", "fira": "rsvd (default)", "apollo": "gaussian"}},
        "machine": machine(), "rows": rows, "script_wall_s": time.perf_counter() - t_script,
    }
    return write_results(result, args.out, markdown)


def markdown(res: dict[str, Any]) -> str:
    s, m = res["settings"], res["model"]
    lines = [
        f"{m['config']}, {m['params'] / 1e6:.1f}M parameters, {m['projected_matrices']} projected matrices at "
        f"rank {s['rank']} (proj_side {s['proj_side']}; the rest plain AdamW in the same optimizer). Ordinary "
        f"(non-refresh) `step()` wall time, {s['repeats']} interleaved rounds (arm order rotating), "
        f"{s['threads']} thread(s), after {s['warmup']} warm-up steps. Machine: {res['machine']['cpus']} CPUs, "
        f"shared with other jobs (load average at the end {res['machine']['load_avg_at_end'][0]:.1f}): absolute "
        "times move with the load, the interleaving keeps the ratios fair.",
        "",
        "| arm | median s | q1 s | q3 s | ratio to AdamW (medians) |",
        "|---|---|---|---|---|",
        *[f"| {arm} | {r['median_s']:.4f} | {r['q1_s']:.4f} | {r['q3_s']:.4f} | "
          f"{format(r['ratio_to_adamw'], '.3f') if 'ratio_to_adamw' in r else ''} |"
          for arm, r in res["rows"].items()],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
