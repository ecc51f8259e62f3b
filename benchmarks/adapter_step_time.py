"""Training-step time and memory of rankwise adapters against Hugging Face PEFT, side by side.

MiniLM-L6 (all-MiniLM-L6-v2) sequence classification on BBC News, batch 16 x 128, r = 8 on all
linear layers. Every configuration runs in the same process, interleaved round by round, so slow
drifts of the machine hit all of them alike. Reports the median seconds per step, ratios against
PEFT, optimizer-state bytes (summed over the optimizer's state tensors) and activation bytes saved
for backward (summed over unique storages through ``torch.autograd.graph.saved_tensors_hooks``).

    python benchmarks/adapter_step_time.py            # writes benchmarks/results/adapter_step_time.{json,md}
    python benchmarks/adapter_step_time.py --model smollm2 --threads 1   # the limits: adapter_step_time_smollm2

``--model smollm2`` measures how close the adapters come to their limits on SmolLM2-135M (causal LM, random
tokens, ``--batch`` x ``--seq``, r on all linear layers): the training step of LoRA and DoRA (forward,
backward, a fused AdamW step on the adapter) against **the limit**, the same model entirely frozen with only the
input gradient computed (the embedding output requires grad, so backward runs through every layer but
computes no weight gradient: no adapter can cost less), and against PEFT's LoRA; and unmerged no-grad
inference of the LoRA model (eval mode) against the bare model. All interleaved round by round.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import rankwise as rw
from rankwise.data import classification_loader, load_classification
from rankwise.memory import count_params, optimizer_state_bytes
from rankwise.models import load_model

RESULTS = Path(__file__).parent / "results"
CLOCKS = {"wall": "wall-clock time",
          "cpu": "CPU time of the timing thread (time.thread_time: with one torch thread all the work runs there, "
                 "so other jobs on the machine inflate it far less than wall-clock time)"}


def peft_model(base, use_dora: bool, r: int, task_type: str = "SEQ_CLS"):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=use_dora, task_type=task_type)
    return get_peft_model(base, cfg)


def build(name: str, base, r: int):
    model = copy.deepcopy(base)
    if name == "peft-lora":
        return peft_model(model, False, r)
    if name == "peft-dora":
        return peft_model(model, True, r)
    if name == "rankwise-lora":
        return rw.adapt(model, "lora", r=r, alpha=2 * r)
    if name == "rankwise-dora":
        return rw.adapt(model, "dora", r=r, alpha=2 * r)
    if name == "full-ft":
        return model
    if name == "head-only":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier."))
        return model
    raise ValueError(name)


def saved_activation_bytes(model, batch) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


@torch.no_grad()
def max_output_diff_vs_peft(base, kind: str, r: int, batch) -> float:
    """Max |logits| difference between PEFT and rankwise given the same adapter weights (eval mode)."""
    theirs = build(f"peft-{kind}", base, r).eval()
    ours = build(f"rankwise-{kind}", base, r).eval()
    g = torch.Generator().manual_seed(0)
    for p in theirs.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    mine = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            key = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            key = key.replace(".default.weight", "").replace("lora_magnitude_vector", "magnitude")
            mine[key].copy_(p)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return (theirs(**inputs).logits - ours(**inputs).logits).abs().max().item()


def counted_flops(fn, name: str) -> int:
    """Floating-point operations of ``fn(name)`` as torch's ``FlopCounterMode`` counts them (matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(name)
    return counter.get_total_flops()


def adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer of every training arm: torch's fused AdamW, the transformers Trainer's default (for torch
    >= 2.8) and the fastest AdamW in torch (one kernel per tensor: 3 ms for SmolLM2's 420 LoRA tensors on one
    CPU thread vs 17 ms for the per-op default), so the arms differ by their adapters, not by optimizer overhead."""
    return torch.optim.AdamW(params, lr=1e-4, fused=True)


def limit_model(base):
    """The frozen model with only the input gradient: the embedding output is made to require grad."""
    model = copy.deepcopy(base).requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_())
    return model


def stream_seconds_per_byte() -> tuple[float, float]:
    """(read, read-modify-write) seconds per byte of one tensor pass on this thread: ``t.sum()`` and
    ``t.add_(1.0)`` over a 6 MiB fp32 tensor (SmolLM2's largest activation at 4×256 tokens), median of 21."""
    t = torch.randn(3 << 19)
    nbytes = t.numel() * t.element_size()

    def median_s(fn) -> float:
        fn()
        times = []
        for _ in range(21):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return median_s(t.sum) / nbytes, median_s(lambda: t.add_(1.0)) / nbytes


def unfused_traffic_bytes(model, tokens: int, training: bool) -> tuple[int, int]:
    """(bytes read, bytes read-modified-written) that the adapter kernels' separate passes stream beyond the base
    layer's, summed over the adapted linear layers (fp32). LoRA's low-rank GEMMs: in the forward, x once more
    (x Aᵀ) and the output once more (``addmm_`` of the rank-r product); in training also the output gradient twice
    (g B, gᵀ x Aᵀ), x again (the gradient of A) and the input gradient once more (its rank-r ``addmm_``). DoRA
    adds W twice (its row norm, every forward), the output's rescaling (u ⊙ g) and in training the output
    gradient's rescaling and the magnitude's gradient (Σ_N ∂y ⊙ u: two reads and a write, then a read).
    A lower bound on their memory traffic: each pass streams its tensor at least once."""
    from rankwise.adapters.dora import WeightDecomposed
    from rankwise.adapters.lora import LoRALayer

    read = rmw = 0
    for layer in model.modules():
        if not isinstance(layer, LoRALayer):
            continue
        x_bytes, out_bytes = 4 * tokens * layer.in_features, 4 * tokens * layer.out_features
        read += x_bytes + (x_bytes + 2 * out_bytes if training else 0)
        rmw += out_bytes + (x_bytes if training else 0)
        if isinstance(layer, WeightDecomposed):
            read += 2 * 4 * layer.in_features * layer.out_features + (2 * out_bytes if training else 0)
            rmw += out_bytes + (2 * out_bytes if training else 0)
    return read, rmw


def paired_ratios(times: dict[str, list[float]], a: str, b: str) -> list[float]:
    """Per-round ratios a/b (the arms ran back to back in each round, so each ratio sees one machine state)."""
    return [ta / tb for ta, tb in zip(times[a], times[b], strict=True)]


def smollm2_limits(args) -> None:
    """Adapters against their limits on SmolLM2-135M (see the module docstring)."""
    base, _ = load_model("smollm2")
    base.config.use_cache = False
    x = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x, "labels": x}
    models = {
        "limit (frozen, input grad only)": limit_model(base).train(),
        "rankwise-lora": rw.adapt(copy.deepcopy(base), "lora", r=args.r, alpha=2 * args.r).train(),
        "peft-lora": peft_model(copy.deepcopy(base), False, args.r, "CAUSAL_LM").train(),
        "rankwise-dora": rw.adapt(copy.deepcopy(base), "dora", r=args.r, alpha=2 * args.r).train(),
    }
    opts = {n: adamw(ps) if (ps := [p for p in m.parameters() if p.requires_grad]) else None
            for n, m in models.items()}
    infer = {"bare model (no grad)": models["limit (frozen, input grad only)"],
             "rankwise-lora unmerged (no grad)": models["rankwise-lora"]}

    def train_step(n):
        models[n](**batch).loss.backward()
        if opts[n] is not None:
            opts[n].step()
            opts[n].zero_grad(set_to_none=True)

    def infer_step(n):
        m = infer[n]
        was = m.training
        m.eval()
        with torch.no_grad():
            m(input_ids=x)
        m.train(was)

    arms = {**{n: train_step for n in models}, **{n: infer_step for n in infer}}
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {n: [] for n in arms}
    for n, fn in arms.items():  # warm-up (also creates optimizer state)
        fn(n)
    flops = {n: counted_flops(fn, n) for n, fn in arms.items()}  # one more step each, its GEMMs and attention
    names = list(arms)
    for rnd in range(args.rounds):
        k = rnd % len(names)
        for n in names[k:] + names[:k]:
            t0 = clock()
            for _ in range(args.steps):
                arms[n](n)
            times[n].append((clock() - t0) / args.steps)
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    limit, bare = "limit (frozen, input grad only)", "bare model (no grad)"
    pairs = {"lora / limit": ("rankwise-lora", limit), "dora / limit": ("rankwise-dora", limit),
             "lora / peft-lora": ("rankwise-lora", "peft-lora"), "peft-lora / limit": ("peft-lora", limit),
             "unmerged lora inference / bare": ("rankwise-lora unmerged (no grad)", bare)}
    ratios = {k: med[a] / med[b] for k, (a, b) in pairs.items()}
    paired = {k: paired_ratios(times, a, b) for k, (a, b) in pairs.items()}
    quartiles = {k: statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3 for k, v in paired.items()}
    flop_ratios = {k: flops[a] / flops[b] for k, (a, b) in pairs.items()}
    # what unfused kernels can reach: their FLOPs plus the bytes their separate passes must stream
    read_s, rmw_s = stream_seconds_per_byte()
    tokens = args.batch * args.seq
    traffic_s = {}
    for k, arm, training in (("lora / limit", "rankwise-lora", True), ("dora / limit", "rankwise-dora", True),
                             ("unmerged lora inference / bare", "rankwise-lora", False)):
        read, rmw = unfused_traffic_bytes(models[arm], tokens, training)
        traffic_s[k] = read * read_s + rmw * rmw_s
    estimates = {k: flop_ratios[k] + traffic_s[k] / med[pairs[k][1]] for k in traffic_s}
    targets = {"lora / limit": 1.03, "dora / limit": 1.10, "lora / peft-lora": 0.90,
               "unmerged lora inference / bare": 1.03}
    result = {
        "setup": {"model": "SmolLM2-135M-Instruct, causal LM, random tokens", "batch": args.batch, "seq": args.seq,
                  "r": args.r, "targets": "all-linear", "rounds": args.rounds, "steps_per_round": args.steps,
                  "clock": args.clock, "optimizer": "torch.optim.AdamW(fused=True)",
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "load_avg_at_end": os.getloadavg(),
                  "machine": platform.processor() or platform.machine()},
        "median_s": med, "all_s": times, "ratios": ratios, "targets": targets, "flops": flops,
        "flop_ratios": flop_ratios, "paired_ratios": paired, "traffic_s": traffic_s, "unfused_estimates": estimates,
        "stream_s_per_gb": {"read": read_s * 1e9, "read_modify_write": rmw_s * 1e9},
    }
    lines = [
        "# Adapters at the limit: SmolLM2-135M\n",
        f"Causal LM on random tokens, batch {args.batch}x{args.seq}, r={args.r} on all linear layers, "
        f"{args.rounds} interleaved rounds x {args.steps} steps (arm order rotating), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {CLOCKS[args.clock]}. The machine was shared with other jobs (load "
        f"average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs): absolute times move with the load, "
        "the interleaving keeps the ratios fair. The limit is the frozen model computing only the input gradient "
        "(backward through every layer, no weight gradient). The training arms step torch's fused AdamW "
        "(the transformers Trainer's default). `FLOPs` is the ratio of the arms' floating-point operations "
        "(torch's FlopCounterMode: matmuls and attention, one step each): the time ratio no kernel can beat. "
        "`paired` is the median (and quartiles) of the per-round ratios, each from arms run back to back. "
        "`unfused estimate` adds to the FLOP ratio the time the kernels' separate low-rank passes need just to "
        "stream their operands once (per adapted layer x twice, the output gradient twice, one read-modify-write "
        "each of the output and the input gradient; DoRA also W twice for its row norm and three passes over the "
        "output or its gradient for the rescaling and the magnitude's gradient) at this thread's measured "
        f"{1 / (read_s * 1e9):.1f} GB/s read and {1 / (rmw_s * 1e9):.1f} GB/s read-modify-write over 6 MiB: about the "
        "best ratio that GEMMs called one by one can reach (an estimate, not a bound: operands that stay in L2 "
        "stream faster); going below it takes low-rank GEMMs fused into the base GEMMs' passes.\n",
        f"| arm | median {'CPU ' if args.clock == 'cpu' else ''}s | min | max |", "|---|---|---|---|",
        *[f"| {n} | {med[n]:.3f} | {min(times[n]):.3f} | {max(times[n]):.3f} |" for n in names],
        "", "| ratio | measured (medians) | paired: median [q1, q3] | FLOPs | unfused estimate | target |",
        "|---|---|---|---|---|---|",
        *[f"| {k} | {v:.3f} | {statistics.median(paired[k]):.3f} [{quartiles[k][0]:.3f}, {quartiles[k][2]:.3f}] | "
          f"{flop_ratios[k]:.3f} | {format(estimates[k], '.3f') if k in estimates else ''} | "
          f"{'<= ' + format(targets[k], '.2f') if k in targets else ''} |" for k, v in ratios.items()],
    ]
    write(args.out + "_smollm2" if args.out.endswith("adapter_step_time") else args.out, result, lines)


