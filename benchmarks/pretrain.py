"""Pre-training a small Llama from scratch: memory-efficient optimizers and structured (low-rank /
sparse) models side by side, on one model, one data stream and one token budget.

A Llama built by ``rankwise.models.llama_config("20m")`` (hidden 256, 8 layers, 4 heads, intermediate
768, tied embeddings, SmolLM2 tokenizer with its 49,152-token vocabulary: 19.4M parameters, of which
12.6M are the embedding matrix) is trained from the same initialization, on the same batches in the
same order, with the same schedule (linear warmup + cosine decay to 10% of the peak), on BBC News +
Python stdlib source (``load_text("bbc+stdlib-code")``).

Two kinds of runs:

* **optimizers** (the dense model, a different optimizer): AdamW, galore, fira, frugal, apollo,
  apollo_mini, q_galore, gradnormlorp, badam, lisa (and flora_opt, osd, dct_proj on request), each
  with the learning rate of its paper's pre-training recipe (``RECIPES`` says which);
* **structured models** (AdamW on a model whose linear layers are restructured with
  ``rw.sparsify``): sltrain (W = BA + S), relora (dense warm start, then merge-and-restart LoRA),
  sst (sparse spectral training), trp (trained rank pruning, decomposed before evaluation) and
  maestro (ordered low-rank factors; also evaluated cut to half rank), lowrank (W = BA) and
  refactor_reset (W = BA with periodic refactorization and momentum reset), at rank hidden/4 like the
  projected optimizers.

Runs are *interleaved*: at step i every run takes its i-th step before any takes step i + 1 (in a
rotating order), all models kept in memory, so a load change on the machine hits all of them alike.
``--methods`` picks a subset; ``--combine a.json b.json`` merges shards run in separate processes
(one per core) into one report. Per run: held-out perplexity on fixed test-split blocks, parameter
counts (total / trainable), the exact optimizer-state bytes (sum of ``nbytes`` over every state
tensor: final and peak over the run) next to the analytic formula of docs/optimizers.md, the median
step time (forward + backward + optimizer) and the median optimizer-step time.

    python benchmarks/pretrain.py                       # writes benchmarks/results/pretrain.{json,md,png}
    python benchmarks/pretrain.py --methods adamw galore sltrain --steps 40 --out /tmp/quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import rankwise as rw
from rankwise.compress import perplexity
from rankwise.data.datasets import lm_blocks, load_text
from rankwise.memory import count_params, optimizer_state_bytes, total_params
from rankwise.models.loaders import ensure_smollm2_cache, llama_config
from rankwise.optim.projectors import resolve_side
from rankwise.sparse import (
    LTE,
    SST,
    TRP,
    Cuttlefish,
    Maestro,
    RefactorReset,
    ReLoRA,
    SLoPe,
    decompose,
    relora_schedule,
    truncate,
)
from rankwise.sparse.maestro import MaestroLinear
from rankwise.sparse.sst import SpectralLinear

RESULTS = Path(__file__).parent / "results"

# name -> (make() / class kwargs, the source of the setting). ``update_gap`` / ``switch_every`` are
# filled in from the run length (see ``recipes``).
RECIPES: dict[str, tuple[dict[str, Any], str]] = {
    "adamw": ({"lr": 1e-3}, "GaLore paper's tuned full-rank Adam baseline for LLaMA 60M-1B (lr 1e-3)"),
    "galore": ({"lr": 1e-2, "scale": 0.25},
               "GaLore paper (Zhao et al. 2024) pre-training: lr 0.01, alpha 0.25, rank ~ hidden/4 "
               "(128 of 512 at 60M)"),
    "fira": ({"lr": 1e-2, "scale": 0.25},
             "Fira paper: GaLore's pre-training settings (lr 0.01, alpha 0.25) + norm-growth limiter gamma 1.01"),
    "frugal": ({"lr": 1e-3, "density": 0.25, "selector": "svd", "inactive_update_rule": "sign_sgd"},
               "FRUGAL paper pre-training: AdamW lr 1e-3 on an SVD subspace of density 0.25, "
               "signSGD (same lr) on the rest"),
    "apollo": ({"lr": 1e-2, "scale": 1.0},
               "APOLLO paper: lr 0.01, rank hidden/4, channel-wise scaling, alpha 1"),
    "apollo_mini": ({"lr": 1e-2, "scale": 128.0},
                    "APOLLO paper (APOLLO-Mini): lr 0.01, rank 1, tensor-wise scaling, alpha 128"),
    "q_galore": ({"lr": 1e-2, "scale": 0.25},
                 "Q-GaLore reuses GaLore's recipe (lr 0.01, alpha 0.25): INT4 projector, 8-bit moments, lazy refresh; "
                 "weights kept fp32 (weight_quant off)"),
    "gradnormlorp": ({"lr": 1e-2, "scale": 0.25},
                     "no pre-training recipe in the GradNormLoRP paper (fine-tuning only): "
                     "GaLore's lr 0.01, alpha 0.25"),
    "badam": ({"lr": 1e-3, "include_embedding": True, "include_head": True, "order": "random"},
              "BAdam is a fine-tuning method (paper: Adam lr of the fine-tuning recipe, K = 50-100); here AdamW's "
              "pre-training lr 1e-3, embedding and head as blocks too (a random frozen embedding cannot pre-train), "
              "K = steps / D (D = 10 blocks) so every block gets one turn of K steps"),
    "lisa": ({"lr": 1e-3, "n_layers": 2},
             "LISA is a fine-tuning method (paper: gamma = 2 sampled layers, K = 50 of thousands of steps); here "
             "AdamW's pre-training lr 1e-3, gamma = 2 of 8 layers, K scaled to the run"),
    "flora_opt": ({"lr": 1e-2},
                  "Flora (Adafactor + compressed momentum): GaLore-scale lr 0.01 (Flora's own runs are fine-tuning)"),
    "osd": ({"lr": 1e-2, "scale": 0.25}, "Online Subspace Descent: GaLore's lr 0.01, alpha 0.25, AdamW inner"),
    "dct_proj": ({"lr": 1e-2, "scale": 0.25}, "SVD-free DCT projection: GaLore's lr 0.01, alpha 0.25"),
}
# Structured models: AdamW (no weight decay) at the AdamW baseline's lr on the restructured model, rank = hidden/4.
STRUCTURED: dict[str, tuple[dict[str, Any], str]] = {
    "sltrain": ({"lr": 1e-3, "density": 0.03, "alpha": 32.0},
                "SLTrain paper: W = (alpha/r)·BA + S, delta = 0.03 random support, alpha = 32; AdamW baseline's lr"),
    "relora": ({"lr": 1e-3, "warm_start": 0.2, "restarts": 4, "prune_ratio": 0.999, "alpha": 32.0},
               "ReLoRA paper: full-rank warm start (20% of steps here), LoRA merged and restarted 4 times, 99.9% "
               "magnitude pruning of the A/B optimizer state, jagged cosine lr with short re-warmups"),
    "sst": ({"lr": 1e-3, "iterations": 10},
            "SST paper: all singular values trained, r sampled singular-vector pairs re-drawn 10 times per run"),
    "trp": ({"lr": 1e-3, "energy": 0.9, "period": 10, "nuclear_weight": 1e-4},
            "TRP paper: energy-0.9 truncation every 10 steps + nuclear-norm sub-gradient (lambda 1e-4); "
            "decomposed (sigma < 1% sigma_1 dropped) before evaluation"),
    "maestro": ({"lr": 1e-3}, "Maestro paper: full-rank ordered factors, one sampled (layer, rank) truncation "
                "per step added to the full loss; evaluated at full and at half rank"),
    "lowrank": ({"lr": 1e-3}, "W = B A trained from scratch (balanced SVD factors of the init), no controller: the "
                "baseline of refactor_reset"),
    "refactor_reset": ({"lr": 1e-3, "refactors": 6, "resets": 6},
                       "Glentis et al. 2025: W = B A, refactorized (B, A <- U sqrt(S), sqrt(S) V^T of B A) and the "
                       "factors' Adam moments reset 6 times per run (interval not given in the abstract)"),
    "refactor_only": ({"lr": 1e-3, "refactors": 6, "resets": 0}, "ablation of refactor_reset: no momentum reset"),
    "reset_only": ({"lr": 1e-3, "refactors": 0, "resets": 6}, "ablation of refactor_reset: no refactorization"),
    "cuttlefish": ({"lr": 1e-3, "measurements": 20},
                   "Cuttlefish paper: full-rank until every layer's stable rank settles (window 15, tail 11, tolerance "
                   "0.1), then factorized at the scaled stable rank; stable ranks measured 20 times per run (the "
                   "paper: every epoch)"),
    "lte": ({"lr": 1e-3, "heads": 4, "merge_every": 10},
            "LTE paper (LoRA-the-Explorer): frozen W, 4 parallel LoRA heads of rank hidden/16 (together the others' "
            "rank hidden/4) on 4 chunks of each batch, averaged into W every 10 steps (reset-less variant)"),
    "slope": ({"lr": 1e-3, "lazy_fraction": 0.01},
              "SLoPe paper: 2:4 sparse weights with the double-pruned backward, low-rank adapters of rank hidden/16 "
              "added for the last 1% of the steps"),
}
DEFAULT_METHODS = ["adamw", "galore", "fira", "frugal", "apollo", "apollo_mini", "q_galore",
                   "gradnormlorp", "badam", "lisa", "sltrain", "relora", "sst", "trp", "maestro"]
ALL_METHODS = [*RECIPES, *STRUCTURED]


# ------------------------------------------------------------------------------------------ helpers


def make_optimizer(name: str, model: torch.nn.Module, rank: int, gap: int, switch: dict[str, int],
                   seed: int) -> torch.optim.Optimizer:
    kw = dict(RECIPES[name][0])
    if name == "badam":
        from rankwise.optim.blocks import BAdam

        return BAdam(model, switch_every=switch["badam"], seed=seed, **kw)
    if name == "lisa":
        from rankwise.optim.blocks import LISA

        return LISA(model, switch_every=switch["lisa"], seed=seed, **kw)
    if name == "adamw":
        return rw.optim.make("adamw", model, **kw)
    if name == "osd":
        return rw.optim.make(name, model, rank=rank, seed=seed, **kw)  # online: P moves every step
    return rw.optim.make(name, model, rank=rank, update_gap=gap, seed=seed, **kw)


def _matrix_formula(name: str, opt: torch.optim.Optimizer, p: torch.Tensor, group: dict[str, Any]) -> int:
    """Analytic state bytes of one projected weight (docs/optimizers.md, "state bytes per matrix")."""
    m, n = p.shape
    side = resolve_side(group["proj_side"], p.shape)
    d, k = (m, n) if side == "left" else (n, m)
    r = int(group["rank"])
    if name == "frugal" and getattr(opt, "density", None) is not None:
        r = min(d, max(1, round(opt.density * d)))
    st = opt.state[p]
    if name == "galore" or name == "frugal":
        return 4 * (2 * r * k + r * d)
    if name == "fira":
        return 4 * (2 * r * k + r * d) + 4
    if name in ("apollo", "apollo_mini"):  # moments (r×k) + the cached Gaussian projection (r×d)
        return 8 * r * k + 4 * r * d + 4
    if name == "gradnormlorp":
        return 4 * (2 * r * k + r * d) + 12 * m
    if name == "flora_opt":  # compressed moment, factored second moment, cached projection
        return 4 * (r * k + m + n + r * d)
    if name == "osd":
        return 4 * (2 * r * k + 3 * r * d)
    if name == "dct_proj":  # + 4d² once per size d for the shared DCT basis (formula_bytes)
        return 8 * r * k + 8 * r
    if name == "q_galore":
        queue = 4 * opt.queue_size if int(st.get("svd_count", 0)) >= 2 else 0
        return (2 * r * k + 8 * math.ceil(r * k / 256) + math.ceil(r * d / 2) + 8 * math.ceil(r * d / 256)
                + 4 * d + queue)
    raise ValueError(name)


def _plain_formula(name: str, p: torch.Tensor, group: dict[str, Any]) -> int:
    """State bytes of a parameter in a group without ``rank`` (the inner update on the full gradient)."""
    numel = p.numel()
    inner = group.get("inner", "adamw")
    if inner == "adamw8bit" and numel >= int(group.get("min_8bit_size", 4096)):
        return 2 * numel + 8 * math.ceil(numel / int(group.get("quant_block", 256)))
    if inner == "adafactor":  # factored second moment for matrices (+ first moment when beta1 is set)
        second = 4 * (p.shape[0] + p.shape[1]) if p.dim() == 2 else 4 * numel
        return second + (4 * numel if group.get("beta1") else 0)
    return 8 * numel


def formula_bytes(name: str, opt: torch.optim.Optimizer, awake: list[torch.Tensor] | None = None) -> int:
    """Analytic optimizer-state bytes of ``opt`` as it stands (formula per matrix, summed)."""
    if name in ("adamw", "badam", "lisa") or name in STRUCTURED:
        # torch AdamW: two fp32 moments + a float32 ``step`` tensor per parameter tensor the next step updates
        # (every one in the groups; for BAdam/LISA the awake ones, as their sampler decided: never read from
        # the optimizer's own state, so the formula checks the state rather than restating it)
        params = awake if awake is not None else [p for g in opt.param_groups for p in g["params"]]
        sampler = 8 * len(opt.layer_names) if name == "lisa" else 0  # LISA's layer probabilities (float64)
        return sum(8 * p.numel() + 4 for p in params) + sampler
    total = 0
    dct_sizes = set()
    for group in opt.param_groups:
        for p in group["params"]:
            if "rank" in group:
                total += _matrix_formula(name, opt, p, group)
                if name == "dct_proj":
                    side = resolve_side(group["proj_side"], p.shape)
                    dct_sizes.add(p.shape[0] if side == "left" else p.shape[1])
            else:
                total += _plain_formula(name, p, group)
    return total + sum(4 * d * d for d in dct_sizes)


def formula_text(name: str, rank: int) -> str:
    texts = {
        "adamw": "8·N + 4 per tensor",
        "galore": "Σ 4(2rk+rd) + 8·N_plain",
        "fira": "Σ [4(2rk+rd)+4] + 8·N_plain",
        "frugal": "Σ 4(2rk+rd), r=ρd + 8·N_plain",
        "apollo": "Σ (8rk+4rd+4) + 8·N_plain",
        "apollo_mini": "Σ (8k+4d+4) + 8·N_plain",
        "q_galore": "Σ [2rk+8⌈rk/256⌉+⌈rd/2⌉+8⌈rd/256⌉+4d+4q] + 8-bit plain",
        "gradnormlorp": "Σ [4(2rk+rd)+12·out] + 8·N_plain",
        "badam": "8·N_block + 4 per tensor (active block)",
        "lisa": "8·(N_emb+N_head+N_γ layers) + 4 per tensor + 8 per layer",
        "flora_opt": "Σ 4(rk+m+n+rd) + Adafactor plain",
        "osd": "Σ 4(2rk+3rd) + 8·N_plain",
        "dct_proj": "Σ (8rk+8r) + 4d² per size + 8·N_plain",
    }
    return texts.get(name, "8·N_trainable + 4 per tensor (AdamW)")


def awake_params(opt: torch.optim.Optimizer) -> list[torch.Tensor] | None:
    return list(opt.awake_parameters) if hasattr(opt, "awake_parameters") else None


def record_state(r: dict[str, Any], name: str, opt: torch.optim.Optimizer) -> None:
    """Exact and analytic state bytes now (after a full step): kept as 'last' and as the peak."""
    nbytes = optimizer_state_bytes(opt)
    r["last_bytes"], r["last_formula"] = nbytes, formula_bytes(name, opt, awake_params(opt))
    if nbytes > r["peak_bytes"]:
        r["peak_bytes"], r["peak_formula"] = nbytes, r["last_formula"]


def _before(fn, hook):
    def wrapped(*a, **kw):
        hook()
        return fn(*a, **kw)

    return wrapped


def warmup_cosine(total: int, warmup: int, floor: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (the first point is the first value)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


# ------------------------------------------------------------------------------------------ main


# ------------------------------------------------------------------------------------------ structured runs


def plain_adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def lm_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


def setup_structured(name: str, model: torch.nn.Module, r: dict[str, Any], steps: int,
                     schedule: Callable[[torch.optim.Optimizer], Any], rank: int, seed: int) -> None:
    """Restructure ``model`` for method ``name`` and fill the run ``r`` with its optimizer, schedule and
    the per-step hooks: ``r['loss_fn'](model, x) -> (loss to backprop, loss to report)`` and
    ``r['after'](step)`` (called after ``optimizer.step()``)."""
    kw = STRUCTURED[name][0]
    if name == "sltrain":
        rw.sparsify(model, "sltrain", rank=rank, density=kw["density"], alpha=kw["alpha"])
    elif name == "sst":
        rw.sparsify(model, "sst", rank=rank)
    elif name in ("trp", "maestro"):
        rw.sparsify(model, name)
    elif name in ("lowrank", "refactor_reset", "refactor_only", "reset_only"):
        rw.sparsify(model, "refactor_reset", rank=rank)
    elif name == "cuttlefish":
        rw.sparsify(model, "cuttlefish")
    elif name == "lte":
        rw.sparsify(model, "lte", heads=kw["heads"], rank=max(1, rank // kw["heads"]), seed=seed)
    elif name == "slope":
        rw.sparsify(model, "slope", rank=max(1, rank // 4), seed=seed)
    r["opt"] = plain_adamw(model, kw["lr"])
    r["sched"] = schedule(r["opt"])
    if name == "sst":
        sst = SST(model, r["opt"], iteration_steps=max(1, steps // kw["iterations"]), seed=seed)
        r["after"] = lambda step: sst.step()
        r["notes"]["iteration_steps"] = sst.iteration_steps
    elif name == "trp":
        trp = TRP(model, energy=kw["energy"], period=kw["period"], nuclear_weight=kw["nuclear_weight"])
        r["after"] = lambda step: trp.step()
    elif name in ("refactor_reset", "refactor_only", "reset_only"):
        every = {k: max(1, steps // kw[k]) if kw[k] else steps + 1 for k in ("refactors", "resets")}
        ctl = RefactorReset(model, r["opt"], refactor_every=every["refactors"], reset_every=every["resets"])
        r["after"] = lambda step: ctl.step()
        r["notes"].update(refactor_every=every["refactors"], reset_every=every["resets"])
    elif name == "cuttlefish":
        r["cuttlefish"] = ctl = Cuttlefish(model, r["opt"], interval=max(1, steps // kw["measurements"]))
        r["after"] = lambda step: ctl.step()
        r["notes"]["interval"] = ctl.interval
    elif name == "lte":
        r["lte"] = lte = LTE(model, merge_every=kw["merge_every"])
        r["after"] = lambda step: lte.step()
    elif name == "slope":
        r["slope"] = slope = SLoPe(model, steps, r["opt"], lazy_fraction=kw["lazy_fraction"])
        r["after"] = lambda step: slope.step()
        r["notes"]["adapters_from_step"] = slope.start
    elif name == "maestro":
        maestro = Maestro(model, seed=seed)

        def maestro_loss(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
            seen: list[float] = []

            def once() -> torch.Tensor:
                loss = lm_loss(m, x)
                seen.append(loss.item())
                return loss

            return maestro.loss(once), seen[-1]  # report the full-rank pass (it runs last)

        r["loss_fn"] = maestro_loss
        r["after"] = lambda step: maestro.step()
    elif name == "relora":
        warm_steps = max(1, round(kw["warm_start"] * steps))

        def relora_after(step: int) -> None:
            if step + 1 == warm_steps:  # the full-rank warm start is over: LoRA + merge-and-restart
                rw.sparsify(model, "relora", rank=rank, alpha=kw["alpha"])
                r["opt"] = plain_adamw(model, kw["lr"])
                every = max(2, (steps - warm_steps) // kw["restarts"])
                short = min(5, every - 1)
                r["sched"] = relora_schedule(r["opt"], steps - warm_steps, short, every, short)
                r["relora"] = ReLoRA(model, r["opt"], merge_every=every, reset="prune", prune_ratio=kw["prune_ratio"])
                r["notes"].update(warm_start_steps=warm_steps, merge_every=every)
            elif "relora" in r:
                r["relora"].step()

        r["after"] = relora_after


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    trainable, total = count_params(model)
    return {"params_total": total, "params_trainable": trainable,
            "frozen_basis_entries": sum(m.U.numel() + m.Vh.numel() for m in model.modules()
                                        if isinstance(m, SpectralLinear))}


def structured_extras(name: str, r: dict[str, Any], heldout: torch.Tensor, batch: int) -> dict[str, Any]:
    """Method-specific evaluation: TRP before/after its decomposition, Maestro cut to half rank, ReLoRA's merges."""
    model, extra = r["model"], {}
    if name == "trp":
        extra["ppl_before_decompose"] = perplexity(model, heldout, batch)
        ranks = decompose(model, threshold=1e-2, keep_dense_if_larger=True)
        extra["mean_rank_after_decompose"] = statistics.mean(ranks.values())
    if name == "maestro":
        half = copy.deepcopy(model)
        truncate(half, {n: max(1, m.kept // 2) for n, m in half.named_modules() if isinstance(m, MaestroLinear)})
        extra["ppl_half_rank"] = perplexity(half, heldout, batch)
        extra["params_half_rank"] = param_counts(half)["params_total"]
    if name == "cuttlefish":
        ctl = r["cuttlefish"]
        extra["switch_step"] = ctl.switch_step
        extra["mean_rank_after_switch"] = statistics.mean(ctl.ranks.values()) if ctl.ranks else None
    if name == "lte":  # training's end: the heads' updates since the last merge go into W before evaluation
        r["lte"].finish()
    if name == "relora":
        extra["merges"] = r["relora"].merges
        extra["warm_start_peak_state_bytes"] = r.get("warm_peak_bytes", 0)
    return extra


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="20m", choices=["20m", "60m"])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps")
    ap.add_argument("--min-lr", type=float, default=0.1, help="cosine floor, fraction of the peak lr")
    ap.add_argument("--rank", type=int, default=None, help="default hidden/4 (GaLore's 128 of 512)")
    ap.add_argument("--refreshes", type=int, default=4,
                    help="projector refreshes in the run (update_gap = steps/refreshes)")
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is 2-5x faster than 2 on a 2-core machine shared with other jobs")
    ap.add_argument("--fp32", action="store_true",
                    help="train in fp32 (default: bf16 autocast, fp32 weights/grads/states)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=ALL_METHODS)
    ap.add_argument("--out", default=str(RESULTS / "pretrain"))
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="merge shard results (same settings) into --out")
    ap.add_argument("--separate-runs", action="store_true",
                    help="with --combine: the later JSONs were run separately (another time or machine), so their "
                         "rows are marked: same data, init and schedule, but step times not comparable")
    ap.add_argument("--replot", action="store_true", help="only re-render the .md and .png from the .json of --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.combine or args.replot:
        if args.combine:
            result = combine([Path(f) for f in args.combine], separate=args.separate_runs)
        else:
            result = json.loads(out.with_suffix(".json").read_text())
        write(result, out)
        return result
    t_script = time.perf_counter()
    torch.set_num_threads(args.threads)

    # ---- data: the same blocks in the same order for every run
    tok = AutoTokenizer.from_pretrained(str(ensure_smollm2_cache()), local_files_only=True)
    train = lm_blocks(load_text("bbc+stdlib-code", split="train", seed=args.seed), tok, args.seq)
    test = lm_blocks(load_text("bbc+stdlib-code", split="test", seed=args.seed), tok, args.seq)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=gen)
    need = args.steps * args.batch
    if need > len(train):
        raise SystemExit(f"{need} training blocks needed, {len(train)} available")
    batches = [train[order[i * args.batch:(i + 1) * args.batch]] for i in range(args.steps)]
    heldout = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed + 1))[:args.eval_blocks]]

    # ---- model: one initialization, copied per run
    cfg = llama_config(args.size, max_positions=max(128, args.seq))
    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(cfg)
    n_params = total_params(base)
    n_embed = base.model.embed_tokens.weight.numel()
    rank = args.rank or cfg.hidden_size // 4
    gap = max(1, args.steps // args.refreshes)
    n_blocks_badam = cfg.num_hidden_layers + 2  # embedding + layers + head (final norm)
    switch = {"badam": max(1, args.steps // n_blocks_badam), "lisa": max(1, args.steps // 10)}
    warmup_steps = max(1, round(args.warmup * args.steps))
    init_ppl = perplexity(base, heldout, args.batch)

    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps, warmup_steps, args.min_lr))

    runs: dict[str, dict[str, Any]] = {}
    for name in args.methods:
        model = copy.deepcopy(base)
        model.train()
        r = {"model": model, "loss_fn": None, "after": None, "notes": {}, "loss": [], "step_s": [], "opt_s": [],
             "peak_bytes": 0, "peak_formula": 0, "last_bytes": 0, "last_formula": 0, "wall_s": 0.0}
        if name in STRUCTURED:
            setup_structured(name, model, r, args.steps, schedule, rank, args.seed)
        else:
            r["opt"] = make_optimizer(name, model, rank, gap, switch, args.seed)
            r["sched"] = schedule(r["opt"])
            if hasattr(r["opt"], "_switch"):  # BAdam / LISA drop state when they swap blocks: measure just before
                opt = r["opt"]
                opt._switch = _before(opt._switch, lambda r=r, n=name, o=opt: record_state(r, n, o))
        r["counts"] = param_counts(model)
        runs[name] = r
    active = list(args.methods)
    print(f"{args.size}: {n_params / 1e6:.1f}M params ({n_embed / 1e6:.1f}M embedding), {len(active)} runs, "
          f"{args.steps} steps x {args.batch} x {args.seq} = {args.steps * args.batch * args.seq} tokens each, "
          f"rank {rank}, update_gap {gap}, threads {args.threads}, {'fp32' if args.fp32 else 'bf16 autocast'}",
          flush=True)

    # ---- interleaved training: step i of every run before step i + 1 of any. This is not
    # rankwise.train.train: for a fair timing the runs must take turns step by step (one loop call
    # per run would hit them with different machine load), and ReLoRA swaps its optimizer mid-run.
    for step in range(args.steps):
        x = batches[step]
        rot = step % len(active)
        for name in active[rot:] + active[:rot]:
            r = runs[name]
            model, opt = r["model"], r["opt"]
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
                if r["loss_fn"] is None:
                    loss = lm_loss(model, x)
                    reported = None
                else:
                    loss, reported = r["loss_fn"](model, x)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            r["sched"].step()
            t_rec = time.perf_counter()
            # state recorded after the step, before the method's own work (an SST resample clears state that
            # comes back at the next step; after a BAdam/LISA swap it was recorded just before the swap)
            if not (hasattr(opt, "switch_every") and opt.global_step % opt.switch_every == 0):
                record_state(r, name, opt)
            t_rec = time.perf_counter() - t_rec
            if r["after"] is not None:
                r["after"](step)
            t3 = time.perf_counter() - t_rec  # (recording is not part of the step)
            r["loss"].append(loss.item() if reported is None else reported)
            r["step_s"].append(t3 - t0)
            r["opt_s"].append(t2 - t1)
            r["wall_s"] += t3 - t0
            if r["opt"] is not opt:  # ReLoRA's warm start is over: its peak so far belongs to the dense phase
                r["warm_peak_bytes"], r["peak_bytes"] = r["peak_bytes"], 0
                r["counts"] = param_counts(model)
            if not math.isfinite(r["loss"][-1]):
                print(f"  {name}: non-finite loss at step {step}", flush=True)
        if step % 10 == 0 or step == args.steps - 1:
            done = time.perf_counter() - t_script
            print(f"step {step:4d}  {done:7.1f}s  " + "  ".join(f"{n}={runs[n]['loss'][-1]:.2f}" for n in active),
                  flush=True)

    # ---- evaluation and report
    rows = []
    for name in args.methods:
        r = runs[name]
        t0 = time.perf_counter()
        structured = name in STRUCTURED
        recipe = STRUCTURED[name] if structured else RECIPES[name]
        extra = structured_extras(name, r, heldout, args.batch) if structured else {}
        ppl = perplexity(r["model"], heldout, args.batch)
        r["wall_s"] += time.perf_counter() - t0
        rows.append({
            "method": name,
            "kind": "structured" if structured else "optimizer",
            "lr": recipe[0]["lr"],
            "settings": {k: v for k, v in recipe[0].items() if k != "lr"},
            "recipe_source": recipe[1],
            "heldout_ppl": ppl,
            **r["counts"],
            "params_at_eval": param_counts(r["model"])["params_total"],
            "final_train_loss_smoothed": smooth(r["loss"])[-1],
            "state_bytes": r["last_bytes"],
            "state_bytes_formula": r["last_formula"],
            "state_formula": formula_text(name, rank),
            "peak_state_bytes": r["peak_bytes"],
            "peak_state_bytes_formula": r["peak_formula"],
            "median_step_s": statistics.median(r["step_s"]),
            "median_opt_step_s": statistics.median(r["opt_s"]),
            "wall_s": r["wall_s"],
            "notes": r["notes"],
            **extra,
            "train_loss": r["loss"],
        })
        print(f"{name:13s} ppl {ppl:9.1f}  state {r['last_bytes'] / 1e6:8.2f} MB (formula "
              f"{r['last_formula'] / 1e6:8.2f})  step {statistics.median(r['step_s']):.2f}s", flush=True)
    script_s = time.perf_counter() - t_script
    result = {
        "benchmark": "pretrain",
        "model": {"size": args.size, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                  "heads": cfg.num_attention_heads, "intermediate": cfg.intermediate_size,
                  "vocab": cfg.vocab_size, "tied_embeddings": True, "params": n_params, "embedding_params": n_embed},
        "data": {"dataset": "bbc+stdlib-code", "train_blocks": len(train), "heldout_blocks": len(heldout),
                 "seq": args.seq, "batch": args.batch, "steps": args.steps,
                 "tokens_per_run": args.steps * args.batch * args.seq},
        "schedule": {"warmup_steps": warmup_steps, "cosine_floor": args.min_lr},
        "rank": rank, "update_gap": gap, "switch_every": switch, "seed": args.seed,
        "precision": "fp32" if args.fp32 else "bf16 autocast (fp32 weights, grads and optimizer state)",
        "threads": args.threads, "initial_heldout_ppl": init_ppl,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "cpus": os.cpu_count()},
        "script_wall_s": script_s, "shards": 1,
        "rows": rows,
    }
    write(result, out)
    print(f"wrote {out}.{{json,md,png}} in {script_s:.0f}s", flush=True)
    return result


