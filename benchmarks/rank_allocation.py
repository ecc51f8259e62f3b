"""Rank allocation and training dynamics against LoRA, at equal budgets and equal steps (issue 11).

Two studies, each on MiniLM-L6 (BBC News and drug reviews, sequence classification) and
SmolLM2-135M (causal LM on the stdlib-code corpus):

* ``alloc`` — every rank-allocation method at the same *final* adapter budget as LoRA of rank
  ``--r`` (the budget is Σ_l rank_l·(in_l + out_l) over the adapted layers, counted from the rank of
  each layer's learned ΔW at the end), and at 70% of it (the claim SoRA makes): AdaLoRA starts at
  1.5× the target rank (the paper's ratio) and prunes to it, IncreLoRA grows from rank 2 to it, DyLoRA
  trains rank r once and is evaluated truncated to r and to 70%·r, SoRA starts at 1.5·r and prunes
  by its L1 gate (its final budget is what λ gives; the table reports it).
  GoRA gives each layer a share of LoRA's parameter budget by its gradient score, ElaLoRA moves
  rank between layers at a fixed total, PRILoRA ramps the rank with depth around the target (mean
  = target) and prunes half of A's entries by |w|·‖x‖.
* ``dyn`` — every training-dynamics method at LoRA's rank, learning rate and steps; loss curves.
* ``scale`` — rsLoRA's claim (Kalajdzievski 2023): at a fixed α (16) and lr, LoRA's scale α/r makes the
  update, and so the learning, shrink as r grows, while rsLoRA's α/√r keeps higher ranks learning; LoRA and
  rsLoRA at r = 4, 16, 64, 256 (the final loss and metric per rank; ‖ΔW‖_F averaged over the layers).
* ``place`` — PLoP's claim: which module types get LoRA, at LoRA-on-every-linear-layer's budget
  (rank ``--r``): PLoP (the 3 lowest-NFN types), its paper's ablation PLoP⁻¹ (the 3 highest), attention
  only and MLP only; each placement's rank is raised so Σ rank·(in + out) matches that budget.

Every arm sees the same batches, steps, schedule (AdamW, linear decay, 10% warm-up) and initial
head; only the method differs. Seeds vary the adapter init, the head and the batch order. Results
are appended run by run to ``<out>/runs.jsonl`` (an interrupted run continues where it stopped);
``--report`` writes ``<out>/report.md`` with mean ± 95% interval (Student t), a heat map of the
final per-layer ranks and the loss curves.

    python benchmarks/rank_allocation.py --study alloc --task bbc --seeds 0 1 2
    python benchmarks/rank_allocation.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import rankwise as rw
from rankwise.data import (
    TextClassification,
    classification_loader,
    lm_blocks,
    lm_loader,
    load_classification,
    load_text,
)
from rankwise.models import load_model, quiet_transformers
from rankwise.report import Column, append_run, markdown_table, read_runs, write_text
from rankwise.train import TrainConfig, evaluate, prepare_model, train

OUT = Path(__file__).parent / "results" / "rank_allocation"
TASKS = {  # task: (model, kind, data)
    "bbc": ("minilm-l6", "cls", "bbc"),
    "drug-reviews": ("minilm-l6", "cls", "drug-reviews"),
    "stdlib-code": ("smollm2-135m", "lm", "stdlib-code"),
}
#: Adapted layers per model: every linear of MiniLM (36), the q/v projections of SmolLM2's 30 blocks.
TARGETS = {"minilm-l6": "all-linear", "smollm2-135m": ["q_proj", "v_proj"]}
#: Learning rate per model (LoRA's, used by every arm: equal steps and lr).
LR = {"minilm-l6": 2e-3, "smollm2-135m": 1e-3}
#: Student t quantile for a two-sided 95% interval with n−1 degrees of freedom.
#: Tiny validation set (examples; LM: 4 blocks).
VAL = 32
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}


@dataclass(frozen=True)
class Arm:
    """One configuration: ``label`` for the tables, the adapter ``method`` and its options,
    ``truncate`` (DyLoRA: evaluate at this rank), the ``budget`` level it belongs to and ``lr`` (None:
    LoRA's)."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    budget: str = "100%"
    truncate: int | None = None
    lr: float | None = None  # None: the model's LoRA learning rate (LR)
    placement: str | None = None  # place study: which module types ("lowest", "highest", "attention", "mlp")


def alloc_arms(r: int, steps: int) -> list[Arm]:
    """The rank-allocation arms at the full budget (rank r) and at 70% of it."""
    low = max(1, round(0.7 * r))
    warm, final = max(1, steps // 10), max(1, steps // 5)
    arms: list[Arm] = []
    for budget, target in (("100%", r), ("70%", low)):
        start = math.ceil(1.5 * target)
        arms += [
            Arm(f"lora r{target}", "lora", {"r": target}, budget),
            Arm(f"adalora {start}→{target}", "adalora",
                {"init_r": start, "target_r": target, "tinit": warm, "tfinal": final, "deltaT": 5}, budget),
            Arm(f"increlora 2→{target}", "increlora",
                {"r": 2, "target_r": target, "init_warmup": warm, "incre_interval": 3, "top_h": 8,
                 "incre_rank_num": 2}, budget),
            # IncreLoRA growing 3× faster (24 ranks every 2 steps): reaches the budget of SmolLM2's 60 q/v layers
            # within 40 steps, where the BBC settings' 23 growth rounds need 72 (the controller refuses those)
            Arm(f"increlora 2→{target} fast", "increlora",
                {"r": 2, "target_r": target, "init_warmup": warm, "incre_interval": 2, "top_h": 12,
                 "incre_rank_num": 2}, budget),
            Arm(f"dylora r{r}@{target}", "dylora", {"r": r}, budget, truncate=target),
            Arm(f"gora r{target}", "gora", {"r": target}, budget),
            Arm(f"elalora r{target}", "elalora",
                {"r": target, "warmup": warm, "adjust_interval": 5, "tfinal": final}, budget),
            Arm(f"prilora {target - target // 2}→{target + target // 2}", "prilora",
                {"r_start": target - target // 2, "r_end": target + target // 2}, budget),
            Arm(f"autolora {start}", "autolora", {"r": start}, budget),  # α on the tiny validation batch
        ]
    start = math.ceil(1.5 * r)
    lambdas = (10.0, 8.5, 7.5, 5.0)  # the final budget is steep in λ: all pruned at 10, none at 5
    arms.extend(Arm(f"sora {start} λ{lam:g}", "sora", {"r": start, "sparse_lambda": lam}, "L1") for lam in lambdas)
    # the sparsifying scheduler: λ rising from 0 in 5 stages, to stop the all-or-nothing pruning in between
    arms.extend(Arm(f"sora {start} λ0→{top:g}", "sora",
                    {"r": start, "sparse_lambda": 0.0, "lambda_schedule": "linear", "max_lambda": top,
                     "lambda_num": 5}, "L1") for top in (10.0, 20.0))
    # ARD-LoRA: per-head rank r·α under ℓ1 + TV; r per head, so the final budget is set by λ
    arms.extend(Arm(f"ard_lora r{r} λ{lam:g}", "ard_lora", {"r": r, "l1": lam}, "L1") for lam in (0.5, 2.0))
    return [a for a in arms if a.method in rw.REGISTRY]


DYNAMICS = ("lora", "allora", "lora_pro", "lora_dropout", "cola", "lora_ggpo", "fast_forward", "bilora", "loft",
            "ba_lora")


def dyn_arms(r: int, steps: int) -> list[Arm]:
    """LoRA and every registered training-dynamics method, at rank r and LoRA's lr; COLA with three links;
    LoRA-Pro and LoFT (whose steps act on the full-weight scale) also at a tenth of the lr; RiemannLoRA
    (Riemannian SGD) at 50× and 500× it."""
    options = {"cola": {"chain_every": max(1, steps // 3)}}
    arms = [Arm(m if m != "cola" else "cola ×3", m, {"r": r, **options.get(m, {})}, "dyn") for m in DYNAMICS]
    arms += [Arm(f"{m} lr/10", m, {"r": r}, "dyn", lr=0.1) for m in ("lora_pro", "loft")]
    # RiemannLoRA is SGD (heavy ball) on the manifold: LoRA's AdamW lr barely moves it
    arms += [Arm(f"riemannlora lr×{f:g}", "riemannlora", {"r": r}, "dyn", lr=f) for f in (50.0, 500.0)]
    return [a for a in arms if a.method in rw.REGISTRY]


SCALE_RANKS = (4, 16, 64, 256)
SCALE_ALPHA = 16


def scale_arms(r: int, steps: int) -> list[Arm]:
    """LoRA (α/r) and rsLoRA (α/√r) at a fixed α and LoRA's lr, at every rank of ``SCALE_RANKS``."""
    return [Arm(f"{m} r{rank}", m, {"r": rank, "alpha": SCALE_ALPHA}, "scale")
            for rank in SCALE_RANKS for m in ("lora", "rslora")]


#: Module types (the layer name after the block index) of the attention and the MLP, per model.
ATTENTION = {"minilm-l6": ("attention.self.query", "attention.self.key", "attention.self.value",
                           "attention.output.dense"),
             "smollm2-135m": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")}
MLP = {"minilm-l6": ("intermediate.dense", "output.dense"),
       "smollm2-135m": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
PLOP_TYPES = 3  # the paper's default number of module types


def place_arms(r: int, steps: int) -> list[Arm]:
    """LoRA on every linear layer at rank r, and four placements at its budget (PLoP and its ablations)."""
    return [Arm(f"lora all r{r}", "lora", {"r": r}, "place"),
            Arm("plop (3 lowest NFN)", "plop", {"plop_types": PLOP_TYPES}, "place", placement="lowest"),
            Arm("plop⁻¹ (3 highest NFN)", "lora", {}, "place", placement="highest"),
            Arm("attention only", "lora", {}, "place", placement="attention"),
            Arm("mlp only", "lora", {}, "place", placement="mlp")]


def placed(model: torch.nn.Module, model_name: str, arm: Arm, r: int, train_loader: Any, seed: int
           ) -> tuple[list[str], int, dict[str, float]]:
    """The layers ``arm`` adapts among every linear layer of the blocks, the rank that gives them LoRA-r's
    budget on all of them, and the NFN of every module type (PLoP's scores on the first training batch,
    with the seed ``rw.adapt`` gives PLoP, so the ``lowest`` prediction is the set PLoP itself picks)."""
    from rankwise.adapters.plop import choose_types, module_type, nfn_scores, type_scores
    from rankwise.targets import find_targets, linear_shape

    names = [n for n, _ in find_targets(model, "all-linear")]
    scores = type_scores(nfn_scores(model, names, train_loader, 1, seed))
    ranked = choose_types(scores, len(scores))
    types = {"lowest": ranked[:PLOP_TYPES], "highest": ranked[-PLOP_TYPES:],
             "attention": ATTENTION[model_name], "mlp": MLP[model_name]}[arm.placement or ""]
    chosen = [n for n in names if module_type(n) in types]
    io = {n: sum(linear_shape(model.get_submodule(n))) for n in names}
    return chosen, max(1, round(r * sum(io.values()) / sum(io[n] for n in chosen))), scores


def batches_for(task: str, tokenizer: Any, seed: int, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Train, test and tiny-validation loaders for ``task`` (the same for every arm of a seed). The
    validation batch (Fast Forward's stopping rule; otherwise only the loop's end-of-run loss) is held
    out of the test split after the evaluated examples, so no arm sees the test examples it is scored on."""
    _, kind, data = TASKS[task]
    if kind == "cls":
        tr = load_classification(data, "train", seed=seed)
        te = load_classification(data, "test", seed=0, limit=args.test_limit + VAL)
        test, val = (TextClassification(te.texts[a:b], te.labels[a:b], te.label_names)
                     for a, b in ((0, args.test_limit), (args.test_limit, args.test_limit + VAL)))
        return (classification_loader(tr, tokenizer, args.batch_size, args.max_length, shuffle=True, seed=seed),
                classification_loader(test, tokenizer, 32, args.max_length, shuffle=False),
                classification_loader(val, tokenizer, VAL, args.max_length, shuffle=False))
    train_blocks = lm_blocks(load_text(data, "train", seed=0), tokenizer, args.max_length)
    test_blocks = lm_blocks(load_text(data, "test", seed=0), tokenizer, args.max_length)
    n_test = args.test_limit // 8
    return (lm_loader(train_blocks, batch_size=args.batch_size, shuffle=True, seed=seed),
            lm_loader(test_blocks[:n_test], batch_size=8, shuffle=False),
            lm_loader(test_blocks[n_test: n_test + 4], batch_size=4, shuffle=False))


def layer_ranks(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer: (rank of its ΔW, in + out)}`` for every adapted layer (rank to 1e-6 of the top singular value)."""
    out = {}
    for name, layer in rw.adapter_layers(model):
        dw = layer.delta_weight().detach().double()
        s = torch.linalg.svdvals(dw)
        rank = int((s > 1e-6 * s.max()).sum()) if s.numel() and float(s.max()) > 0 else 0
        out[name] = (rank, dw.shape[0] + dw.shape[1])
    return out


def run_arm(task: str, arm: Arm, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one arm on one seed; its result row."""
    model_name, kind, _ = TASKS[task]
    torch.manual_seed(seed)
    model, tok = load_model(model_name, task="seq-cls" if kind == "cls" else "causal-lm",
                            **({"num_labels": _labels(task)} if kind == "cls" else {}))
    train_loader, test_loader, val_loader = batches_for(task, tok, seed, args)
    targets, options, extra = TARGETS[model_name], dict(arm.options), {}
    if arm.budget == "place":  # candidates: every linear layer; PLoP picks among them itself
        targets = "all-linear"
        if arm.placement is not None:
            chosen, rank, scores = placed(model, model_name, arm, args.r, train_loader, seed)
            options["r"] = rank
            if arm.method != "plop":
                targets = chosen
            extra = {"placed_layers": chosen, "placed_rank": rank, "nfn": scores}
    prepare_model(model, arm.method, targets=targets, init_data=train_loader, seed=seed, **options)
    if extra and sorted(n for n, _ in rw.adapter_layers(model)) != sorted(extra["placed_layers"]):
        raise RuntimeError(f"{arm.label}: the adapted layers differ from the predicted placement")
    lr = LR[model_name] * (arm.lr if arm.lr is not None else 1.0)
    cfg = TrainConfig(lr=lr, max_steps=args.steps, warmup_steps=max(1, args.steps // 10),
                      schedule="linear", seed=seed, device="cpu", progress=False,
                      task="lm" if kind == "lm" else "auto")
    t0 = time.perf_counter()
    result = train(model, train_loader, val_loader, cfg)
    if arm.truncate is not None:
        rw.truncate_rank(model, arm.truncate)
    metrics = evaluate(model, test_loader, task="lm" if kind == "lm" else "classification")
    ranks = layer_ranks(model)
    if arm.budget == "scale":
        norms = [float(layer.delta_weight().detach().norm()) for _, layer in rw.adapter_layers(model)]
        extra = {**extra, "delta_norm": statistics.fmean(norms)}
    return {
        "task": task, "arm": arm.label, "method": arm.method, "budget": arm.budget, "options": arm.options,
        "truncate": arm.truncate, "seed": seed,
        "metric": metrics["perplexity"] if kind == "lm" else metrics["accuracy"],
        "metric_name": "perplexity" if kind == "lm" else "accuracy",
        "ranks": {k: v[0] for k, v in ranks.items()},
        "budget_params": sum(rk * io for rk, io in ranks.values()),
        "loss_curve": [h["loss"] for h in result.history if "loss" in h],
        "train_time_s": time.perf_counter() - t0,
        **extra,
    }


def _labels(task: str) -> int:
    return load_classification(TASKS[task][2], "train", seed=0, limit=64).num_labels


def done_keys(path: Path) -> set[tuple[str, str, int]]:
    return {(r["task"], r["arm"], r["seed"]) for r in read_runs(path)}


def run(args: argparse.Namespace) -> None:
    quiet_transformers()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs.jsonl"
    arms = {"alloc": alloc_arms, "dyn": dyn_arms, "place": place_arms, "scale": scale_arms}[args.study](
        args.r, args.steps)
    if args.arms:
        arms = [a for a in arms if a.label in args.arms or a.method in args.arms]
    done = done_keys(runs)
    for seed in args.seeds:
        for arm in arms:
            if (args.task, arm.label, seed) in done:
                continue
            row = run_arm(args.task, arm, seed, args)
            row["study"], row["steps"], row["environment"] = args.study, args.steps, _env(args)
            append_run(runs, row)
            print(f"{args.task:<12} seed {seed} {arm.label:<20} {row['metric_name']} {row['metric']:.4f} "
                  f"budget {row['budget_params']:>8} ({row['train_time_s']:.0f} s)", flush=True)


def _env(args: argparse.Namespace) -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": args.threads, "python": platform.python_version(),
            "machine": platform.machine()}


# --------------------------------------------------------------------------------------------- report
def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, T95.get(len(values), 2.0) * statistics.stdev(values) / math.sqrt(len(values))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (study, task, arm): metric and budget mean ± 95% interval over seeds."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["study"], r["task"], r["arm"]), []).append(r)
    out = []
    for (study, task, arm), rs in groups.items():
        m, h = mean_ci([r["metric"] for r in rs])
        b, _ = mean_ci([float(r["budget_params"]) for r in rs])
        out.append({"study": study, "task": task, "arm": arm, "budget": rs[0]["budget"], "n": len(rs),
                    "metric_name": rs[0]["metric_name"], "mean": m, "ci": h, "budget_params": b,
                    "final_loss": statistics.fmean(statistics.fmean(r["loss_curve"][-10:]) for r in rs)})
    levels = ["100%", "70%", "L1", "dyn", "place"]
    return sorted(out, key=lambda s: levels.index(s["budget"]) if s["budget"] in levels else len(levels))


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(rows: list[dict[str, Any]], task: str, path: Path) -> bool:
    """Final per-layer ranks (seed-mean) of the alloc study's arms on ``task``, as a heat map."""
    sel = [r for r in rows if r["task"] == task and r["study"] == "alloc"]
    if not sel:
        return False
    plt = _pyplot()
    arms = list(dict.fromkeys(r["arm"] for r in sel))
    layers = list(dict.fromkeys(layer for r in sel for layer in r["ranks"]))  # ARD-LoRA adapts other modules
    grid = [[statistics.fmean(r["ranks"][layer] for r in sel if r["arm"] == a)
             if any(r["arm"] == a and layer in r["ranks"] for r in sel) else float("nan") for a in arms]
            for layer in layers]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(arms), 1.0 + 0.22 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(arms)), arms, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), [_short(n) for n in layers], fontsize=6)
    fig.colorbar(im, ax=ax, label="final rank of ΔW")
    ax.set_title(f"{task}: final per-layer ranks (mean over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def loss_curves(rows: list[dict[str, Any]], task: str, path: Path) -> bool:
    """Seed-mean training loss of the dyn study's arms on ``task`` (a 5-step moving average)."""
    sel = [r for r in rows if r["task"] == task and r["study"] == "dyn"]
    if not sel:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, arm in enumerate(dict.fromkeys(r["arm"] for r in sel)):
        curves = [r["loss_curve"] for r in sel if r["arm"] == arm]
        n = min(map(len, curves))
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        smooth = [statistics.fmean(mean[max(0, i - 4): i + 1]) for i in range(n)]
        ax.plot(range(1, n + 1), smooth, label=arm, lw=2.0 if arm == "lora" else 1.2,
                color=plt.get_cmap("tab20")(k % 20))  # one colour per arm (tab10 repeats after 10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (5-step mean)")
    ax.set_title(f"{task}: training dynamics vs LoRA at equal steps", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def rank_scaling(rows: list[dict[str, Any]], task: str, path: Path) -> bool:
    """Final training loss (mean of the last 10 steps) and mean ‖ΔW‖_F against the rank, LoRA vs rsLoRA
    (mean over seeds); False when matplotlib is missing."""
    plt = _pyplot()
    sel = [r for r in rows if r["task"] == task and r.get("study") == "scale"]
    if plt is None or not sel:
        return False
    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(10, 4))
    for method in ("lora", "rslora"):
        ranks = sorted({r["options"]["r"] for r in sel if r["method"] == method})
        mine = [[r for r in sel if r["method"] == method and r["options"]["r"] == k] for k in ranks]
        ax_loss.plot(ranks, [statistics.fmean(statistics.fmean(r["loss_curve"][-10:]) for r in g) for g in mine],
                     marker="o", label=method)
        ax_norm.plot(ranks, [statistics.fmean(r["delta_norm"] for r in g) for g in mine], marker="o", label=method)
    for ax, label in ((ax_loss, "training loss, last 10 steps"), (ax_norm, "mean ‖ΔW‖_F per layer")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel(label)
        ax.legend()
    ax_norm.set_yscale("log")
    fig.suptitle(f"{task}: LoRA (α/r) vs rsLoRA (α/√r), α = {SCALE_ALPHA}, same lr")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def placements(rows: list[dict[str, Any]], task: str) -> list[str]:
    """Markdown lines: the module types' NFN and, per placement arm, its types and rank (first seed run)."""
    from rankwise.adapters.plop import module_type

    sel = [r for r in rows if r["task"] == task and r["study"] == "place" and "placed_layers" in r]
    if not sel:
        return []
    first = min(sel, key=lambda r: r["seed"])
    nfn = ", ".join(f"{t} {v:.3f}" for t, v in sorted(first["nfn"].items(), key=lambda kv: kv[1]))
    lines = [f"NFN per module type (seed {first['seed']}, lowest first): {nfn}.", ""]
    for arm in dict.fromkeys(r["arm"] for r in sel):
        runs = [r for r in sel if r["arm"] == arm]
        kinds = {tuple(sorted(dict.fromkeys(module_type(n) for n in r["placed_layers"]))) for r in runs}
        ranks = sorted({r["placed_rank"] for r in runs})
        lines.append(f"- {arm}: {' | '.join(', '.join(k) for k in sorted(kinds))} at rank "
                     f"{', '.join(map(str, ranks))} ({len(kinds)} distinct placement(s) over {len(runs)} seeds)")
    return lines + [""]


def _short(name: str) -> str:
    return name.replace("encoder.layer.", "L").replace("model.layers.", "L").replace("attention.self.", "")


def _columns(metric: str) -> list[Column]:
    return [Column("arm", "arm", align="<"), Column("budget", "budget level", align="<"), Column("n", "n"),
            Column("metric_ci", f"test {metric}"),
            Column("budget_params", "final budget (params)", lambda v: f"{v:,.0f}"),
            Column("final_loss", "train loss, last 10 steps", lambda v: f"{v:.4f}")]


def report(out: Path) -> str:
    rows = read_runs(out / "runs.jsonl")
    summary = summarize(rows)
    lines = ["# Rank allocation and training dynamics against LoRA", "",
             "Written by `benchmarks/rank_allocation.py` (see its docstring for the protocol). "
             "Mean ± half-width of the 95% Student-t interval over seeds (n = seeds). *budget* is "
             "Σ_l rank(ΔW_l)·(in_l + out_l) at the end of training, in parameters.", ""]
    for task in TASKS:
        for study in ("alloc", "dyn", "place", "scale"):
            sel = [s for s in summary if s["task"] == task and s["study"] == study]
            if not sel:
                continue
            name = sel[0]["metric_name"]
            steps = next(r["steps"] for r in rows if r["task"] == task and r["study"] == study)
            title = {"alloc": "rank allocation", "dyn": "training dynamics", "place": "placement (PLoP)",
                     "scale": f"rank scaling at a fixed α = {SCALE_ALPHA} (rsLoRA)"}[study]
            lines += [f"## {task}: {title} ({steps} steps)", "",
                      markdown_table([{**s, "metric_ci": f"{s['mean']:.4f} ± {s['ci']:.4f}"} for s in sel],
                                     _columns(name)), ""]
            if study == "alloc" and heatmap(rows, task, out / f"ranks_{task}.png"):
                lines += [f"![final per-layer ranks on {task}](ranks_{task}.png)", ""]
            if study == "dyn" and loss_curves(rows, task, out / f"loss_{task}.png"):
                lines += [f"![loss curves on {task}](loss_{task}.png)", ""]
            if study == "place":
                lines += placements(rows, task)
            if study == "scale" and rank_scaling(rows, task, out / f"scaling_{task}.png"):
                lines += [f"![final training loss and ‖ΔW‖ against the rank on {task}](scaling_{task}.png)", ""]
    text = "\n".join(lines)
    write_text(out / "report.md", text)
    write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--study", choices=("alloc", "dyn", "place", "scale"), default="alloc")
    p.add_argument("--task", choices=tuple(TASKS), default="bbc")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="*", help="only these arm labels or methods")
    p.add_argument("--r", type=int, default=8, help="LoRA's rank: the 100%% budget")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--test-limit", type=int, default=300, help="test examples (LM: 8 per block)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--report", action="store_true", help="only write the report from runs.jsonl")
    args = p.parse_args()
    if args.report:
        print(report(Path(args.out)))
        return
    run(args)
    print(report(Path(args.out)))


if __name__ == "__main__":
    main()
