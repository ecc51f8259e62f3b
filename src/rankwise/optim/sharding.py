"""DTensor support for the projected engine (FSDP2 / ``fully_shard``).

Under FSDP2 a parameter and its gradient are DTensors sharded along dim 0 on a device mesh. The
engine keeps every projector's state (bases, seeds, index sets) as *plain* tensors, identical on
every rank, and handles sharding in two places only:

* a refresh computes the new basis from the full gradient (:func:`full`: one all-gather every
  ``update_gap`` steps, the same data on every rank, so every rank computes the same basis; seeded
  draws use the per-parameter seed, which is the same on every rank because every rank holds the
  same parameter list);
* ``project`` / ``back`` lift the plain matrix to a replicated DTensor on the gradient's mesh
  (:func:`like`), so R = G·Pᵀ of a row-sharded G stays row-sharded without communication (a left
  projection Pᵀ·G contracts the sharded dimension and DTensor all-reduces the r×n result).
"""

from __future__ import annotations

from typing import Any

import torch

try:  # torch.distributed may be absent from a build
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The full (gathered) plain tensor of a DTensor; a plain tensor is returned as is."""
    return t.full_tensor() if is_dtensor(t) else t


def like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (a plain tensor holding the same values on every rank) as a replicated DTensor on
    ``ref``'s mesh when ``ref`` is a DTensor; otherwise ``x`` unchanged. No communication."""
    if not is_dtensor(ref) or is_dtensor(x):
        return x
    mesh = ref.device_mesh
    return DTensor.from_local(x, mesh, [Replicate()] * mesh.ndim, run_check=False)


def replicated(t: torch.Tensor) -> torch.Tensor:
    """A DTensor with every placement ``Replicate`` (a norm's pending partial reduction is done here,
    so state saved by ``torch.distributed.checkpoint`` always has one layout); others unchanged."""
    if not is_dtensor(t) or all(isinstance(pl, Replicate) for pl in t.placements):
        return t
    return t.redistribute(placements=[Replicate()] * t.device_mesh.ndim)


#: Why a flattened parameter cannot be projected, and what to use instead.
FLAT_HINT = (
    "projection needs each weight's own 2-D shape: shard with FSDP2 (torch.distributed.fsdp.fully_shard, "
    "whose DTensor parameters keep their shape) or FSDP1 with use_orig_params=True; FSDP1's "
    "use_orig_params=False FlatParameter and DeepSpeed ZeRO's flattened partitions are not supported"
)


def is_flat(p: torch.Tensor) -> bool:
    """A flattened parameter: FSDP1's ``FlatParameter`` or a DeepSpeed ZeRO partition (``ds_shape``)."""
    return bool(getattr(p, "_is_flat_param", False)) or hasattr(p, "ds_shape")


def reduced(t: torch.Tensor) -> torch.Tensor:
    """A DTensor with its pending partial sums done (``Partial`` → ``Replicate``, shards kept): a left
    projection PᵀG contracts the sharded dimension, and the inner update's nonlinear in-place ops
    (Adafactor's clamps) need the reduced value. Plain tensors unchanged."""
    if not is_dtensor(t) or not any(pl.is_partial() for pl in t.placements):
        return t
    return t.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in t.placements])


def zero_redundancy(model: torch.nn.Module, name: str, process_group: Any = None, **kwargs: Any) -> Any:
    """``torch.distributed.optim.ZeroRedundancyOptimizer`` around ``rankwise.optim.make(name, model,
    **kwargs)`` (same param groups and options), with the per-parameter seeds of one process.

    ZeRO builds each rank's local optimizer on that rank's share of the parameters, so a projected
    optimizer there would number its seeds over the local share only: APOLLO's, Flora's and the
    range finder's seeded projections would differ from rank to rank and from one process (APOLLO:
    0.022 apart after 4 steps). Here the seeds are numbered over the whole model, once, and handed
    to every local optimizer. Block samplers decide per step which parameters train and are refused.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from .factory import SAMPLERS, make

    if name in SAMPLERS:
        raise ValueError(f"{name!r} samples blocks of the model; use it with DDP or FSDP2, not ZeroRedundancyOptimizer")
    whole = make(name, model, **kwargs)  # no state until its first step: only groups and seeds are used
    if type(whole).__name__ == "GuardedOptimizer":
        raise ValueError("zero_redundancy does not wrap GuardedOptimizer options (skip_nonfinite, master_weights, ...)")
    options = {k: v for k, v in kwargs.items() if k not in ("rank", "targets")}
    groups = [dict(g) for g in whole.param_groups]
    zero = ZeroRedundancyOptimizer(groups, optimizer_class=type(whole), process_group=process_group, **options)
    seeds = getattr(whole, "_seeds", None)
    if seeds is not None:
        local = zero.optim
        local._seeds = {p: seeds[p] for g in local.param_groups for p in g["params"] if p in seeds}
        local._param_count = whole._param_count
    return zero


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor that holds ``t``'s bytes in this process: a DTensor's local shard, else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def local_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's optimizer state in bytes: ``"sharded"`` (the local shards of DTensors sharded
    over the mesh: moments of row-sharded projections, full AdamW moments), ``"replicated"`` (plain
    tensors — projector bases, seeds, index sets — and replicated DTensors, held whole on every
    rank). Per-parameter state only (``optimizer.state``), each storage once."""
    out = {"sharded": 0, "replicated": 0}
    seen: set[tuple[int, int]] = set()
    states = [st for o in getattr(optimizer, "optimizers", [optimizer]) for st in o.state.values()]
    for st in states:
        for value in st.values():
            if not torch.is_tensor(value):
                continue
            local = local_tensor(value)
            key = (local.untyped_storage().data_ptr(), local.storage_offset())
            if key in seen:
                continue
            seen.add(key)
            kind = "sharded" if is_dtensor(value) and any(pl.is_shard() for pl in value.placements) else "replicated"
            out[kind] += local.numel() * local.element_size()
    return out