def write(out: str, result: dict, lines: list[str]) -> None:
    """``out``.json (``result``) and ``out``.md (``lines``), printed."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--configs", default="peft-lora,rankwise-lora,peft-dora,rankwise-dora,full-ft,head-only")
    ap.add_argument("--out", default=str(RESULTS / "adapter_step_time"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                    help="smollm2 only: wall-clock, or the CPU time of the one torch thread (use with --threads 1 "
                         "on a busy machine)")
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm",
                    help="minilm: rankwise vs PEFT (seq-cls); smollm2: adapters against their limits")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "smollm2":
        return smollm2_limits(args)

    base, tok = load_model("minilm-l6", task="seq-cls", num_labels=5)
    ds = load_classification("bbc", split="train", seed=0, limit=args.batch)
    batch = next(iter(classification_loader(ds, tok, batch_size=args.batch, max_length=args.seq, shuffle=False)))
    batch["input_ids"] = batch["input_ids"][:, : args.seq]
    assert batch["input_ids"].shape == (args.batch, args.seq), batch["input_ids"].shape

    names = [c for c in args.configs.split(",") if c]
    models, opts, times = {}, {}, {n: [] for n in names}
    for n in names:
        m = build(n, base, args.r).train()
        models[n] = m
        opts[n] = adamw([p for p in m.parameters() if p.requires_grad])

    # Not rankwise.train.train: for a fair timing the configurations take turns, a few steps each,
    # round by round (the order flips every round), so every one sees the same machine load.
    def step(n):
        loss = models[n](**batch).loss
        loss.backward()
        opts[n].step()
        opts[n].zero_grad(set_to_none=True)

    for n in names:  # warm-up (also creates optimizer state)
        step(n)
    for rnd in range(args.rounds):
        for n in (names if rnd % 2 == 0 else reversed(names)):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(n)
            times[n].append((time.perf_counter() - t0) / args.steps)
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)

    # output equality with PEFT (same weights): rankwise DoRA/LoRA loaded from the PEFT model's tensors
    rows = {}
    for n in names:
        m = models[n]
        rows[n] = {
            "median_s_per_step": statistics.median(times[n]),
            "min_s_per_step": min(times[n]),
            "max_s_per_step": max(times[n]),
            "trainable_params": count_params(m)[0],
            "optimizer_state_bytes": optimizer_state_bytes(opts[n]),
            "saved_activation_bytes": saved_activation_bytes(m, batch),
        }
    for kind in ("lora", "dora"):
        ours, theirs = rows.get(f"rankwise-{kind}"), rows.get(f"peft-{kind}")
        if ours and theirs:
            ours["ratio_vs_peft"] = ours["median_s_per_step"] / theirs["median_s_per_step"]
            ours["activation_ratio_vs_peft"] = ours["saved_activation_bytes"] / theirs["saved_activation_bytes"]
    for kind in ("lora", "dora"):
        if f"rankwise-{kind}" in rows:
            rows[f"rankwise-{kind}"]["max_output_diff_vs_peft"] = max_output_diff_vs_peft(base, kind, args.r, batch)
    result = {
        "setup": {
            "model": "minilm-l6 (all-MiniLM-L6-v2), sequence classification, 5 labels",
            "data": "BBC News train batch",
            "batch": args.batch, "seq": args.seq, "r": args.r, "targets": "all-linear",
            "rounds": args.rounds, "steps_per_round": args.steps, "clock": args.clock,
            "optimizer": "torch.optim.AdamW(fused=True)", "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        },
        "results": rows,
    }
    lines = [
        "# Adapter training step: rankwise vs PEFT\n",
        f"MiniLM-L6 seq-cls, batch {args.batch}x{args.seq}, r={args.r} on all linear layers, "
        f"{args.rounds} interleaved rounds x {args.steps} steps, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, every arm stepping torch's fused AdamW.\n",
        "| config | median s/step | min | max | ratio vs PEFT | max output diff vs PEFT | trainable params "
        "| optimizer state | saved activations |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in rows.items():
        ratio = f"{r['ratio_vs_peft']:.3f}" if "ratio_vs_peft" in r else ""
        diff = f"{r['max_output_diff_vs_peft']:.1e}" if "max_output_diff_vs_peft" in r else ""
        lines.append(
            f"| {n} | {r['median_s_per_step']:.3f} | {r['min_s_per_step']:.3f} | {r['max_s_per_step']:.3f} | "
            f"{ratio} | {diff} | {r['trainable_params']:,} | {r['optimizer_state_bytes'] / 2**20:.1f} MiB | "
            f"{r['saved_activation_bytes'] / 2**20:.1f} MiB |"
        )
    write(args.out, result, lines)


if __name__ == "__main__":
    main()
