"""Peak memory of the layer-wise mode: AdamW, layer-wise AdamW, GaLore, layer-wise GaLore, next to the
predicted peak  weights + optimizer state + activations + the largest gradient.

Models: the 60M Llama of benchmarks/pretrain.py (``llama_config("60m")``, tied 49,152×512 embedding,
random init) and SmolLM2-135M (tied 49,152×576 embedding, from the packaged checkpoint), fp32, on
random token ids (memory does not depend on their values). Every arm runs in its own subprocess
(``--arm``), ``--steps`` optimizer steps, and is measured two ways at once:

* **tensor accounting** (``rankwise.memory.TensorMemoryTracker``, a TorchDispatchMode): every storage
  an operator creates, until it is freed; gradients are labelled by a post-accumulate-grad hook,
  optimizer state after each step. Peak = the weights + the live tracked bytes, per step;
* **process peak RSS** (``/proc/self/status`` VmHWM, reset by ``clear_refs`` after the model is
  built), with ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors go back to the OS.

The prediction uses terms measured independently of the arm: W = the weights, S = the arm's
optimizer state bytes (``state_bytes()``), A = the peak of the non-gradient tensors during a forward +
backward with no optimizer (the ``activations`` arm: activations, their gradients and the backward's
temporaries; gradients dropped at their hook), G_max = the largest parameter's gradient.
Layer-wise: predicted = W + S + A + G_max. Normal optimizers keep every gradient ΣG until ``step()``;
their bound is W + S + A + ΣG (A and ΣG do not peak at the same moment, so the bound is loose).

    python benchmarks/layerwise_memory.py       # both models -> benchmarks/results/layerwise_memory.{json,md}
    python benchmarks/layerwise_memory.py --models llama60m --batch 2 --seq 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
ARMS = ("activations", "adamw", "layerwise_adamw", "galore", "layerwise_galore")
MiB = 2**20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def build(model_name: str, seq: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from rankwise.models.loaders import ensure_smollm2_cache, llama_config

    torch.manual_seed(0)
    if model_name == "llama60m":
        return LlamaForCausalLM(llama_config("60m", max_positions=max(256, seq)))
    path = ensure_smollm2_cache(verbose=False)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    with torch.no_grad():  # own memory, not pages of the checkpoint file
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def make_optimizer(arm: str, model: torch.nn.Module, rank: int) -> Any:
    import rankwise.optim as rwo

    def adamw(groups: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=1e-3, fused=True)

    def galore(groups: Any) -> torch.optim.Optimizer:
        return rwo.GaLoreAdamW(groups, lr=1e-2, scale=0.25, update_gap=200)

    if arm == "adamw":
        return adamw(model.parameters())
    if arm == "layerwise_adamw":
        return rwo.layerwise(model, adamw)
    if arm == "galore":
        return galore(rwo.param_groups(model, rank=rank))
    if arm == "layerwise_galore":
        return rwo.layerwise(rwo.param_groups(model, rank=rank), galore, owner=model)
    raise ValueError(arm)


def run_arm(model_name: str, arm: str, batch: int, seq: int, steps: int, rank: int, threads: int) -> dict[str, Any]:
    from rankwise.memory import TensorMemoryTracker, reset_peak_memory, unique_parameters
    from rankwise.optim.accounting import state_bytes, tensors_in

    torch.set_num_threads(threads)
    model = build(model_name, seq)
    model.train()
    params = unique_parameters(model)
    weights = sum(p.numel() * p.element_size() for p in params)
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    tracker = TensorMemoryTracker(baseline=weights + ids.numel() * ids.element_size())

    def label_grad(p: torch.Tensor) -> None:
        tracker.label(p.grad, "grad")
        if arm == "activations":
            p.grad = None

    for p in params:  # registered before the optimizer's hooks: runs first
        p.register_post_accumulate_grad_hook(label_grad)
    param_ids = {id(p) for p in params}

    def label_contributions(loss: torch.Tensor) -> None:
        """A tied weight's gradient arrives in parts (head, embedding) that autograd sums before the
        hook: label every part sent to a parameter's AccumulateGrad node as gradient too."""
        seen, todo = set(), [loss.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            slots = [i for i, (nxt, _) in enumerate(node.next_functions)
                     if nxt is not None and id(getattr(nxt, "variable", None)) in param_ids]
            if slots:
                def hook(grad_inputs, grad_outputs, slots=slots):
                    for i in slots:
                        if grad_inputs[i] is not None:
                            tracker.label(grad_inputs[i], "grad")
                node.register_hook(hook)
            todo.extend(nxt for nxt, _ in node.next_functions)
    reset_peak_memory(torch.device("cpu"))
    rss_base = _status("VmRSS")
    per_step, times = [], []
    with tracker:
        opt = None if arm == "activations" else make_optimizer(arm, model, rank)
        init_bytes = 0 if opt is None else state_bytes(opt)
        for step in range(steps):
            tracker.mark(f"step{step}")
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            label_contributions(loss)
            loss.backward()
            del loss
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
                for t in tensors_in([o.state for o in getattr(opt, "optimizers", [opt])]):
                    tracker.label(t, "state")
            times.append(time.perf_counter() - t0)
            tracker.mark(f"step{step}")
            per_step.append(tracker.peaks(f"step{step}"))
    rss_peak = _status("VmHWM")
    out = {
        "model": model_name, "arm": arm, "params": sum(p.numel() for p in params),
        "weights_bytes": weights,
        "largest_grad_bytes": max(p.numel() * p.element_size() for p in params),
        "all_grads_bytes": sum(p.numel() * p.element_size() for p in params),
        "state_bytes": 0 if opt is None else state_bytes(opt),
        "state_bytes_before_step1": init_bytes,
        "lazy": (opt.init_report.lazy if getattr(opt, "init_report", None) is not None else []),
        "per_step": per_step,
        "peak_bytes": max(s["total"] for s in per_step),
        "rss_base_bytes": rss_base, "rss_peak_bytes": rss_peak,
        "step_seconds": times,
    }
    return out


def run_subprocess(model_name: str, arm: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--arm", f"{model_name}:{arm}", "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3000)
    if done.returncode != 0:
        raise RuntimeError(f"{model_name}:{arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


RANKS = {"llama60m": 128, "smollm2": 144}  # hidden / 4 (GaLore's pre-training rank rule)


def predicted(arm: dict[str, Any], act: dict[str, Any]) -> int:
    activations = act["per_step"][-1]["other"]
    grads = arm["largest_grad_bytes"] if arm["arm"].startswith("layerwise") else arm["all_grads_bytes"]
    return arm["weights_bytes"] + arm["state_bytes"] + activations + grads


def rss_predicted(arm: dict[str, Any], act: dict[str, Any]) -> int:
    """RSS before the optimizer (interpreter, libraries, weights, data) + S + A + G."""
    return predicted(arm, act) - arm["weights_bytes"] + arm["rss_base_bytes"]


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "layerwise_memory.json").write_text(json.dumps(result, indent=1))
    cfg = result["config"]
    lines = [
        "# Layer-wise mode: peak memory (CPU, fp32)",
        "",
        f"batch {cfg['batch']} × seq {cfg['seq']}, {cfg['steps']} steps per arm, random token ids, "
        f"{cfg['threads']} thread(s); AdamW = `torch.optim.AdamW(fused=True)`, GaLore = `GaLoreAdamW` "
        "(rank hidden/4, rsvd projector) on `param_groups(model, rank)`. Tensor peak: weights + live "
        "tensors (TensorMemoryTracker), max over the steps (step 1 in brackets when it differs). "
        "Predicted: W + S + A + G_max for layer-wise, W + S + A + ΣG (a bound) for the normal optimizers. "
        "RSS: process VmHWM; predicted RSS = RSS before the optimizer + S + A + G. MiB.",
        "",
    ]
    for model_name, arms in result["models"].items():
        act = arms["activations"]
        w = act["weights_bytes"]
        lines += [
            f"## {model_name} ({act['params'] / 1e6:.1f}M parameters)",
            "",
            f"W = {w / MiB:.1f}, A = {act['per_step'][-1]['other'] / MiB:.1f} (peak of activations + backward "
            f"temporaries, no optimizer), G_max = {act['largest_grad_bytes'] / MiB:.1f}, "
            f"ΣG = {act['all_grads_bytes'] / MiB:.1f}.",
            "",
            "| arm | S (state) | tensor peak | predicted | measured / predicted | at the peak: grads + other "
            "| peak RSS | predicted RSS | vs AdamW | vs GaLore |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in ARMS[1:]:
            r = arms[name]
            pred = predicted(r, act)
            first = r["per_step"][0]["total"]
            peak = r["peak_bytes"]
            at = max(r["per_step"], key=lambda s: s["total"])
            step1 = f" ({first / MiB:.1f})" if abs(first - peak) > MiB else ""
            rel = {k: f"{peak / arms[k]['peak_bytes']:.3f}" for k in ("adamw", "galore")}
            lines.append(
                f"| {name} | {r['state_bytes'] / MiB:.1f} | {peak / MiB:.1f}{step1} | {pred / MiB:.1f} | "
                f"{peak / pred:.3f} | {at.get('grad@total', 0) / MiB:.1f} + {at.get('other@total', 0) / MiB:.1f} | "
                f"{r['rss_peak_bytes'] / MiB:.0f} | {rss_predicted(r, act) / MiB:.0f} | "
                f"{rel['adamw']} | {rel['galore']} |"
            )
        lazy = sorted({line.split(":", 1)[1].strip() for line in arms["layerwise_galore"]["lazy"]})
        lines += ["", "Layer-wise GaLore state left to the first gradient: " + "; ".join(lazy) + ".", ""]
    (out / "layerwise_memory.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama60m", "smollm2"], choices=list(RANKS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arm", help="internal: run one MODEL:ARM and print its JSON")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.arm:
        model_name, arm = args.arm.split(":")
        print(json.dumps(run_arm(model_name, arm, args.batch, args.seq, args.steps, RANKS[model_name], args.threads)))
        return
    result: dict[str, Any] = {
        "config": {"batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": args.threads,
                   "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()},
        "models": {},
    }
    for model_name in args.models:
        arms = result["models"][model_name] = {}
        for arm in ARMS:
            t0 = time.time()
            arms[arm] = run_subprocess(model_name, arm, args)
            print(f"{model_name} {arm}: peak {arms[arm]['peak_bytes'] / MiB:.1f} MiB, "
                  f"RSS {arms[arm]['rss_peak_bytes'] / MiB:.0f} MiB ({time.time() - t0:.0f} s)", flush=True)
    write(result, args.out)
    print((args.out / "layerwise_memory.md").read_text())


if __name__ == "__main__":
    main()
