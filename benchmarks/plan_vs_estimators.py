"""``rw.plan`` next to the estimates people use today, on the same configurations, as a Markdown table
(``benchmarks/results/plan_vs_estimators.md``) and JSON.

The other estimators, restated from their documentation (formulas computed here, nothing imported):

* **accelerate estimate-memory** loads the model on ``meta`` and reports its size in a dtype; for
  training with Adam it takes about 4x that size (1x weights, 1x gradients, 2x Adam moments), in the
  dtype chosen. It knows neither adapters nor activations; 4-bit training is not estimated.
* **DeepSpeed's model-state estimators** (``estimate_zero2_model_states_mem_needs`` / ``..._zero3_...``,
  no offload): mixed-precision Adam on every parameter. ZeRO-2 per GPU: 4 bytes per parameter (fp16
  weights and gradients) plus 16 bytes per parameter divided over the GPUs (fp32 master weights and
  Adam moments, fp32 gradient partitions). ZeRO-3 per GPU: 4 bytes per parameter of the largest layer
  (gathered) plus 18 bytes per parameter divided over the GPUs. Model states only: no activations.
* **LLaMA-Factory's hardware table** (README, "estimated"): by method and bits, for an x-billion
  parameter model: full mixed-precision 18x GB, full pure-bf16 8x GB, freeze / LoRA / GaLore / APOLLO /
  BAdam in 16 bits 2x GB, QLoRA 8-bit x GB, 4-bit x/2 GB, 2-bit x/4 GB. One number per method: batch,
  length, rank and checkpointing do not enter.

    python benchmarks/plan_vs_estimators.py      # ~6 min on 2 busy CPU cores (the 7B rows probe 7B-sized tensors)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import rankwise as rw
from rankwise.planner import build_meta_model

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
#: A Llama-2-7B-shaped config (published dimensions), built on meta only.
LLAMA7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
           "max_position_embeddings": 4096, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}

#: (label, rw.plan keyword arguments, LLaMA-Factory row, accelerate dtype bytes or None, world size for DeepSpeed)
CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("SmolLM2-135M, LoRA r8, bf16 base, 8x512", dict(model="smollm2", method="lora", method_options={"r": 8},
                                                    dtype="bf16", batch_size=8, seq_len=512), "lora16"),
    ("SmolLM2-135M, full AdamW, fp32, 4x512", dict(model="smollm2", batch_size=4, seq_len=512), "full_mixed"),
    ("SmolLM2-135M, full AdamW, pure bf16, 8x1024, ckpt", dict(model="smollm2", dtype="bf16", batch_size=8,
                                                               seq_len=1024, checkpointing=True), "full_bf16"),
    ("SmolLM2-135M, GaLore r128, fp32, 4x512", dict(model="smollm2", optimizer="galore",
                                                    optimizer_options={"rank": 128}, batch_size=4, seq_len=512),
     "lora16"),
    ("SmolLM2-135M, LoRA r16 on NF4, bf16, 8x512", dict(model="smollm2", method="lora", method_options={"r": 16},
                                                        dtype="bf16", quant="nf4", batch_size=8, seq_len=512),
     "qlora4"),
    ("scratch-60M, APOLLO r128, fp32, 8x512", dict(model="scratch-60m", optimizer="apollo",
                                                   optimizer_options={"rank": 128}, batch_size=8, seq_len=512),
     "lora16"),
    ("Llama-7B shape, LoRA r16, bf16 base, 4x2048, ckpt", dict(model="LLAMA7B", method="lora",
                                                               method_options={"r": 16}, dtype="bf16",
                                                               batch_size=4, seq_len=2048, checkpointing=True),
     "lora16"),
    ("Llama-7B shape, LoRA r16 on NF4, bf16, 1x1024, ckpt", dict(model="LLAMA7B", method="lora",
                                                                 method_options={"r": 16}, dtype="bf16",
                                                                 quant="nf4", batch_size=1, seq_len=1024,
                                                                 checkpointing=True), "qlora4"),
    ("Llama-7B shape, GaLore r128 layer-wise, bf16, 1x2048, ckpt", dict(model="LLAMA7B", optimizer="galore",
                                                                        optimizer_options={"rank": 128},
                                                                        dtype="bf16", layerwise=True,
                                                                        batch_size=1, seq_len=2048,
                                                                        checkpointing=True), "lora16"),
    ("Llama-7B shape, full AdamW pure bf16, FSDP2 x8, 1x2048, ckpt", dict(model="LLAMA7B", dtype="bf16",
                                                                          world_size=8, batch_size=1,
                                                                          seq_len=2048, checkpointing=True),
     "full_bf16"),
]
#: LLaMA-Factory's table: GB per billion parameters.
LLAMA_FACTORY = {"full_mixed": (18.0, "Full (bf16/fp16 mixed)"), "full_bf16": (8.0, "Full (pure_bf16)"),
                 "lora16": (2.0, "Freeze/LoRA/GaLore/APOLLO/BAdam"), "qlora4": (0.5, "QLoRA 4-bit")}
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def estimators(kw: dict[str, Any], params: int, largest_layer: int, row: str) -> dict[str, Any]:
    """The accelerate / DeepSpeed / LLaMA-Factory numbers (bytes) for one configuration."""
    world = kw.get("world_size", 1)
    accelerate = None if kw.get("quant") else 4 * params * _BYTES[kw.get("dtype", "fp32")]
    zero2 = 4 * params + 16 * params // world
    zero3 = 4 * largest_layer + 18 * params // world
    per_billion, label = LLAMA_FACTORY[row]
    return {"accelerate": accelerate, "zero2": zero2, "zero3": zero3,
            "llama_factory": int(per_billion * params / 1e9 * 1e9), "llama_factory_row": label}


def _largest_layer(model: Any) -> int:
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def run() -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        llama7b = Path(tmp) / "config.json"
        llama7b.write_text(json.dumps(LLAMA7B))
        for label, kw, row in CONFIGS:
            model = str(llama7b) if kw["model"] == "LLAMA7B" else kw["model"]
            t0 = time.time()
            p = rw.plan(model, **{k: v for k, v in kw.items() if k != "model"})
            meta, _ = build_meta_model(model)
            total = sum({id(q): q.numel() for q in meta.parameters()}.values())
            est = estimators(kw, total, _largest_layer(meta), row)
            rows.append({"label": label, "config": {**kw, "model": kw["model"]}, "params": total,
                         "plan": p.to_dict(), **est, "seconds": round(time.time() - t0, 1)})
            print(f"{label:62s} plan {p.peak / GIB:7.2f} GiB  ({time.time() - t0:.0f} s)", flush=True)
    return {"rows": rows}


def _gib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / GIB:.2f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# rw.plan next to today's estimators", "",
        "Per-GPU GiB for the same configuration. `rw.plan` itemizes (W weights, G gradients, O optimizer state "
        "+ projectors, A activations + logits saved for backward) and its peak adds the transients of backward "
        "and of the optimizer step. The other three count model states only, from the parameter count "
        "(DeepSpeed and accelerate assume every parameter trains with Adam; LLaMA-Factory gives one number "
        "per method and model size). Generated by `benchmarks/plan_vs_estimators.py`; measured peaks on a GPU "
        "come from `benchmarks/plan_gpu_check.py` (`results/plan_gpu_check.md`).", "",
        "| configuration | params | rw.plan peak | W / G / O / A | accelerate (4x size) | DeepSpeed ZeRO-2 | "
        "DeepSpeed ZeRO-3 | LLaMA-Factory (row) |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        p = r["plan"]
        wgoa = (f"{p['weights'] / GIB:.2f} / {p['gradients'] / GIB:.2f} / "
                f"{(p['optimizer_state'] + p['projectors']) / GIB:.2f} / {(p['activations'] + p['logits']) / GIB:.2f}")
        world = r["config"].get("world_size", 1)
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.0f}M | **{p['peak'] / GIB:.2f}** | {wgoa} | "
                     f"{_gib(r['accelerate'])} | {_gib(r['zero2'])} (x{world}) | {_gib(r['zero3'])} (x{world}) | "
                     f"{_gib(r['llama_factory'])} ({r['llama_factory_row']}) |")
    lines += [
        "", "How to read it:", "",
        "- accelerate's 4x rule is the model-state cost of full Adam training in one dtype; it ignores "
        "adapters (a LoRA run is priced as full training), mixed precision's fp32 copies, and activations, which "
        "dominate at long sequences.",
        "- DeepSpeed's ZeRO formulas price mixed-precision Adam over every parameter (16-18 bytes each, split "
        "over GPUs) and stop at model states; with one GPU they are the cost of full mixed-precision training.",
        "- LLaMA-Factory's table is a rule of thumb per method (GB per billion parameters); it has one row for "
        "LoRA, GaLore, APOLLO and BAdam alike and no batch or sequence length.",
        "- rw.plan prices the run actually configured: the adapter's real parameters, the optimizer's real "
        "state (probed), the 4-bit storage bits, sharding, and activations from a meta forward/backward.", "",
    ]
    return "\n".join(lines)


def main() -> int:
    result = run()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "plan_vs_estimators.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "plan_vs_estimators.md").write_text(markdown(result))
    print(f"wrote {RESULTS / 'plan_vs_estimators.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