def combine(paths: list[Path], separate: bool = False) -> dict[str, Any]:
    """One result from shards run in parallel processes with the same settings (rows concatenated in
    DEFAULT_METHODS order; wall time = the longest shard). ``separate``: the parts after the first were run
    at another time (perhaps on another machine): their rows say so."""
    parts = [json.loads(p.read_text()) for p in paths]
    for part in parts[1:] if separate else []:
        for row in part["rows"]:
            row["separate_run"] = part["machine"]
    first = parts[0]
    for part in parts[1:]:
        for key in ("model", "data", "schedule", "rank", "update_gap", "seed", "precision", "threads"):
            if part[key] != first[key]:
                raise SystemExit(f"shards differ in {key!r}: {first[key]} vs {part[key]}")
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    rows = sorted((r for part in parts for r in part["rows"]), key=lambda r: order[r["method"]])
    return {**first, "rows": rows, "shards": len(parts), "script_wall_s": max(p["script_wall_s"] for p in parts)}


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))


def _mb(b: int) -> str:
    return f"{b / 1e6:.2f}"


def _notes(r: dict[str, Any]) -> str:
    notes = []
    if "ppl_before_decompose" in r:
        notes.append(f"ppl {r['ppl_before_decompose']:.1f} before decomposition; mean rank "
                     f"{r['mean_rank_after_decompose']:.0f}, {r['params_at_eval']:,} params after")
    if "ppl_half_rank" in r:
        notes.append(f"half rank: ppl {r['ppl_half_rank']:.1f}, {r['params_half_rank']:,} params")
    if "merges" in r:
        notes.append(f"{r['merges']} merges (every {r['notes']['merge_every']} steps) after a "
                     f"{r['notes']['warm_start_steps']}-step dense warm start "
                     f"({_mb(r['warm_start_peak_state_bytes'])} MB of state during it)")
    if r.get("frozen_basis_entries"):
        notes.append(f"+{r['frozen_basis_entries']:,} frozen singular-vector entries; resample every "
                     f"{r['notes']['iteration_steps']} steps")
    if r["method"] == "cuttlefish":
        notes.append(f"stable rank measured every {r['notes']['interval']} steps; " + (
            f"factorized at step {r['switch_step']} (mean rank {r['mean_rank_after_switch']:.0f}, "
            f"{r['params_at_eval']:,} params after)" if r["switch_step"] else "not every layer settled: stayed "
            "full-rank"))
    if r["method"] == "lte":
        notes.append(f"{r['settings']['heads']} heads merged every {r['settings']['merge_every']} steps")
    if r["method"] == "slope":
        notes.append(f"2:4 sparse; adapters from step {r['notes']['adapters_from_step']}")
    if "separate_run" in r:
        notes.append("run separately (another time or machine): same data, init and schedule, but its times "
                     "are not comparable with the other rows")
    return "; ".join(notes)


