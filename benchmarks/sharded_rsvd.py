"""Sharded randomized SVD (``rankwise.optim.sharding.sharded_range_basis``) vs gather-then-SVD for a
projector refresh of a row-sharded gradient (FSDP2 ``Shard(0)``), on 2 CPU processes (gloo).

``torchrun --standalone --nproc_per_node 2 benchmarks/sharded_rsvd.py [--out benchmarks/results]``

For SmolLM2-135M's matrix shapes (hidden 576, MLP 1536) and a larger one, G = a rank-32 signal with
a decaying spectrum + noise, rank r = 32:

* **gather + exact SVD** (what a ``projector="svd"`` refresh does today): ``full_tensor()`` then
  ``torch.linalg.svd``;
* **gather + randomized** (the same range finder run on the gathered G, one process's work);
* **sharded randomized**: local sketches, all-reduces of n×k (per pass) and k×k, never gathering G.

Reported per refresh: bytes each rank receives (analytic from the collectives: all-gather
(w−1)/w·m·n·8; all-reduce (ring) 2(w−1)/w·size·8 — an upper bound of what gloo moves), transient
bytes (the gathered G, or the sketches), median wall time over 5 runs, and the subspace error
‖P Pᵀ − P* P*ᵀ‖₂ against the exact top-r subspace (float64).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from rankwise.optim.sharding import sharded_range_basis

SHAPES = [(1536, 576), (576, 1536), (4096, 1024)]  # (m, n): MLP down (right basis), up (left basis), larger
RANK, OVERSAMPLE, POWER = 32, 8, 1


def _signal(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, 64, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, 64, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -3, 64, dtype=torch.float64)
    return (u * s) @ v.T + 1e-4 * torch.randn(m, n, generator=g, dtype=torch.float64)


def _timed(fn, repeat: int = 5):
    times, out = [], None
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _error(P: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(P @ P.T - exact @ exact.T, ord=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    k = RANK + OVERSAMPLE
    for m, n in SHAPES:
        full = _signal(m, n)
        G = distribute_tensor(full, mesh, [Shard(0)])
        side = "right" if m >= n else "left"
        U, _, Vh = torch.linalg.svd(full, full_matrices=False)
        exact = Vh[:RANK].T if side == "right" else U[:, :RANK]

        def svd_basis(G=G, side=side):
            F = G.full_tensor()
            u, _, vh = torch.linalg.svd(F, full_matrices=False)
            return vh[:RANK].T if side == "right" else u[:, :RANK]

        gathered, t_svd = _timed(svd_basis)
        rsvd_g, t_rsvd_g = _timed(lambda G=G, side=side: sharded_range_basis(
            G.full_tensor(), RANK, side=side, oversample=OVERSAMPLE, power_iters=POWER))
        sharded, t_sharded = _timed(lambda G=G, side=side: sharded_range_basis(
            G, RANK, side=side, oversample=OVERSAMPLE, power_iters=POWER))
        ring = 2 * (world - 1) / world
        gather_bytes = (world - 1) / world * m * n * 8
        sharded_bytes = ring * ((POWER + 1) * n * k + k * k) * 8
        if side == "left":
            sharded_bytes += (world - 1) / world * m * RANK * 8
        local_rows = m // world
        rows.append({
            "shape": [m, n], "side": side, "rank": RANK, "k": k, "power_iters": POWER, "world": world,
            "gather_svd": {"recv_bytes": gather_bytes, "transient_bytes": m * n * 8, "time_s": t_svd,
                           "error": _error(gathered, exact)},
            "gather_rsvd": {"recv_bytes": gather_bytes, "transient_bytes": m * n * 8 + (m + n) * k * 8,
                            "time_s": t_rsvd_g, "error": _error(rsvd_g, exact)},
            "sharded_rsvd": {"recv_bytes": sharded_bytes, "transient_bytes": (local_rows * k + 2 * n * k) * 8,
                             "time_s": t_sharded, "error": _error(sharded, exact)},
            "same_on_every_rank": None,
        })
        check = [None] * world
        dist.all_gather_object(check, sharded)
        rows[-1]["same_on_every_rank"] = all(torch.equal(check[0], c) for c in check)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sharded_rsvd.json").write_text(json.dumps(rows, indent=1))
        lines = ["| shape (m×n) | basis | method | received / rank | transient | time | subspace error |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            for key, name in (("gather_svd", "gather + exact SVD"), ("gather_rsvd", "gather + randomized"),
                              ("sharded_rsvd", "sharded randomized")):
                v = r[key]
                lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['side']} | {name} | "
                             f"{v['recv_bytes'] / 1024:,.0f} KiB | {v['transient_bytes'] / 1024:,.0f} KiB | "
                             f"{v['time_s'] * 1e3:.1f} ms | {v['error']:.1e} |")
        (out / "sharded_rsvd.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
