"""DTensor support for the projected engine (FSDP2 / ``fully_shard``).

Under FSDP2 a parameter and its gradient are DTensors sharded along dim 0 on a device mesh. The
engine keeps every projector's state (bases, seeds, index sets) as *plain* tensors, identical on
every rank, and handles sharding in two places only:

* a refresh computes the new basis: the randomized range finder (``rsvd``, ``rsvd_int4``) on this
  rank's rows (:class:`RowShardedOperand`: all-reduces of k-column sketches, never the gradient);
  seeded Gaussians and coordinates do not read it; the other projectors use the full gradient
  (:func:`full`: one all-gather every ``update_gap`` steps). Either way every rank computes the
  same basis: seeded draws use the per-parameter seed, the same on every rank because every rank
  holds the same parameter list;
* ``project`` / ``back`` lift the plain matrix to a replicated DTensor on the gradient's mesh
  (:func:`like`), so R = G·Pᵀ of a row-sharded G stays row-sharded without communication (a left
  projection Pᵀ·G contracts the sharded dimension and DTensor all-reduces the r×n result); a left
  P (the weight's rows) is lifted row-sharded for back(N) = P·N (:func:`like_rows`), so the update
  is sharded like the weight.
"""

from __future__ import annotations

from typing import Any

import torch

from ..shards import full, is_dtensor  # noqa: F401  (the engine's modules import both from here)

try:  # torch.distributed may be absent from a build
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (a plain tensor holding the same values on every rank) as a replicated DTensor on
    ``ref``'s mesh when ``ref`` is a DTensor; otherwise ``x`` unchanged. No communication."""
    if not is_dtensor(ref) or is_dtensor(x):
        return x
    mesh = ref.device_mesh
    return DTensor.from_local(x, mesh, [Replicate()] * mesh.ndim, run_check=False)


def placed_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor ``x`` laid out like the DTensor ``ref`` (this rank's slice of it: no
    communication); anything else unchanged. ``G − back(R)`` of a left projection subtracts a
    replicated m×n from a row-sharded G, which DTensor would otherwise do by all-gathering G."""
    if not (is_dtensor(x) and is_dtensor(ref)) or tuple(x.placements) == tuple(ref.placements):
        return x
    if not all(isinstance(pl, Replicate) for pl in x.placements):
        return x
    return x.redistribute(ref.device_mesh, ref.placements)


def replicated(t: torch.Tensor) -> torch.Tensor:
    """A DTensor with every placement ``Replicate`` (a norm's pending partial reduction is done here,
    so state saved by ``torch.distributed.checkpoint`` always has one layout); others unchanged."""
    if not is_dtensor(t) or all(isinstance(pl, Replicate) for pl in t.placements):
        return t
    return t.redistribute(placements=[Replicate()] * t.device_mesh.ndim)


def all_finite(t: torch.Tensor) -> bool:
    """Every element of ``t`` finite; for a DTensor over all its shards (the same answer on every rank)."""
    if not is_dtensor(t):
        return bool(torch.isfinite(t).all())
    import torch.distributed as dist

    bad = (~torch.isfinite(t.to_local())).sum().reshape(1).to(torch.int64)
    dist.all_reduce(bad, group=t.device_mesh.get_group())
    return int(bad) == 0


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


def my_rows(m: int, mesh: Any) -> tuple[int, int]:
    """``(offset, count)`` of this rank's rows of an m-row tensor sharded ``Shard(0)`` on a 1-D mesh
    (split like ``torch.chunk``)."""
    chunk = -(-m // mesh.size())
    offset = min(mesh.get_local_rank() * chunk, m)
    return offset, min(chunk, m - offset)


def like_rows(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (a plain tensor, the same on every rank) as a DTensor sharded by rows (``Shard(0)``) on the
    1-D mesh of the DTensor ``ref``: this rank keeps its rows, no communication. Otherwise
    :func:`like`. A left projector's P (m×r, the weight's rows) lifted so, P·N of a replicated N comes
    out sharded like the weight instead of whole on every rank."""
    if not is_dtensor(ref) or is_dtensor(x) or ref.device_mesh.ndim != 1:
        return like(x, ref)
    offset, rows = my_rows(x.shape[0], ref.device_mesh)
    return DTensor.from_local(x[offset:offset + rows], ref.device_mesh, [Shard(0)], run_check=False,
                              shape=x.shape, stride=x.stride())


def row_sharded(t: Any) -> bool:
    """A DTensor sharded along dim 0 on a 1-D mesh (FSDP2's ``Shard(0)``)."""
    return is_dtensor(t) and t.device_mesh.ndim == 1 and t.placements[0].is_shard(0)


