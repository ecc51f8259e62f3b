"""Pre-training a small Llama from scratch with every memory-efficient optimizer, on one token budget.

A Llama built by ``rankwise.models.llama_config("20m")`` (hidden 256, 8 layers, 4 heads, intermediate
768, tied embeddings, SmolLM2 tokenizer with its 49,152-token vocabulary: 19.4M parameters, of which
12.6M are the embedding matrix, so at this size the embedding dominates both the parameter count and
every optimizer's state) is trained from the same initialization, on the same batches in the same
order, with the same schedule (linear warmup + cosine decay to 10% of the peak), on BBC News + Python
stdlib source (``load_text("bbc+stdlib-code")``). Each optimizer keeps its own learning rate, taken
from its paper's pre-training recipe (``RECIPES`` says which).

All optimizers are trained *interleaved*: at step i every optimizer takes its i-th step before any
takes step i + 1 (in a rotating order), with every model kept in memory, so a load change on the
machine hits all of them alike. Per optimizer the script reports the held-out perplexity on a fixed
set of test-split blocks, the exact optimizer-state bytes (sum of ``nbytes`` over every tensor in the
optimizer state: final and peak over the run) next to the analytic formula of docs/optimizers.md,
the median step time (forward + backward + optimizer) and the median optimizer-step time, and the
wall time spent on that optimizer.

    python benchmarks/optim_pretrain.py                  # writes benchmarks/results/optim_pretrain.{json,md,png}
    python benchmarks/optim_pretrain.py --steps 200 --threads 2 --optimizers adamw galore apollo
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
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import rankwise as rw
from rankwise.data.datasets import lm_blocks, load_text
from rankwise.models.loaders import ensure_smollm2_cache, llama_config
from rankwise.optim.projectors import resolve_side

RESULTS = Path(__file__).parent / "results"

# name -> (make() / class kwargs, the source of the setting). ``update_gap`` / ``switch_every`` are
# filled in from the run length (see ``recipes``).
RECIPES: dict[str, tuple[dict[str, Any], str]] = {
    "adamw": ({"lr": 1e-3}, "GaLore paper's tuned full-rank Adam baseline for LLaMA 60M-1B (lr 1e-3)"),
    "galore": ({"lr": 1e-2, "scale": 0.25},
               "GaLore paper (Zhao et al. 2024) pre-training: lr 0.01, alpha 0.25, rank ~ hidden/4 (128 of 512 at 60M)"),
    "fira": ({"lr": 1e-2, "scale": 0.25},
             "Fira paper: GaLore's pre-training settings (lr 0.01, alpha 0.25) + norm-growth limiter gamma 1.01"),
    "frugal": ({"lr": 1e-3, "density": 0.25, "selector": "svd", "inactive_update_rule": "sign_sgd"},
               "FRUGAL paper pre-training: AdamW lr 1e-3 on an SVD subspace of density 0.25, signSGD (same lr) on the rest"),
    "apollo": ({"lr": 1e-2, "scale": 1.0},
               "APOLLO paper: lr 0.01, rank hidden/4, channel-wise scaling, alpha 1"),
    "apollo_mini": ({"lr": 1e-2, "scale": 128.0},
                    "APOLLO paper (APOLLO-Mini): lr 0.01, rank 1, tensor-wise scaling, alpha 128"),
    "q_galore": ({"lr": 1e-2, "scale": 0.25},
                 "Q-GaLore reuses GaLore's recipe (lr 0.01, alpha 0.25): INT4 projector, 8-bit moments, lazy refresh; "
                 "weights kept fp32 (weight_quant off)"),
    "gradnormlorp": ({"lr": 1e-2, "scale": 0.25},
                     "no pre-training recipe in the GradNormLoRP paper (fine-tuning only): GaLore's lr 0.01, alpha 0.25"),
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
DEFAULT_OPTIMIZERS = ["adamw", "galore", "fira", "frugal", "apollo", "apollo_mini", "q_galore",
                      "gradnormlorp", "badam", "lisa", "flora_opt", "osd", "dct_proj"]


# ------------------------------------------------------------------------------------------ helpers


def tensor_bytes(opt: torch.optim.Optimizer) -> int:
    """Exact optimizer-state bytes: ``nbytes`` summed over every tensor in ``opt.state``."""
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes())
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


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
    if name in ("apollo", "apollo_mini"):
        return 8 * r * k + 4
    if name == "gradnormlorp":
        return 4 * (2 * r * k + r * d) + 12 * m
    if name == "flora_opt":
        return 4 * (r * k + m + n)
    if name == "osd":
        return 4 * (2 * r * k + 3 * r * d)
    if name == "dct_proj":
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
    if name in ("adamw", "badam", "lisa"):
        # torch AdamW: two fp32 moments + a float32 ``step`` tensor per parameter tensor
        params = awake if awake is not None else [p for g in opt.param_groups for p in g["params"]]
        return sum(8 * p.numel() + 4 for p in params)
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if "rank" in group:
                total += _matrix_formula(name, opt, p, group)
            else:
                total += _plain_formula(name, p, group)
    return total


def formula_text(name: str, rank: int) -> str:
    texts = {
        "adamw": "8·N + 4 per tensor",
        "galore": "Σ 4(2rk+rd) + 8·N_plain",
        "fira": "Σ [4(2rk+rd)+4] + 8·N_plain",
        "frugal": "Σ 4(2rk+rd), r=ρd + 8·N_plain",
        "apollo": "Σ (8rk+4) + 8·N_plain",
        "apollo_mini": "Σ (8k+4) + 8·N_plain",
        "q_galore": "Σ [2rk+8⌈rk/256⌉+⌈rd/2⌉+8⌈rd/256⌉+4d+4q] + 8-bit plain",
        "gradnormlorp": "Σ [4(2rk+rd)+12·out] + 8·N_plain",
        "badam": "8·N_block + 4 per tensor (active block)",
        "lisa": "8·(N_emb+N_head+N_γ layers) + 4 per tensor",
        "flora_opt": "Σ 4(rk+m+n) + Adafactor plain",
        "osd": "Σ 4(2rk+3rd) + 8·N_plain",
        "dct_proj": "Σ (8rk+8r) + 8·N_plain",
    }
    return texts[name]


def awake_params(opt: torch.optim.Optimizer) -> list[torch.Tensor] | None:
    return list(opt.awake_parameters) if hasattr(opt, "awake_parameters") else None


def record_state(r: dict[str, Any], name: str, opt: torch.optim.Optimizer) -> None:
    """Exact and analytic state bytes now (after a full step): kept as 'last' and as the peak."""
    nbytes = tensor_bytes(opt)
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


@torch.no_grad()
def heldout_ppl(model: torch.nn.Module, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i:i + batch]
        loss = model(input_ids=x, labels=x).loss
        n = x.numel() - x.shape[0]  # predicted tokens (HF shifts by one inside each row)
        total += float(loss) * n
        count += n
    model.train()
    return math.exp(total / count)


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (the first point is the first value)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="20m", choices=["20m", "60m"])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps")
    ap.add_argument("--min-lr", type=float, default=0.1, help="cosine floor, fraction of the peak lr")
    ap.add_argument("--rank", type=int, default=None, help="default hidden/4 (GaLore's 128 of 512)")
    ap.add_argument("--refreshes", type=int, default=3, help="projector refreshes in the run (update_gap = steps/refreshes)")
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is 2-5x faster than 2 on a 2-core machine shared with other jobs")
    ap.add_argument("--fp32", action="store_true", help="train in fp32 (default: bf16 autocast, fp32 weights/grads/states)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS, choices=list(RECIPES))
    ap.add_argument("--out", default=str(RESULTS / "optim_pretrain"))
    ap.add_argument("--replot", action="store_true", help="only re-render the .md and .png from the .json of --out")
    args = ap.parse_args(argv)
    if args.replot:
        out = Path(args.out)
        result = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(markdown(result))
        plot(result, out.with_suffix(".png"))
        return result
    t_script = time.perf_counter()
    torch.set_num_threads(args.threads)

    # ---- data: the same blocks in the same order for every optimizer
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

    # ---- model: one initialization, copied per optimizer
    cfg = llama_config(args.size, max_positions=max(128, args.seq))
    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    n_embed = base.model.embed_tokens.weight.numel()
    rank = args.rank or cfg.hidden_size // 4
    gap = max(1, args.steps // args.refreshes)
    n_blocks_badam = cfg.num_hidden_layers + 2  # embedding + layers + head (final norm)
    switch = {"badam": max(1, args.steps // n_blocks_badam), "lisa": max(1, args.steps // 10)}
    init_ppl = heldout_ppl(base, heldout, args.batch)

    runs: dict[str, dict[str, Any]] = {}
    for name in args.optimizers:
        model = copy.deepcopy(base)
        model.train()
        try:
            opt = make_optimizer(name, model, rank, gap, switch, args.seed)
        except ImportError as err:  # BAdam / LISA being finished elsewhere
            runs[name] = {"missing": f"{type(err).__name__}: {err}"}
            continue
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_cosine(args.steps, max(1, round(args.warmup * args.steps)), args.min_lr))
        runs[name] = {"model": model, "opt": opt, "sched": sched, "loss": [], "step_s": [], "opt_s": [],
                      "peak_bytes": 0, "peak_formula": 0, "last_bytes": 0, "last_formula": 0, "wall_s": 0.0}
        if hasattr(opt, "_switch"):  # BAdam / LISA drop state when they swap blocks: measure just before
            opt._switch = _before(opt._switch, lambda r=runs[name], n=name, o=opt: record_state(r, n, o))
    active = [n for n in args.optimizers if "model" in runs[n]]
    print(f"{args.size}: {n_params / 1e6:.1f}M params ({n_embed / 1e6:.1f}M embedding), {len(active)} optimizers, "
          f"{args.steps} steps x {args.batch} x {args.seq} = {args.steps * args.batch * args.seq} tokens each, "
          f"rank {rank}, update_gap {gap}, threads {args.threads}, {'fp32' if args.fp32 else 'bf16 autocast'}",
          flush=True)

    # ---- interleaved training: step i of every optimizer before step i + 1 of any
    for step in range(args.steps):
        x = batches[step]
        rot = step % len(active)
        for name in active[rot:] + active[:rot]:
            r = runs[name]
            model, opt = r["model"], r["opt"]
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            r["sched"].step()
            r["loss"].append(loss.item())
            r["step_s"].append(t2 - t0)
            r["opt_s"].append(t2 - t1)
            r["wall_s"] += time.perf_counter() - t0
            if not (hasattr(opt, "switch_every") and opt.global_step % opt.switch_every == 0):
                record_state(r, name, opt)  # (after a BAdam/LISA swap it was recorded just before the swap)
            if not math.isfinite(r["loss"][-1]):
                print(f"  {name}: non-finite loss at step {step}", flush=True)
        if step % 10 == 0 or step == args.steps - 1:
            done = time.perf_counter() - t_script
            print(f"step {step:4d}  {done:7.1f}s  " + "  ".join(f"{n}={runs[n]['loss'][-1]:.2f}" for n in active),
                  flush=True)

    # ---- evaluation and report
    rows = []
    for name in args.optimizers:
        r = runs[name]
        if "missing" in r:
            rows.append({"optimizer": name, "missing": r["missing"]})
            continue
        t0 = time.perf_counter()
        ppl = heldout_ppl(r["model"], heldout, args.batch)
        r["wall_s"] += time.perf_counter() - t0
        final_bytes, final_formula = r["last_bytes"], r["last_formula"]
        rows.append({
            "optimizer": name,
            "lr": RECIPES[name][0]["lr"],
            "settings": {k: v for k, v in RECIPES[name][0].items() if k != "lr"},
            "recipe_source": RECIPES[name][1],
            "heldout_ppl": ppl,
            "final_train_loss_smoothed": smooth(r["loss"])[-1],
            "state_bytes": final_bytes,
            "state_bytes_formula": final_formula,
            "state_formula": formula_text(name, rank),
            "peak_state_bytes": r["peak_bytes"],
            "peak_state_bytes_formula": r["peak_formula"],
            "median_step_s": statistics.median(r["step_s"]),
            "median_opt_step_s": statistics.median(r["opt_s"]),
            "wall_s": r["wall_s"],
            "train_loss": r["loss"],
        })
        print(f"{name:13s} ppl {ppl:9.1f}  state {final_bytes / 1e6:8.2f} MB (formula {final_formula / 1e6:8.2f})  "
              f"step {statistics.median(r['step_s']):.2f}s", flush=True)
    script_s = time.perf_counter() - t_script
    result = {
        "benchmark": "optim_pretrain",
        "model": {"size": args.size, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                  "heads": cfg.num_attention_heads, "intermediate": cfg.intermediate_size,
                  "vocab": cfg.vocab_size, "tied_embeddings": True, "params": n_params, "embedding_params": n_embed},
        "data": {"dataset": "bbc+stdlib-code", "train_blocks": len(train), "heldout_blocks": len(heldout),
                 "seq": args.seq, "batch": args.batch, "steps": args.steps,
                 "tokens_per_optimizer": args.steps * args.batch * args.seq},
        "schedule": {"warmup_steps": max(1, round(args.warmup * args.steps)), "cosine_floor": args.min_lr},
        "rank": rank, "update_gap": gap, "switch_every": switch, "seed": args.seed,
        "precision": "fp32" if args.fp32 else "bf16 autocast (fp32 weights, grads and optimizer state)",
        "threads": args.threads, "initial_heldout_ppl": init_ppl,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "cpus": os.cpu_count()},
        "script_wall_s": script_s,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}.{{json,md,png}} in {script_s:.0f}s", flush=True)
    return result


def _mb(b: int) -> str:
    return f"{b / 1e6:.2f}"


def markdown(res: dict[str, Any]) -> str:
    m, d = res["model"], res["data"]
    lines = [
        f"Llama {m['size']} from scratch ({m['params'] / 1e6:.1f}M parameters, {m['embedding_params'] / 1e6:.1f}M of "
        f"them the tied {m['vocab']}-token embedding), {d['dataset']}, {d['steps']} steps x {d['batch']} x {d['seq']} "
        f"= {d['tokens_per_optimizer']:,} tokens per optimizer, warmup {res['schedule']['warmup_steps']} steps + cosine "
        f"to {res['schedule']['cosine_floor']:g} x peak, rank {res['rank']}, update_gap {res['update_gap']}, "
        f"{res['precision']}, {res['threads']} thread(s); held-out perplexity on {d['heldout_blocks']} fixed test "
        f"blocks (initial {res['initial_heldout_ppl']:.0f}). Whole script: {res['script_wall_s'] / 60:.1f} min.",
        "",
        "| optimizer | lr | held-out ppl | state MB (exact) | state MB (formula) | peak state MB | formula | "
        "median step s | median opt.step s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "missing" in r:
            lines.append(f"| {r['optimizer']} | — | missing: {r['missing']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {r['heldout_ppl']:.1f} | {_mb(r['state_bytes'])} | "
            f"{_mb(r['state_bytes_formula'])} | {_mb(r['peak_state_bytes'])} | {r['state_formula']} | "
            f"{r['median_step_s']:.2f} | {r['median_opt_step_s']:.3f} | {r['wall_s']:.0f} |")
    lines += ["", "State MB (exact) = nbytes summed over every optimizer-state tensor after the last step (for BAdam / "
              "LISA just before their last block swap drops state); peak = largest value over the run. Formulas per "
              "projected m×n weight (d = projected side, k = the other, r = rank, q = Q-GaLore's queue) as in "
              "docs/optimizers.md; N_plain = parameters outside the projected group (embedding, norms), kept "
              "under AdamW (8-bit AdamW for q_galore, Adafactor with momentum for flora_opt). Median step = "
              "forward + backward + optimizer step; opt.step = optimizer step alone.", ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_step = res["data"]["batch"] * res["data"]["seq"]
    fig, ax = plt.subplots(figsize=(10, 6))
    rows = [r for r in res["rows"] if "missing" not in r]
    colors = plt.get_cmap("tab20")
    styles = ["-", "--", "-.", ":"]
    for j, r in enumerate(rows):
        loss = smooth(r["train_loss"])
        xs = [(i + 1) * tokens_per_step for i in range(len(loss))]
        ax.plot(xs, loss, label=f"{r['optimizer']} (held-out ppl {r['heldout_ppl']:.0f})", linewidth=1.4,
                color=colors(j % 20), linestyle=styles[j % len(styles)])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss (EMA 0.9)")
    m, d = res["model"], res["data"]
    ax.set_title(f"Llama {m['size']} ({m['params'] / 1e6:.1f}M) from scratch, {d['dataset']}, "
                 f"{d['tokens_per_optimizer']:,} tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
