"""``rankwise train --nproc N``: the same run on N processes with FSDP2.

``--nproc N`` (N > 1) relaunches the command under ``torchrun --standalone --nproc_per_node N``.
Under torchrun (``WORLD_SIZE`` > 1) each process joins the process group (gloo on CPU, nccl on
CUDA), builds the model as one process would (same seed: same adapters and initialisation),
shards it with ``fully_shard`` on every transformer layer and the root, takes its slice of every
global batch (``--batch-size`` is the global batch), and trains; the optimizer is built after
sharding. Evaluation is split over the ranks too (each its rows, the sums added up). At the end the
weights are gathered and rank 0 alone writes the outputs. Checkpoints (``--checkpoint-every``) hold
the model and the optimizer through ``torch.distributed.checkpoint`` and each rank's loop state;
``--resume`` needs the same number of processes. ``--quantize`` is refused across processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["RankSlices", "gather_full", "minority_dtype_owners", "relaunch", "shard_model", "world"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` from torchrun's environment; ``(0, 1)`` outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``rankwise <argv>`` (without ``--nproc``) under ``torchrun`` with ``nproc`` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "rankwise", *without_nproc(argv)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(cmd, env=env, check=False).returncode


def init(device: str) -> str:
    """Join the process group; returns the device this rank trains on."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu" if device == "auto" else device


def crosses_layers(model: nn.Module) -> bool:
    """Whether an adapter's trainable tensors are read by several layers (``AdapterLayer.crosses_layers``)."""
    from ..adapters.base import AdapterLayer

    return any(isinstance(m, AdapterLayer) and m.crosses_layers for m in model.modules())


def shard_model(model: nn.Module, device: str, mesh: Any = None) -> nn.Module:
    """``fully_shard`` every repeated transformer layer, then the root, on ``mesh`` (default: a 1-D mesh of all
    ranks); only the root when an adapter's tensors cross layers (one FSDP group must hold them). FSDP2 wants
    one dtype of trainable parameters per group: a module whose trainable parameters have another dtype than
    most of its group's (a bf16 classification head beside fp32 adapters) becomes a group of its own."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..layout import layer_list, unwrap

    if mesh is None:
        mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    model.to(device)
    _, layers = layer_list(unwrap(model))
    for group in [*([] if crosses_layers(model) else layers), model]:
        for owner in minority_dtype_owners(group):
            fully_shard(owner, mesh=mesh)
        fully_shard(group, mesh=mesh)
    return model


def minority_dtype_owners(group: nn.Module) -> list[nn.Module]:
    """The modules of ``group`` (outside its parts already sharded) that directly own trainable parameters of
    another dtype than the group's main one (the dtype of most trainable elements); none when it has one."""
    from torch.distributed.fsdp import FSDPModule

    owners, stack = [], [group]
    while stack:
        module = stack.pop()
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            owners.append((module, own))
        stack.extend(c for c in module.children() if not isinstance(c, FSDPModule))
    sizes: Counter[torch.dtype] = Counter()
    for _, own in owners:
        for p in own:
            sizes[p.dtype] += p.numel()
    if len(sizes) < 2:
        return []
    main = sizes.most_common(1)[0][0]
    return [m for m, own in owners if m is not group and any(p.dtype != main for p in own)]


class RankSlices:
    """A loader whose batches are this rank's slice (rows ``rank::`` of ``tensor_split``) of the
    wrapped loader's batches; every other attribute (dataset, sampler, generator) is the loader's,
    so the order (seeded the same on every rank) and the step count are the one-process run's.
    As an evaluation loader (:meth:`eval_slices`) each rank evaluates its rows and ``rankwise.evaluate``
    adds the ranks' sums: the metrics of the whole set, computed once."""

    def __init__(self, loader: Any, rank: int, size: int):
        self.loader, self.rank, self.size = loader, rank, size

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        for batch, whole in self._slices():
            if not whole:  # a last batch smaller than the number of processes: skipped on every rank
                yield batch

    def eval_slices(self) -> Iterator[tuple[Any, bool]]:
        """``(batch, counted)`` for ``rankwise.evaluate``: this rank's rows of every batch, counted; a batch
        with fewer rows than processes whole on every rank (each forward is collective under FSDP2), counted on
        rank 0 only. The ranks' sums are added up afterwards: every row counts once."""
        for batch, whole in self._slices():
            yield batch, not whole or self.rank == 0

    def _slices(self) -> Iterator[tuple[Any, bool]]:
        """``(this rank's slice, False)`` per batch, or ``(the whole batch, True)`` when it has fewer rows than
        processes."""
        for batch in self.loader:
            rows = next((len(v) for v in batch.values() if torch.is_tensor(v)), None)
            if rows is not None and rows < self.size:
                yield batch, True
            else:
                yield {k: (v.tensor_split(self.size)[self.rank] if torch.is_tensor(v) else v)
                       for k, v in batch.items()}, False


@torch.no_grad()
def gather_full(model: nn.Module) -> None:
    """Replace every DTensor parameter and buffer by its full tensor (a collective: every rank calls
    it), so the model can be saved as one process would; FSDP's hooks are not usable afterwards."""
    from torch.distributed.fsdp import FSDPModule

    from ..optim.sharding import full, is_dtensor

    for module in model.modules():  # an evaluation's forward can leave the root unsharded
        if isinstance(module, FSDPModule):
            module.reshard()
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and is_dtensor(p):
                module._parameters[name] = nn.Parameter(full(p.detach()).clone(), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and is_dtensor(b):
                module._buffers[name] = full(b).clone()