def markdown(res: dict[str, Any]) -> str:
    m, d = res["model"], res["data"]
    lines = [
        "# Pre-training from scratch: optimizers and structured models on one token budget",
        "",
        f"Llama {m['size']} ({m['params'] / 1e6:.1f}M parameters, {m['embedding_params'] / 1e6:.1f}M of them the "
        f"tied {m['vocab']}-token SmolLM2 embedding), {d['dataset']}, {d['steps']} steps x {d['batch']} x {d['seq']} "
        f"= {d['tokens_per_run']:,} training tokens per run, warmup {res['schedule']['warmup_steps']} steps + cosine "
        f"to {res['schedule']['cosine_floor']:g} x peak, rank {res['rank']} for every low-rank method, update_gap "
        f"{res['update_gap']}, {res['precision']}, {res['threads']} thread(s) per process, {res['shards']} "
        f"process(es) side by side; held-out perplexity on {d['heldout_blocks']} fixed test blocks (initial "
        f"{res['initial_heldout_ppl']:.0f}). Wall time: {res['script_wall_s'] / 60:.1f} min.",
        "",
        "| method | kind | lr | held-out ppl | params | trainable | state MB (exact) | state MB (formula) | "
        "peak state MB | median step s | median opt.step s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {r['kind']} | {r['lr']:g} | {r['heldout_ppl']:.1f} | {r['params_total'] / 1e6:.2f}M | "
            f"{r['params_trainable'] / 1e6:.2f}M | {_mb(r['state_bytes'])} | {_mb(r['state_bytes_formula'])} | "
            f"{_mb(r['peak_state_bytes'])} | {r['median_step_s']:.2f} | {r['median_opt_step_s']:.3f} | {_notes(r)} |")
    lines += ["", "Formulas (d = projected side, k = the other, r = rank, q = Q-GaLore's queue; docs/optimizers.md):",
              ""]
    lines += [f"- `{r['method']}`: {r['state_formula']}" for r in res["rows"]]
    lines += ["", "State MB (exact) = nbytes summed over every optimizer-state tensor after the last step (for BAdam / "
              "LISA just before their last block swap drops state); peak = largest value over the run (for ReLoRA "
              "over its LoRA phase). N_plain = parameters outside the projected group (embedding, norms), kept "
              "under AdamW (8-bit AdamW for q_galore). Params = the model trained (structured: after "
              "restructuring; ReLoRA: base + LoRA factors); trainable = what the optimizer updates. Median step "
              "= forward + backward + optimizer step + the method's own per-step work (SST resampling, TRP "
              "truncation, ReLoRA merges); opt.step = optimizer step alone.", "",
              "Settings and their sources:", ""]
    lines += [f"- `{r['method']}` (lr {r['lr']:g}): {r['recipe_source']}" for r in res["rows"]]
    lines.append("")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_step = res["data"]["batch"] * res["data"]["seq"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6), sharey=True)
    colors = plt.get_cmap("tab20")
    styles = ["-", "--", "-.", ":"]
    baselines = {"adamw", "galore"}
    for ax, kind in zip(axes, ("optimizer", "structured"), strict=True):
        rows = [r for r in res["rows"] if r["kind"] == kind or (kind == "structured" and r["method"] in baselines)]
        for j, r in enumerate(rows):
            loss = smooth(r["train_loss"])
            xs = [(i + 1) * tokens_per_step for i in range(len(loss))]
            ax.plot(xs, loss, label=f"{r['method']} (held-out ppl {r['heldout_ppl']:.0f})", linewidth=1.4,
                    color=colors(j % 20), linestyle=styles[j % len(styles)])
        ax.set_xlabel("training tokens")
        ax.set_title("optimizers (dense model)" if kind == "optimizer" else "structured models (+ AdamW, GaLore)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    axes[0].set_ylabel("training loss (EMA 0.9)")
    m, d = res["model"], res["data"]
    fig.suptitle(f"Llama {m['size']} ({m['params'] / 1e6:.1f}M) from scratch, {d['dataset']}, "
                 f"{d['tokens_per_run']:,} tokens per run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
