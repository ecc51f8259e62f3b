"""The projected engine's refresh under FSDP2: the randomized range finder on the shards vs on the
gathered gradient, on 2 CPU processes (gloo).

``torchrun --standalone --nproc_per_node 2 benchmarks/sharded_rsvd.py [--out benchmarks/results]``

One ``fully_shard``-ed weight per shape (SmolLM2-135M's: MLP gate/up 1536×576, down 576×1536,
attention q/o 576×576, k/v 192×576; and a 60M-Llama-shape 1376×512), a float32 gradient with a
decaying spectrum (a 64-direction signal, singular values 1 → 1e-3, plus noise) set as its
``Shard(0)`` gradient, and GaLore at rank 32 with ``update_gap=1`` (every step refreshes; the
warm-started range finder: one power round). Three ways to refresh:

* **sharded rsvd** (the engine now): ``sharding.RowShardedOperand``, all-reduces of k-column sketches;
* **gathered rsvd** (the engine before): the same range finder on ``full_tensor()`` of the gradient;
* **gathered svd** (``projector="svd"``): the exact SVD of the gathered gradient.

Per optimizer step (each one a refresh), rank 0: bytes this rank receives (``sharding.CollectiveLog``:
an all-gather (w − 1)·chunk, a ring all-reduce 2(w − 1)/w·size), the number of collectives, the
largest tensor any local op creates in the step (the gathered gradient, or a shard-sized update /
cast; a proxy of the transient memory, CPU has no allocator peak), the median wall time over 10 warm
steps after one warm-up (cold) step, and the captured gradient energy ‖PᵀG‖²/‖G‖².
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

import rankwise.optim as rwo
from rankwise.optim.projectors import RandomizedSVDProjector
from rankwise.optim.sharding import CollectiveLog

SHAPES = [(1536, 576), (576, 1536), (576, 576), (192, 576), (1376, 512)]  # (m, n) = (out, in)
RANK, STEPS = 32, 11
MODES = {"sharded rsvd": ("rsvd", True), "gathered rsvd": ("rsvd", False), "gathered svd": ("svd", False)}


def _gradient(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, 64, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, 64, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -3, 64, dtype=torch.float64)
    return ((u * s) @ v.T + 1e-4 * torch.randn(m, n, generator=g, dtype=torch.float64)).float()


class LargestLocal(TorchDispatchMode):
    """The largest tensor a local (non-DTensor) op returns inside the block, in bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, list | tuple) else (out,):
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def measure(m: int, n: int, projector: str, sharded: bool, mesh, world: int) -> dict:
    RandomizedSVDProjector.sharded_refresh = sharded
    layer = nn.Linear(n, m, bias=False)
    fully_shard(layer, mesh=mesh)
    opt = rwo.make("galore", [{"params": [layer.weight], "rank": RANK}], lr=1e-3, update_gap=1, projector=projector)
    grad = distribute_tensor(_gradient(m, n), mesh, [Shard(0)])
    times, log, largest = [], CollectiveLog(), LargestLocal()
    for i in range(STEPS + 1):
        layer.weight.grad = grad.clone()
        dist.barrier()
        t0 = time.perf_counter()
        if i == STEPS:  # the last step, logged (the log's dispatch mode would slow the timed ones)
            with log, largest:
                opt.step()
        else:
            opt.step()
            if i:
                times.append(time.perf_counter() - t0)
    st = opt.state[layer.weight]
    return {"received_bytes": log.received_bytes(world), "collectives": len(log.ops),
            "largest_local_bytes": largest.largest, "time_s": statistics.median(times),
            "energy": float(st["proj_energy"]), "side": "right" if m >= n else "left"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for m, n in SHAPES:
        for name, (projector, sharded) in MODES.items():
            rows.append({"shape": [m, n], "method": name, "rank": RANK, "world": world,
                         **measure(m, n, projector, sharded, mesh, world)})
    RandomizedSVDProjector.sharded_refresh = True
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sharded_rsvd.json").write_text(json.dumps(rows, indent=1))
        lines = ["| shape (m×n) | basis | refresh | received / rank | collectives | largest local tensor | "
                 "step time | captured energy |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['side']} | {r['method']} | "
                         f"{r['received_bytes'] / 1024:,.0f} KiB | {r['collectives']} | "
                         f"{r['largest_local_bytes'] / 1024:,.0f} KiB | {r['time_s'] * 1e3:.1f} ms | "
                         f"{r['energy']:.4f} |")
        (out / "sharded_rsvd.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
