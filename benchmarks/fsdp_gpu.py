"""FSDP2 on GPUs: AdamW, GaLore (randomized SVD), APOLLO and layer-wise GaLore on SmolLM2-135M.

``torchrun --standalone --nproc_per_node N benchmarks/fsdp_gpu.py [--steps 30] [--out benchmarks/results]``
(N = 1 works: FSDP2 on a 1-GPU mesh). ``--cpu`` is a smoke test (gloo; e.g. ``--steps 4
--max-length 32 --batch-size 2``), written to ``fsdp_cpu_smoke.*``. Not run in this repository's CI
(no GPU); sized for well under 8 minutes on one H100 (4 optimizers × (load ~1 s from the cached
safetensors after the first ~30 s GGUF conversion + ``--steps`` steps of 8×512 tokens, bf16 autocast,
fp32 master weights)).

Per optimizer: ``fully_shard`` on every decoder layer and the root (nccl), ``rw.optim.make`` after
sharding (layer-wise: one optimizer per parameter stepped in its backward hook), the same seeded
batches of ``rankwise``'s stdlib-code corpus on every run (each rank takes its slice). Reported:
mean step time after 3 warm-up steps, ``torch.cuda.max_memory_allocated`` per rank, this rank's
optimizer state (``sharding.local_state_bytes``: sharded + replicated), the loss of the first and last
step. Results: ``<out>/fsdp_gpu.json`` and ``.md`` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import rankwise.optim as rwo
from rankwise.cli.common import text_loader
from rankwise.models import load_model
from rankwise.optim.sharding import local_state_bytes

RUNS = {  # name -> (rw.optim.make name or "layerwise:<name>", kwargs)
    "adamw": ("adamw", {"lr": 1e-4}),
    "galore_rsvd": ("galore", {"rank": 128, "lr": 1e-4, "update_gap": 10, "projector": "rsvd", "scale": 0.25}),
    "apollo": ("apollo", {"rank": 128, "lr": 1e-4, "update_gap": 10, "scale": 1.0}),
    "layerwise_galore": ("layerwise:galore", {"rank": 128, "lr": 1e-4, "update_gap": 10, "scale": 0.25}),
}


def _optimizer(method: str, model: torch.nn.Module, kwargs: dict) -> torch.optim.Optimizer:
    if method.startswith("layerwise:"):
        name, kw = method.split(":", 1)[1], dict(kwargs)
        groups = rwo.param_groups(model, rank=kw.pop("rank"))
        return rwo.layerwise(groups, lambda g: rwo.make(name, g, **kw))
    return rwo.make(method, model, **kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(tag: str, method: str, kwargs: dict, batches: list, mesh, rank: int, world: int, device) -> dict:
    torch.manual_seed(0)
    model, _ = load_model("smollm2-135m", task="causal-lm")
    model.to(device)
    model.config.use_cache = False
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = _optimizer(method, model, kwargs)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i, batch in enumerate(batches):
        local = {k: v.tensor_split(world)[rank].to(device) for k, v in batch.items()}
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    state = local_state_bytes(optimizer)
    out = {
        "tag": tag, "method": method, "kwargs": kwargs, "world": world,
        "step_s": sum(times) / max(1, len(times)),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        "state_bytes_sharded": state["sharded"], "state_bytes_replicated": state["replicated"],
        "loss_first": losses[0], "loss_last": losses[-1],
        "svd_fallbacks": int(getattr(optimizer, "svd_fallbacks", 0)),
    }
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(RUNS))
    parser.add_argument("--cpu", action="store_true", help="smoke test on CPU (gloo), no memory numbers")
    args = parser.parse_args()
    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.cpu:
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    mesh = init_device_mesh(device.type, (world,))
    _, tok = load_model("smollm2-135m", task="causal-lm")
    loader = text_loader("stdlib-code", "train", tok, args.max_length, args.batch_size, seed=0, limit=400)
    batches = []
    for batch in loader:
        if len(batches) == args.steps:
            break
        if len(next(iter(batch.values()))) == args.batch_size:
            batches.append({k: v for k, v in batch.items() if torch.is_tensor(v)})
    runs = {k: RUNS[k] for k in args.only.split(",")} if args.only else RUNS
    results = [run_one(tag, method, kw, batches, mesh, rank, world, device) for tag, (method, kw) in runs.items()]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        record = {"gpu": gpu, "world": world, "steps": args.steps,
                  "batch_size": args.batch_size, "max_length": args.max_length, "per_rank": gathered}
        name = "fsdp_gpu" if device.type == "cuda" else "fsdp_cpu_smoke"
        (out / f"{name}.json").write_text(json.dumps(record, indent=1))
        lines = [f"SmolLM2-135M, FSDP2 on {world} × {record['gpu']}, global batch {args.batch_size}×{args.max_length}, "
                 f"bf16 autocast, {args.steps} steps", "",
                 "| optimizer | step (s) | peak allocated / rank (MiB) | state / rank: sharded + replicated (MiB) "
                 "| loss first → last |", "|---|---|---|---|---|"]
        for r in results:
            lines.append(f"| {r['tag']} | {r['step_s']:.3f} | {r['peak_allocated_bytes'] / 2**20:,.0f} | "
                         f"{r['state_bytes_sharded'] / 2**20:,.1f} + {r['state_bytes_replicated'] / 2**20:,.1f} | "
                         f"{r['loss_first']:.3f} → {r['loss_last']:.3f} |")
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
