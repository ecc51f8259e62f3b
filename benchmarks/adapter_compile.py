"""``torch.compile`` of adapted models: graph breaks and training-step time, compiled vs eager.

MiniLM-L6 (all-MiniLM-L6-v2) sequence classification on a BBC News batch, r = 8 on all linear
layers. For every configuration: Dynamo's graph-break count (``torch._dynamo.explain``), whether
``torch.compile(fullgraph=True)`` builds, the Inductor build time (first compiled step) and the
median seconds per training step (forward, backward, AdamW) eager and compiled. The eager and
compiled models take turns step by step, round by round (the order flips every round), so the
machine's load hits both alike; the compiled step's outputs are checked against eager ones first.

    python benchmarks/adapter_compile.py      # writes benchmarks/results/adapter_compile.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import rankwise as rw
from rankwise.data import classification_loader, load_classification
from rankwise.models import load_model

from adapter_step_time import peft_model  # the same PEFT configuration as the step-time benchmark  # isort: skip

RESULTS = Path(__file__).parent / "results"


def build(name: str, base, r: int):
    model = copy.deepcopy(base)
    if name == "bare":
        return model
    if name == "peft-lora":
        return peft_model(model, use_dora=False, r=r)
    return rw.adapt(model, name.removeprefix("rankwise-"), r=r)


def graph_breaks(model, batch) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(**batch).graph_break_count


def fullgraph_builds(model, batch) -> bool:
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, fullgraph=True, backend="eager")(**batch)
    except Exception:  # noqa: BLE001  (any capture failure means "no")
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration after the build")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--configs", default="rankwise-lora,rankwise-dora,rankwise-vera,peft-lora")
    ap.add_argument("--out", default=str(RESULTS / "adapter_compile"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base, tok = load_model("minilm-l6", task="seq-cls", num_labels=5)
    base.eval()  # no hidden dropout: eager and compiled steps see the same function
    ds = load_classification("bbc", split="train", seed=0, limit=args.batch)
    batch = next(iter(classification_loader(ds, tok, batch_size=args.batch, max_length=args.seq, shuffle=False)))
    batch["input_ids"] = batch["input_ids"][:, : args.seq]

    names = [c for c in args.configs.split(",") if c]
    rows: dict[str, dict] = {}
    for name in ["bare", *names]:
        m = build(name, base, args.r)
        rows[name] = {"graph_breaks": graph_breaks(m, batch), "fullgraph": fullgraph_builds(m, batch)}
        print(name, rows[name], flush=True)

    torch._dynamo.reset()
    models, opts, times = {}, {}, {}
    for name in names:
        eager = build(name, base, args.r)
        compiled = copy.deepcopy(eager)
        for kind, m in (("eager", eager), ("compiled", compiled)):
            params = [p for p in m.parameters() if p.requires_grad]
            models[name, kind] = torch.compile(m) if kind == "compiled" else m
            opts[name, kind] = torch.optim.AdamW(params, lr=1e-4)
            times[name, kind] = []

    def step(key) -> torch.Tensor:
        out = models[key](**batch)
        out.loss.backward()
        opts[key].step()
        opts[key].zero_grad(set_to_none=True)
        return out.logits.detach()

    for name in names:  # first step: the compiled one builds; same inputs and weights, so same logits
        t0 = time.perf_counter()
        got = step((name, "compiled"))
        rows[name]["compile_s"] = time.perf_counter() - t0
        want = step((name, "eager"))
        rows[name]["max_logit_diff_compiled_vs_eager"] = (got - want).abs().max().item()
        print(name, "compiled in", f"{rows[name]['compile_s']:.1f}s", flush=True)
    # warm-up: Hugging Face's sequence-classification forward sets config.problem_type on its first
    # call, which makes Dynamo recompile once on the second; untimed steps absorb that
    for key in times:
        for _ in range(args.warmup):
            step(key)
    keys = list(times)
    for rnd in range(args.rounds):
        for key in (keys if rnd % 2 == 0 else reversed(keys)):
            t0 = time.perf_counter()
            step(key)
            times[key].append(time.perf_counter() - t0)
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{k[0]}/{k[1]} {times[k][-1]:.3f}s" for k in keys),
              flush=True)
    for name in names:
        eager, compiled = statistics.median(times[name, "eager"]), statistics.median(times[name, "compiled"])
        rows[name].update(eager_s_per_step=eager, compiled_s_per_step=compiled, speedup=eager / compiled)

    result = {
        "setup": {
            "model": "minilm-l6 (all-MiniLM-L6-v2), sequence classification, 5 labels, eval mode (no dropout)",
            "data": "BBC News train batch", "batch": args.batch, "seq": args.seq, "r": args.r,
            "targets": "all-linear", "rounds": args.rounds, "warmup_steps": args.warmup,
            "compile": "torch.compile(model) (Inductor)",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        },
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# torch.compile of adapted models: graph breaks, compiled vs eager step time\n",
        f"MiniLM-L6 seq-cls, batch {args.batch}x{args.seq}, r={args.r} on all linear layers, training step "
        f"(forward, backward, AdamW), {args.rounds} interleaved rounds, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Inductor on CPU. compile s: the first compiled step, build included "
        "(Inductor's on-disk cache may hold kernels of an earlier run); graph breaks: torch._dynamo.explain; "
        "fullgraph: torch.compile(fullgraph=True) captures the forward.\n",
        "| config | graph breaks | fullgraph | compile s | eager s/step | compiled s/step | speedup "
        "| max logit diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        timing = (f"{r['compile_s']:.1f} | {r['eager_s_per_step']:.3f} | {r['compiled_s_per_step']:.3f} | "
                  f"{r['speedup']:.2f} | {r['max_logit_diff_compiled_vs_eager']:.1e}") if "speedup" in r else " | | | |"
        lines.append(f"| {name} | {r['graph_breaks']} | {'yes' if r['fullgraph'] else 'no'} | {timing} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