def _sum(t: torch.Tensor, group: Any) -> torch.Tensor:
    """All-reduce (sum) of a plain tensor over ``group``; unchanged without one."""
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
    return t


def sharded_range_basis(
    G: torch.Tensor, rank: int, *, side: str = "right", oversample: int = 8, power_iters: int = 1, seed: int = 0,
) -> torch.Tensor:
    """Top-``rank`` singular subspace of a row-sharded G (m×n, FSDP2's ``Shard(0)``) by a randomized
    range finder that never gathers G: every rank sketches its own rows, and only k×n / k×k
    (k = rank + oversample) products are all-reduced. Returns a plain tensor, the same on every rank:
    ``side="right"`` the n×rank right singular vectors (a right projection R = G·P), ``"left"`` the
    m×rank left singular vectors (gathered: m×rank, for a left projection PᵀG). A plain G (one process)
    runs the same algorithm without communication.

    Right: Z = GᵀGΩ = Σᵢ Gᵢᵀ(GᵢΩ) (one all-reduce of n×k per pass, ``power_iters`` + 1 passes), Q =
    qr(Z), C = (GQ)ᵀ(GQ) = Σᵢ (GᵢQ)ᵀ(GᵢQ) (one all-reduce of k×k), V = Q·eigvecs(C)[top rank].
    Left: U = G·V·Σ⁻¹ from that right basis, computed on the local rows (no communication), then
    all-gathered (m×rank). Ω is drawn from ``seed`` (the same on every rank). Not wired into the
    projected engine yet (a refresh there gathers G); see ``benchmarks/sharded_rsvd.py``.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r} must be 'right' or 'left'")
    group = None
    local = G
    if is_dtensor(G):
        if G.device_mesh.ndim != 1 or not G.placements[0].is_shard(0):
            raise ValueError("sharded_range_basis needs a DTensor sharded along dim 0 on a 1-D mesh (FSDP2)")
        group = G.device_mesh.get_group()
        local = G.to_local()
    m, n = G.shape
    k = min(rank + oversample, m, n)
    gen = torch.Generator(device=local.device).manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, device=local.device, dtype=local.dtype)
    Z = omega
    for _ in range(power_iters + 1):
        Z = _sum(local.T @ (local @ Z), group)  # n×k: GᵀG·Z
        Z, _ = torch.linalg.qr(Z)
    GQ = local @ Z  # local rows × k
    C = _sum(GQ.T @ GQ, group)  # k×k
    evals, evecs = torch.linalg.eigh(C)
    top = evecs[:, torch.argsort(evals, descending=True)[:rank]]
    V = Z @ top  # n×rank right singular vectors
    if side == "right":
        return V
    sigma = evals.sort(descending=True).values[:rank].clamp_min(torch.finfo(local.dtype).tiny).sqrt()
    U_local = (local @ V) / sigma  # this rank's rows of U
    if group is None:
        return U_local
    import torch.distributed as dist

    parts = [torch.empty_like(U_local) for _ in range(dist.get_world_size(group))]
    if m % len(parts):  # uneven shards would need all_gather with sizes
        raise ValueError("sharded_range_basis side='left' needs m divisible by the world size")
    dist.all_gather(parts, U_local.contiguous(), group=group)
    return torch.cat(parts)
