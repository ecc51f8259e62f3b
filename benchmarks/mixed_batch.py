"""Serving several adapters at once: one mixed batch (``adapter_names``) vs one call per adapter.

SmolLM2-135M (causal LM) holds 8 named LoRA adapters (r = 8 on all linear layers, B randomized so
every adapter changes the output). A batch of 8 BBC News blocks, example i for adapter i, is served:

* ``mixed``: one forward, ``model(input_ids, adapter_names=[a0, ..., a7])`` (rankwise);
* ``one-at-a-time``: ``rw.set_active(model, ai)`` and a forward of example i alone, for each i;
* ``peft-mixed``: the same adapters exported to PEFT, one forward with PEFT's ``adapter_names``;
* ``peft-one-at-a-time``: PEFT's ``set_adapter`` and one forward per example.

Before timing, every mixed output row is checked against the one-at-a-time output of its example.
The variants take turns round by round (the order flips every round), so the machine's load hits
all alike. Reported: median seconds per served batch, tokens per second, and the ratios.

    python benchmarks/mixed_batch.py       # writes benchmarks/results/mixed_batch.{json,md,png}
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import rankwise as rw
from rankwise.data.datasets import lm_blocks, load_text
from rankwise.models import load_model

RESULTS = Path(__file__).parent / "results"


def adapted(base, n: int, r: int) -> torch.nn.Module:
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        rw.adapt(model, "lora", r=r, name=f"a{i}", seed=i)
        with torch.no_grad():
            for _, layer in rw.adapter_layers(model, f"a{i}"):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
    rw.set_active(model, [f"a{i}" for i in range(n)], trainable=False)
    return model


def peft_version(base, model, n: int, r: int):
    import peft

    with tempfile.TemporaryDirectory() as tmp:
        rw.export_peft(model, tmp)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), f"{tmp}/a0", adapter_name="a0")
        for i in range(1, n):
            loaded.load_adapter(f"{tmp}/a{i}", adapter_name=f"a{i}")
    return loaded.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT rows")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS / "mixed_batch"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.adapters
    base, tok = load_model("smollm2-135m")
    base.eval()
    ids = lm_blocks(load_text("bbc", split="test", limit=200), tok, block_size=args.seq)[:n]
    names = [f"a{i}" for i in range(n)]
    model = adapted(base, n, args.r).eval()

    def one_at_a_time_rankwise() -> torch.Tensor:
        rows = []
        for i, name in enumerate(names):
            rw.set_active(model, name, trainable=False)
            rows.append(model(input_ids=ids[i : i + 1]).logits)
        rw.set_active(model, names, trainable=False)
        return torch.cat(rows)

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "mixed": lambda: model(input_ids=ids, adapter_names=names).logits,
        "one-at-a-time": one_at_a_time_rankwise,
    }
    if not args.no_peft:
        pm = peft_version(base, model, n, args.r)

        def one_at_a_time_peft() -> torch.Tensor:
            rows = []
            for i, name in enumerate(names):
                pm.set_adapter(name)
                rows.append(pm(input_ids=ids[i : i + 1]).logits)
            return torch.cat(rows)

        variants["peft-mixed"] = lambda: pm(input_ids=ids, adapter_names=names).logits
        variants["peft-one-at-a-time"] = one_at_a_time_peft

    with torch.no_grad():
        outputs = {k: f() for k, f in variants.items()}
    reference = outputs["one-at-a-time"]
    diffs = {k: float((v - reference).abs().max()) for k, v in outputs.items()}
    print("max |logit - one-at-a-time|:", diffs, flush=True)
    assert diffs["mixed"] < 1e-3, diffs

    times: dict[str, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    with torch.no_grad():
        for rnd in range(args.rounds):
            for key in keys if rnd % 2 == 0 else reversed(keys):
                t0 = time.perf_counter()
                variants[key]()
                times[key].append(time.perf_counter() - t0)
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in keys), flush=True)

    tokens = n * args.seq
    rows = {k: {"median_s": statistics.median(v), "tokens_per_s": tokens / statistics.median(v),
                "max_logit_diff_vs_one_at_a_time": diffs[k], "times_s": v} for k, v in times.items()}
    base_s = rows["one-at-a-time"]["median_s"]
    for r in rows.values():
        r["speedup_vs_rankwise_one_at_a_time"] = base_s / r["median_s"]
    result = {
        "setup": {"model": "SmolLM2-135M-Instruct (causal LM, fp32)", "data": "BBC News test blocks",
                  "adapters": n, "r": args.r, "targets": "all-linear", "batch": n, "seq": args.seq,
                  "rounds": args.rounds, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "machine": platform.processor() or platform.machine()},
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Serving {n} adapters: one mixed batch vs one call per adapter\n",
        f"SmolLM2-135M, {n} named LoRA adapters (r={args.r}, all linear layers), a batch of {n} BBC blocks of "
        f"{args.seq} tokens, example i through adapter i; forward only, fp32, {torch.get_num_threads()} "
        f"threads, {args.rounds} interleaved rounds (median). Every mixed output row was checked against "
        "the one-at-a-time output of its example (max |logit diff| column).\n",
        "| variant | s / batch | tokens / s | vs rankwise one-at-a-time | max logit diff |",
        "|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['median_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['speedup_vs_rankwise_one_at_a_time']:.2f}× | {r['max_logit_diff_vs_one_at_a_time']:.1e} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, out.with_suffix(".png"), n)


def plot(rows: dict, path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(rows)
    ax.barh(names, [rows[k]["tokens_per_s"] for k in names], color=["C0" if "peft" not in k else "C1" for k in names])
    ax.invert_yaxis()
    ax.set_xlabel("tokens / second (higher is better)")
    ax.set_title(f"SmolLM2-135M serving {n} LoRA adapters in one batch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