class RowShardedOperand:
    """A = G (``transposed=False``) or A = Gᵀ (``True``) of a row-sharded G (FSDP2), for the range
    finder of ``projectors.randomized_left_basis``: the products it needs, computed on this rank's
    rows and combined by all-reduces of k-column sketches, never gathering G. Every result is the
    same plain tensor on every rank (up to the order of the sums), except :meth:`rows`' pieces and
    :meth:`lift`'s DTensor, which keep G's sharding.

    With G's rows split as G₁…G_w (this rank: Gᵢ, rows ``offset`` … ``offset + mᵢ``) and X[i] the
    matching rows of an m-row X:

    * A = Gᵀ (n×m): A·X = Σ Gᵢᵀ·X[i] and A·AᵀQ = Σ Gᵢᵀ(GᵢQ) (all-reduce n×k); QᵀA = [(GᵢQ)ᵀ] stays
      split by columns, its Gram Σ (GᵢQ)ᵀ(GᵢQ) is all-reduced (k×k);
    * A = G (m×n): A·X = gather(Gᵢ·X) and A·AᵀQ = gather(Gᵢ·Σ Gⱼᵀ Q[j]) (all-reduce n×k, all-gather
      m×k); QᵀA = Σ Q[i]ᵀGᵢ (all-reduce k×n), whole on every rank.
    """

    def __init__(self, G: torch.Tensor, transposed: bool, local: torch.Tensor | None = None):
        if not row_sharded(G):
            raise ValueError("RowShardedOperand needs a DTensor sharded along dim 0 on a 1-D mesh (FSDP2)")
        self.G, self.transposed = G, transposed
        self.local = G.to_local() if local is None else local
        self.mesh, self.group = G.device_mesh, G.device_mesh.get_group()
        self.m = int(G.shape[0])
        self.offset, rows = my_rows(self.m, self.mesh)
        if self.local.shape[0] != rows:
            raise ValueError(f"a local shard of {tuple(self.local.shape)} for {tuple(G.shape)} is not "
                             "Shard(0)'s torch.chunk split")

    def _like(self, local: torch.Tensor) -> RowShardedOperand:
        return RowShardedOperand(self.G, self.transposed, local)

    @property
    def shape(self) -> tuple[int, int]:
        m, n = self.m, int(self.local.shape[1])
        return (n, m) if self.transposed else (m, n)

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, group=self.group)
        return t

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The m×k matrix whose rows ``offset`` … are this rank's ``rows`` (an all-gather of m×k)."""
        k = rows.shape[1]
        return DTensor.from_local(rows.contiguous(), self.mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size((self.m, k)), stride=(k, 1)).full_tensor()

    def _mine(self, X: torch.Tensor) -> torch.Tensor:
        return X[self.offset:self.offset + self.local.shape[0]]

    def amax(self) -> float:
        """max|A| over every rank (an all-reduce of one number)."""
        import torch.distributed as dist

        t = self.local.abs().amax().reshape(1) if self.local.numel() else self.local.new_zeros(1)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t)

    def scaled(self, s: float) -> RowShardedOperand:
        return self._like(self.local / s)

    def cast(self, dtype: torch.dtype) -> RowShardedOperand:
        return self._like(self.local.to(dtype))

    def sketch(self, X: torch.Tensor) -> torch.Tensor:
        """A·X."""
        G = self.local
        return self._sum(G.t() @ self._mine(X)) if self.transposed else self._gather(G @ X)

    def gram(self, Q: torch.Tensor) -> torch.Tensor:
        """A·(AᵀQ)."""
        G = self.local
        if self.transposed:
            return self._sum(G.t() @ (G @ Q))
        return self._gather(G @ self._sum(G.t() @ self._mine(Q)))

    def rows(self, Q: torch.Tensor) -> torch.Tensor:
        """B = QᵀA: this rank's columns of it (A = Gᵀ) or all of it (A = G)."""
        G = self.local
        return (G @ Q).t() if self.transposed else self._sum(self._mine(Q).t() @ G)

    def gram_of(self, B: torch.Tensor) -> torch.Tensor:
        """B·Bᵀ of :meth:`rows`' B."""
        return self._sum(B @ B.t()) if self.transposed else B @ B.t()

    def lift(self, X: torch.Tensor) -> torch.Tensor:
        """W·B (from :meth:`rows`' B) as a DTensor: split by columns like B (A = Gᵀ), else replicated."""
        if not self.transposed:
            return DTensor.from_local(X, self.mesh, [Replicate()], run_check=False)
        r = X.shape[0]
        return DTensor.from_local(X, self.mesh, [Shard(1)], run_check=False, shape=torch.Size((r, self.m)),
                                  stride=(self.m, 1))


_SKIP_OPS = ("wait_tensor", "_wrap_tensor_autograd")


def _first_tensor(args: Any) -> torch.Tensor | None:
    for a in args:
        if torch.is_tensor(a):
            return a
        if isinstance(a, list | tuple):
            found = _first_tensor(a)
            if found is not None:
                return found
    return None


class CollectiveLog:
    """Context manager recording every collective issued inside it — ``torch.distributed``'s own
    calls and those DTensor issues — as ``(op name, shape, bytes)`` of the tensor each rank sends
    (the first one the op gets; an all-gather's chunk). :meth:`received_bytes` is what this rank
    receives: an all-gather (w − 1)·bytes, a ring all-reduce 2(w − 1)/w·bytes, anything else bytes."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, tuple[int, ...], int]] = []

    def __enter__(self) -> CollectiveLog:
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                if any(DTensor is not None and issubclass(t, DTensor) for t in types):
                    return NotImplemented  # let DTensor run the op: its collectives come back through here
                if func.namespace in ("c10d", "_c10d_functional") and not any(s in func.name() for s in _SKIP_OPS):
                    t = _first_tensor(args)
                    if t is not None:
                        log.ops.append((func.name(), tuple(t.shape), t.numel() * t.element_size()))
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)

    def gathered_shapes(self) -> list[tuple[int, ...]]:
        """The per-rank chunk shapes of the all-gathers."""
        return [shape for name, shape, _ in self.ops if "gather" in name]

    def received_bytes(self, world: int) -> float:
        total = 0.0
        for name, _, size in self.ops:
            if "gather" in name:
                total += (world - 1) * size
            elif "reduce" in name and "scatter" not in name:
                total += 2 * (world - 1) / world * size
            else:
                total += size
        return total
