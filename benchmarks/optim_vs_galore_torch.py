"""rankwise ``galore`` against galore-torch's ``GaLoreAdamW``, side by side in one process.

The model is GaLore's LLaMA-60M (``LlamaConfig``: hidden 512, 8 layers, 8 heads, intermediate 1376,
vocab 32,000, untied embeddings: 58.1M parameters). Tokens come from the SmolLM2 tokenizer on
BBC News + Python stdlib (``load_text("bbc+stdlib-code")``); its ids (< 49,152) are folded into the
32,000-token vocabulary **by modulo** (id % 32000; ids >= 32000 are rare merges, they share a row with a
frequent one). Batch 8 x 128, rank 128, scale 0.25, the same lr and schedule for both; the projected
group is every 2-D weight of the decoder layers' attention and MLP modules (q, k, v, o, gate, up,
down: 56 matrices, as GaLore's README does), everything else (embedding, LM head, norms) is plain
AdamW in the same optimizer.

rankwise's ``GaLoreAdamW`` runs with its default projector, the fast ``"rsvd"`` (randomized range
finder warm-started from the previous basis: 8 oversampling columns, one power iteration (three at the
cold first refresh), in bfloat16 where the CPU/GPU has native bf16 matmuls, then a float32 Rayleigh-Ritz
step that also yields the projected gradient); ``--control`` adds a third arm with the exact
``projector="svd"`` (numerically galore-torch). The energy each refresh captured
(``state["proj_energy"]`` = ‖PᵀG‖²/‖G‖², mean over the matrices) is reported per refresh step.

Both models start from the same initialization and see the same batches. They are kept in memory
together and trained in alternating chunks of steps (the order flips every chunk), so machine load
hits both alike. Reported: the optimizer ``step()`` time of refresh steps (the ones that recompute the
projector) and the median of ordinary steps, optimizer-state bytes (ours: exact sum of state tensors,
split into moments and projectors; galore-torch: ``exp_avg`` + ``exp_avg_sq`` + every projector's
``ortho_matrix``) next to the formula and next to AdamW's 8 bytes per parameter, and the training loss
at the end (mean of the last 10 steps, same batches) plus a held-out loss.

    python benchmarks/optim_vs_galore_torch.py          # writes benchmarks/results/optim_vs_galore_torch.{json,md}
    python benchmarks/optim_vs_galore_torch.py --steps 90 --update-gap 40   # a 1/5-length check
    python benchmarks/optim_vs_galore_torch.py --size tiny --steps 6 --update-gap 2 --refresh-reps 1 \
        --out /tmp/smoke                                                      # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from pretrain import warmup_cosine  # the same warmup + cosine-to-floor schedule
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import rankwise as rw
from rankwise.compress.evaluate import block_batches
from rankwise.data.datasets import lm_blocks, load_text
from rankwise.memory import tensor_bytes, total_params
from rankwise.models.loaders import ensure_smollm2_cache
from rankwise.optim.projectors import power_dtype, resolve_side
from rankwise.train import evaluate

RESULTS = Path(__file__).parent / "results"
VOCAB = 32000
PROJECTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REF = {"galore_torch_refresh_s": 4.45, "galore_torch_ordinary_s": 0.37, "galore_torch_state_mb": 313.0,
       "galore_torch_projector_mb": 14.7, "adamw_state_mb": 465.0}


def galore_60m(size: str = "60m") -> LlamaConfig:
    """GaLore's LLaMA-60M; ``size="tiny"`` (hidden 64, 2 layers) only for a smoke run of the script."""
    hidden, layers, heads, inter = (512, 8, 8, 1376) if size == "60m" else (64, 2, 4, 160)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=1024,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                       pad_token_id=None)


#: The projector rankwise's GaLoreAdamW uses when none is given.
DEFAULT_PROJECTOR = inspect.signature(rw.optim.GaLoreAdamW).parameters["projector"].default


def split_params(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(projected: 2-D weights of the decoder layers' attn/mlp Linear modules, the rest)."""
    projected = [m.weight for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"
                 and name.rsplit(".", 1)[-1] in PROJECTED_MODULES]
    ids = {id(p) for p in projected}
    return projected, [p for p in model.parameters() if id(p) not in ids]


def build(kind: str, model: torch.nn.Module, args) -> torch.optim.Optimizer:
    projected, plain = split_params(model)
    if kind == "galore-torch":
        from galore_torch import GaLoreAdamW

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return GaLoreAdamW(
                [{"params": plain},
                 {"params": projected, "rank": args.rank, "update_proj_gap": args.update_gap,
                  "scale": args.scale, "proj_type": "std"}],
                lr=args.lr, no_deprecation_warning=True)
    chosen = {"projector": "svd"} if kind == "rankwise-svd" else (
        {"projector": args.projector} if args.projector else {})  # none given: the class default
    return rw.optim.GaLoreAdamW(
        [{"params": projected, "rank": args.rank}, {"params": plain}],
        lr=args.lr, update_gap=args.update_gap, scale=args.scale, proj_side="std", **chosen)


def state_split(kind: str, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Optimizer-state bytes: moments, projectors, total."""
    moments = projector = 0
    for st in opt.state.values():
        for key, v in st.items():
            if kind == "galore-torch" and key == "projector":
                om = v.ortho_matrix
                projector += sum(tensor_bytes(t) for t in (om if isinstance(om, list) else [om]))
            elif torch.is_tensor(v):
                if key in ("P",):
                    projector += tensor_bytes(v)
                else:
                    moments += tensor_bytes(v)
    if kind != "galore-torch":
        assert moments + projector == opt.state_bytes()
    return {"moments": moments, "projector": projector, "total": moments + projector}


def formula(model: torch.nn.Module, rank: int) -> dict[str, int]:
    """docs/optimizers.md: 4·(2rk + rd) per projected weight (moments 8rk, P 4rd) + 8·numel for the rest."""
    projected, plain = split_params(model)
    moments = projector = 0
    for p in projected:
        m, n = p.shape
        d, k = (m, n) if resolve_side("std", p.shape) == "left" else (n, m)
        moments += 8 * rank * k
        projector += 4 * rank * d
    moments += sum(8 * p.numel() for p in plain)
    n_params = total_params(model)
    return {"moments": moments, "projector": projector, "total": moments + projector, "adamw": 8 * n_params}


def refresh_timing(grads: list[torch.Tensor], prev: list[torch.Tensor], rank: int, reps: int) -> dict[str, Any]:
    """Projector computation alone on the 56 gradients of the last step, interleaved ``reps`` rounds.

    galore-torch's ``GaLoreProjector.get_orthogonal_matrix`` (full SVD) against rankwise's ``svd`` and
    ``rsvd`` projectors (warm-started from the basis the run left, as at a real refresh), ``rsvd`` with its
    default options (as the optimizers use it), with 2 and 0 power iterations, with its power step
    forced to float32, and cold (no previous basis, as at the first refresh). Quality: energy of G
    captured by the basis, ‖proj(G)‖² / ‖proj_svd(G)‖² (1 = as good as the exact top-r subspace), mean
    and minimum over the matrices.
    """
    from galore_torch.galore_projector import GaLoreProjector

    from rankwise.optim.projectors import make_projector

    sides = [resolve_side("std", g.shape) for g in grads]
    variants: dict[str, Any] = {"galore-torch svd": None, "rankwise svd": ("svd", {}),
                                "rankwise rsvd (power_iters=2)": ("rsvd", {"power_iters": 2}),
                                "rankwise rsvd (default: power_iters=1)": ("rsvd", {}),
                                "rankwise rsvd (cold, as the first refresh: cold_power_iters=3)":
                                    ("rsvd", {"cold": True}),
                                "rankwise rsvd (power_iters=1, float32 power step)":
                                    ("rsvd", {"power_iters": 1, "power_dtype": "float32"}),
                                "rankwise rsvd (power_iters=0)": ("rsvd", {"power_iters": 0})}
    times: dict[str, list[float]] = {k: [] for k in variants}
    bases: dict[str, list[torch.Tensor]] = {}
    for rep in range(reps):
        names = list(variants) if rep % 2 == 0 else list(variants)[::-1]
        for name in names:
            out = []
            t0 = time.perf_counter()
            for g, side, p_prev in zip(grads, sides, prev, strict=True):
                if variants[name] is None:
                    out.append(GaLoreProjector(rank).get_orthogonal_matrix(g, rank, side))
                else:
                    kind, opts = variants[name]
                    cold = opts.get("cold", False)
                    opts = {k: v for k, v in opts.items() if k != "cold"}
                    proj = make_projector(kind, rank, side, tuple(g.shape), opts, g.device, g.dtype)
                    warm = kind == "rsvd" and not cold
                    st = {"P": p_prev.clone(), "proj_seed": 12345, "proj_version": 1} if warm else {"seed": 12345}
                    proj.compute(g, st)
                    out.append(st["P"])
            times[name].append(time.perf_counter() - t0)
            bases[name] = out

    def energy(g: torch.Tensor, P: torch.Tensor, side: str) -> float:
        return float((P.t() @ g if side == "left" else g @ P.t()).pow(2).sum())

    exact = [energy(g, P, s) for g, P, s in zip(grads, bases["galore-torch svd"], sides, strict=True)]
    result = {}
    for name in variants:
        q = [energy(g, P, s) / e for g, P, s, e in zip(grads, bases[name], sides, exact, strict=True)]
        result[name] = {"median_s": statistics.median(times[name]), "all_s": times[name],
                        "energy_mean": sum(q) / len(q), "energy_min": min(q)}
    base_s = result["galore-torch svd"]["median_s"]
    for name in variants:
        result[name]["speedup_vs_galore_torch"] = base_s / result[name]["median_s"]
    return {"matrices": len(grads), "rounds": reps, "variants": result}


def heldout_loss(model: torch.nn.Module, blocks: torch.Tensor, batch: int) -> float:
    """Mean next-token NLL over the held-out blocks (token-weighted, :func:`rankwise.train.evaluate`)."""
    return evaluate(model, block_batches(blocks, batch), task="lm")["loss"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=410, help="refreshes at 0, 200 and 400 with the default gap")
    ap.add_argument("--update-gap", type=int, default=200, help="GaLore's pre-training gap")
    ap.add_argument("--refresh-reps", type=int, default=3, help="rounds of the projector-only refresh timing")
    ap.add_argument("--chunk", type=int, default=5, help="steps per optimizer before switching to the other")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=1e-2, help="GaLore's pre-training lr, for both")
    ap.add_argument("--projector", default=None,
                    help=f"rankwise projector [default: GaLoreAdamW's own, {DEFAULT_PROJECTOR!r}]")
    ap.add_argument("--size", choices=("60m", "tiny"), default="60m",
                    help="model: GaLore's LLaMA-60M, or a tiny Llama for a smoke run of the script")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--control", action="store_true",
                    help="add a control arm: rankwise galore with its exact 'svd' projector (galore-torch numerics)")
    ap.add_argument("--fp32", action="store_true", help="forward/backward in fp32 (default bf16 autocast)")
    ap.add_argument("--eval-blocks", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "optim_vs_galore_torch"))
    args = ap.parse_args(argv)
    t_script = time.perf_counter()
    torch.set_num_threads(args.threads)

    tok = AutoTokenizer.from_pretrained(str(ensure_smollm2_cache()), local_files_only=True)
    train = lm_blocks(load_text("bbc+stdlib-code", split="train", seed=args.seed), tok, args.seq) % VOCAB
    test = lm_blocks(load_text("bbc+stdlib-code", split="test", seed=args.seed), tok, args.seq) % VOCAB
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    batches = [train[order[i * args.batch:(i + 1) * args.batch]] for i in range(args.steps)]
    heldout = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed + 1))[:args.eval_blocks]]

    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(galore_60m(args.size))
    n_params = total_params(base)
    kinds = ["rankwise", "galore-torch"] + (["rankwise-svd"] if args.control else [])
    runs: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        model = copy.deepcopy(base)
        model.train()
        opt = build(kind, model, args)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps, max(1, args.steps // 10), floor=0.1))
        runs[kind] = {"model": model, "opt": opt, "sched": sched, "step": 0, "loss": [], "opt_s": [], "fb_s": []}
    print(f"LLaMA-60M: {n_params / 1e6:.1f}M params, {args.steps} steps x {args.batch} x {args.seq}, rank {args.rank}, "
          f"update_gap {args.update_gap}, lr {args.lr}, threads {args.threads}, "
          f"projector {args.projector or DEFAULT_PROJECTOR}", flush=True)

    # Not rankwise.train.train: for a fair timing the optimizers take turns in chunks of steps (the
    # order flips every chunk), and the optimizer step alone is timed inside the step.
    def run_chunk(kind: str, n: int) -> None:
        r = runs[kind]
        for _ in range(n):
            i = r["step"]
            if i >= args.steps:
                return
            x = batches[i]
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
                loss = r["model"](input_ids=x, labels=x).loss
            loss.backward()
            t1 = time.perf_counter()
            r["opt"].step()
            t2 = time.perf_counter()
            if kind != "galore-torch" and i % args.update_gap == 0:  # energy the refresh captured
                r.setdefault("energy", {})[str(i)] = r["opt"].captured_energy
            if kind == "rankwise" and i == args.steps - 1:  # gradients for the projector-only timing
                r["last_grads"] = [p.grad.detach().clone() for p in split_params(r["model"])[0]]
            r["opt"].zero_grad(set_to_none=True)
            r["sched"].step()
            r["loss"].append(loss.item())
            r["fb_s"].append(t1 - t0)
            r["opt_s"].append(t2 - t1)
            r["step"] += 1
            if i == 0:
                r["state"] = state_split(kind, r["opt"])  # all state exists after the first step

    chunk_no = 0
    while any(runs[k]["step"] < args.steps for k in kinds):
        rot = chunk_no % len(kinds)
        for kind in (kinds[rot:] + kinds[:rot])[:: 1 if chunk_no % 2 == 0 else -1]:
            run_chunk(kind, args.chunk)
        chunk_no += 1
        done = runs[kinds[0]]["step"]
        print(f"step {done:4d}  {time.perf_counter() - t_script:7.1f}s  " + "  ".join(
            f"{k}: loss {runs[k]['loss'][-1]:.3f} opt {runs[k]['opt_s'][-1]:.2f}s" for k in kinds), flush=True)

    refresh_steps = [i for i in range(args.steps) if i % args.update_gap == 0]
    rows = {}
    for kind in kinds:
        r = runs[kind]
        ordinary = [t for i, t in enumerate(r["opt_s"]) if i % args.update_gap != 0]
        later = [r["opt_s"][i] for i in refresh_steps if i > 0]
        st = state_split(kind, r["opt"])
        assert st == r["state"], (kind, st, r["state"])  # constant over the run
        rows[kind] = {
            "refresh_step_s": {str(i): r["opt_s"][i] for i in refresh_steps},
            "refresh_s_median_after_first": statistics.median(later) if later else None,
            "first_step_s": r["opt_s"][0],
            "ordinary_step_s_median": statistics.median(ordinary),
            "forward_backward_s_median": statistics.median(r["fb_s"]),
            "state_bytes": st,
            "captured_energy_per_refresh": r.get("energy"),
            "final_train_loss_last10": sum(r["loss"][-10:]) / len(r["loss"][-10:]),
            "final_train_loss": r["loss"][-1],
            "heldout_loss": heldout_loss(r["model"], heldout, args.batch),
            "train_loss": r["loss"],
        }
    first_gap = args.update_gap if args.update_gap < args.steps else 0
    for kind in kinds:
        pairs = zip(rows[kind]["train_loss"], rows["galore-torch"]["train_loss"], strict=True)
        diffs = [a - b for a, b in pairs][first_gap:]
        rows[kind]["loss_gap_after_first_refresh"] = sum(diffs) / len(diffs)
    f = formula(base, args.rank)
    projected = split_params(runs["rankwise"]["model"])[0]
    prev = [runs["rankwise"]["opt"].state[p]["P"].clone() for p in projected]
    refresh_only = refresh_timing(runs["rankwise"].pop("last_grads"), prev, args.rank, args.refresh_reps)
    print(refresh_only, flush=True)
    ours, theirs = rows["rankwise"], rows["galore-torch"]
    ratios = {
        "refresh_speedup": (theirs["refresh_s_median_after_first"] / ours["refresh_s_median_after_first"]
                            if ours["refresh_s_median_after_first"] else None),
        "first_step_speedup": theirs["first_step_s"] / ours["first_step_s"],
        "ordinary_step_ratio_ours_over_theirs": ours["ordinary_step_s_median"] / theirs["ordinary_step_s_median"],
        "final_loss_diff_ours_minus_theirs": ours["final_train_loss_last10"] - theirs["final_train_loss_last10"],
        "state_ours_over_theirs": ours["state_bytes"]["total"] / theirs["state_bytes"]["total"],
        "state_ours_over_adamw": ours["state_bytes"]["total"] / f["adamw"],
    }
    targets = {
        "refresh >= 5x faster": ratios["refresh_speedup"] is not None and ratios["refresh_speedup"] >= 5.0,
        "final loss <= galore-torch": ratios["final_loss_diff_ours_minus_theirs"] <= 0.0,
        "ordinary step no slower": ratios["ordinary_step_ratio_ours_over_theirs"] <= 1.0,
        "state bytes == formula": ours["state_bytes"]["total"] == f["total"],
    }
    script_s = time.perf_counter() - t_script
    result = {
        "benchmark": "optim_vs_galore_torch",
        "model": {"config": "LLaMA-60M (hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 32000, untied)"
                  if args.size == "60m" else "tiny smoke-run Llama (hidden 64, 2 layers, vocab 32000)",
                  "params": n_params, "projected_matrices": len(split_params(base)[0])},
        "data": {"dataset": "bbc+stdlib-code", "tokens": "SmolLM2 ids % 32000", "batch": args.batch, "seq": args.seq,
                 "steps": args.steps, "heldout_blocks": len(heldout)},
        "settings": {"rank": args.rank, "update_gap": args.update_gap, "scale": args.scale, "lr": args.lr,
                     "schedule": "linear warmup (10% of steps) + cosine to 0.1x",
                     "rankwise_projector": args.projector or DEFAULT_PROJECTOR,
                     "rankwise_default_projector": DEFAULT_PROJECTOR,
                     "rsvd_power_dtype_auto": str(power_dtype("auto", torch.device("cpu")) or torch.float32),
                     "chunk": args.chunk,
                     "threads": args.threads,
                     "precision": "fp32" if args.fp32 else "bf16 autocast forward/backward, fp32 weights/grads/state"},
        "machine": machine(),
        "formula_bytes": f, "rows": rows, "ratios": ratios, "refresh_only": refresh_only, "targets_met": targets,
        "reference_quiet_2core": REF, "script_wall_s": script_s,
    }
    return write_results(result, args.out, markdown)


def machine() -> dict[str, Any]:
    """Platform, torch version, CPU count and the load average now (the machine is shared)."""
    return {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "load_avg_at_end": os.getloadavg()}


def write_results(result: dict[str, Any], out: str, markdown) -> dict[str, Any]:
    """Write ``out``.json and ``out``.md (``markdown(result)``), print the Markdown, return ``result``."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return result


def _c(row: dict[str, Any] | None, key: str, fmt: str) -> str:
    return "" if row is None or row.get(key) is None else format(row[key], fmt)


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f}"


def markdown(res: dict[str, Any]) -> str:
    s, d, f = res["settings"], res["data"], res["formula_bytes"]
    ours, theirs = res["rows"]["rankwise"], res["rows"]["galore-torch"]
    ctl = res["rows"].get("rankwise-svd")
    ra, tm = res["ratios"], res["targets_met"]
    refresh_ids = list(ours["refresh_step_s"])
    lines = [
        f"{res['model']['config']}, {res['model']['params'] / 1e6:.1f}M parameters, "
        f"{res['model']['projected_matrices']} projected matrices; {d['dataset']} ({d['tokens']}), batch "
        f"{d['batch']} x {d['seq']}, {d['steps']} steps, rank {s['rank']}, update_gap {s['update_gap']} "
        f"(refreshes at steps {', '.join(refresh_ids)}), scale {s['scale']}, lr {s['lr']:g} ({s['schedule']}), "
        f"{s['precision']}, {s['threads']} thread(s), interleaved in chunks of {s['chunk']} steps. "
        f"rankwise projector: `{s['rankwise_projector']}` "
        f"(GaLoreAdamW's default is `{s['rankwise_default_projector']}`; "
        f"rsvd's power step here: {s.get('rsvd_power_dtype_auto', 'float32')}). "
        f"Whole script: {res['script_wall_s'] / 60:.1f} min.",
        "",
        f"| | rankwise `galore` ({s['rankwise_projector']}) | galore-torch `GaLoreAdamW` | ratio | "
        "control: rankwise `galore` (svd) |",
        "|---|---|---|---|---|",
        f"| refresh step s (median of steps {', '.join(refresh_ids[1:])}) | "
        f"{ours['refresh_s_median_after_first']:.2f} | {theirs['refresh_s_median_after_first']:.2f} | "
        f"{ra['refresh_speedup']:.1f}x faster | {_c(ctl, 'refresh_s_median_after_first', '.2f')} |",
        f"| first step s (first SVD + state allocation) | {ours['first_step_s']:.2f} | {theirs['first_step_s']:.2f} | "
        f"{ra['first_step_speedup']:.1f}x faster | {_c(ctl, 'first_step_s', '.2f')} |",
        f"| ordinary optimizer step s (median) | {ours['ordinary_step_s_median']:.3f} | "
        f"{theirs['ordinary_step_s_median']:.3f} | {ra['ordinary_step_ratio_ours_over_theirs']:.2f} (ours/theirs) | "
        f"{_c(ctl, 'ordinary_step_s_median', '.3f')} |",
        f"| forward+backward s (median, context) | {ours['forward_backward_s_median']:.2f} | "
        f"{theirs['forward_backward_s_median']:.2f} | | {_c(ctl, 'forward_backward_s_median', '.2f')} |",
        f"| state MB: moments | {_mb(ours['state_bytes']['moments'])} | {_mb(theirs['state_bytes']['moments'])} | "
        f"formula {_mb(f['moments'])} | {_mb(ctl['state_bytes']['moments']) if ctl else ''} |",
        f"| state MB: projectors | {_mb(ours['state_bytes']['projector'])} | "
        f"{_mb(theirs['state_bytes']['projector'])} | "
        f"formula {_mb(f['projector'])} | {_mb(ctl['state_bytes']['projector']) if ctl else ''} |",
        f"| state MB: total | {_mb(ours['state_bytes']['total'])} | {_mb(theirs['state_bytes']['total'])} | "
        f"formula {_mb(f['total'])}; AdamW 8·N = {_mb(f['adamw'])} | "
        f"{_mb(ctl['state_bytes']['total']) if ctl else ''} |",
        f"| train loss, mean of last 10 steps | {ours['final_train_loss_last10']:.4f} | "
        f"{theirs['final_train_loss_last10']:.4f} | {ra['final_loss_diff_ours_minus_theirs']:+.4f} (ours − theirs) | "
        f"{_c(ctl, 'final_train_loss_last10', '.4f')} |",
        f"| train loss minus galore-torch's, mean over steps {refresh_ids[1] if len(refresh_ids) > 1 else 0}+ | "
        f"{ours['loss_gap_after_first_refresh']:+.4f} | 0 | | "
        f"{format(ctl['loss_gap_after_first_refresh'], '+.4f') if ctl else ''} |",
        f"| train loss, last step | {ours['final_train_loss']:.4f} | {theirs['final_train_loss']:.4f} | | "
        f"{_c(ctl, 'final_train_loss', '.4f')} |",
        f"| held-out loss ({d['heldout_blocks']} blocks) | {ours['heldout_loss']:.4f} | "
        f"{theirs['heldout_loss']:.4f} | | "
        f"{_c(ctl, 'heldout_loss', '.4f')} |",
        "",
        "Gradient energy captured at each refresh, ‖PᵀG‖²/‖G‖² (mean over the matrices; recorded by the "
        "optimizer): " + "; ".join(
            f"step {i}: ours {e:.4f}" + (f", exact svd {ctl['captured_energy_per_refresh'][i]:.4f}" if ctl else "")
            for i, e in (ours.get("captured_energy_per_refresh") or {}).items()),
        "",
        "Refresh-step times per refresh step (s): "
        + "; ".join(f"step {i}: ours {ours['refresh_step_s'][i]:.2f}, galore-torch {theirs['refresh_step_s'][i]:.2f}"
                    for i in refresh_ids),
        "",
        f"Projector computation alone ({res['refresh_only']['matrices']} gradients of the last step, median of "
        f"{res['refresh_only']['rounds']} interleaved rounds; energy = ‖proj(G)‖² / ‖proj_svd(G)‖², mean / min):",
        "",
        "| projector | s for all matrices | speedup vs galore-torch | energy mean | energy min |",
        "|---|---|---|---|---|",
        *[f"| {k} | {v['median_s']:.2f} | {v['speedup_vs_galore_torch']:.1f}x | {v['energy_mean']:.4f} | "
          f"{v['energy_min']:.4f} |" for k, v in res["refresh_only"]["variants"].items()],
        "",
        "Targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in tm.items()) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
