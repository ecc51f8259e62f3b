"""Checkpoints of the training loop: RNG states, trained tensors, and the checkpoint directories.

A checkpoint holds everything an exact resume needs: the trained tensors (safetensors), the optimizer
and scheduler state, the position (step, epoch, batch in epoch), every RNG state (torch, CUDA, numpy,
python, and the DataLoader's generators at the start of the epoch), the callbacks' state and the
history so far. Directories are written atomically (:func:`rankwise.io.atomic_directory`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .callbacks import TrainState
from .checks import tensors_fit
from .io import TMP_TAG, atomic_directory, save_tensors, write_errors, write_json

__all__ = [
    "CHECKPOINT_PREFIX", "UnreadableCheckpoint", "all_ranks", "checkpoints", "config_changes", "find_checkpoint",
    "load_checkpoint", "load_sharded", "load_trained_tensors", "loader_generators", "prune_checkpoints",
    "read_checkpoint", "rng_state", "save_checkpoint", "seed_everything", "set_rng_state", "sharded_tensors",
    "trained_tensors", "world",
]

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
TENSORS_FILE = "trained_tensors.safetensors"
INFO_FILE = "trainer_state.json"
DCP_DIR = "dcp"  # model + optimizer of a checkpoint written under torch.distributed


# ----------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The distinct torch.Generators that decide a DataLoader's order (its own and its sampler's)."""
    gens: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    return gens


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global RNG state now: torch, CUDA (on a GPU device), numpy and python."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore the RNG states captured by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    npst = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
        "has_gauss": npst["has_gauss"],
        "gauss": npst["gauss"],
    })
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ----------------------------------------------------------------------------- trained tensors
def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter and every persistent buffer, by state_dict name.

    With full fine-tuning this is the whole model state; with adapters it is the adapter tensors,
    the trained heads and the buffers (adapter masks or ranks a controller may change).
    """
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    buffers = {id(b) for b in model.buffers()}
    return {
        k: v for k, v in model.state_dict(keep_vars=True).items()
        if id(v) in trainable or id(v) in buffers
    }


def load_trained_tensors(model: nn.Module, checkpoint: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Copy the trained tensors saved in ``checkpoint`` (or ``tensors`` read from it) into the model's.

    The names must match exactly, and every tensor its model tensor (:func:`rankwise.checks.tensor_fits`:
    exact shape, floating dtype, finite values); nothing is copied unless all of them fit.
    """
    if tensors is None:
        tensors = load_file(str(checkpoint / TENSORS_FILE))
    expected = trained_tensors(model)
    tensors_fit(tensors, expected, "checkpoint", f" ({checkpoint}; build it exactly as for the first run)")
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t)


# ----------------------------------------------------------------------------- checkpoint directories
def world() -> tuple[int, int]:
    """``(rank, world size)`` of the ``torch.distributed`` process group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_file(rank: int) -> str:
    """The loop state file of ``rank`` in a checkpoint written under ``torch.distributed``."""
    return STATE_FILE if rank == 0 else f"trainer_state.rank{rank}.pt"


def save_checkpoint(path: str | Path, state: TrainState, rng: dict[str, Any], loader_states: list[torch.Tensor],
                    history: list, evals: list, elapsed: float, callbacks: Sequence[Any]) -> Path:
    """Write one checkpoint directory atomically (a crash mid-write leaves no partial checkpoint).

    Under ``torch.distributed`` (world size > 1; every rank calls it) the model and the optimizer go
    through ``torch.distributed.checkpoint`` (``rankwise.optim.checkpoint``: every rank writes its
    shards into ``dcp/``) and every rank writes its own loop state (RNG, loader, callbacks, history;
    rank 0's is ``trainer_state.pt``, rank r's ``trainer_state.rank<r>.pt``), all into rank 0's
    temporary directory, which rank 0 fsyncs and renames once every rank has written."""
    payload = {
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "total_steps": state.total_steps,
        "scheduler": state.scheduler.state_dict(),
        "grad_scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "rng": rng,
        "loader_generators": loader_states,
        "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in callbacks],
        "history": history,
        "evals": evals,
        "elapsed": elapsed,
    }
    info = {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
            "config": state.config.to_dict()}
    rank, size = world()
    if size > 1:
        return _save_distributed(Path(path), state, {**payload, "world_size": size}, info, rank, size)
    with atomic_directory(path) as tmp:
        save_tensors({k: v.detach() for k, v in trained_tensors(state.model).items()}, tmp / TENSORS_FILE)
        with write_errors(path):  # a full disk: torch's "enforce fail at inline_container.cc ..."
            torch.save({**payload, "optimizer": state.optimizer.state_dict()}, tmp / STATE_FILE)
        write_json(tmp / INFO_FILE, info)
    return Path(path)


def _save_distributed(path: Path, state: TrainState, payload: dict[str, Any], info: dict[str, Any], rank: int,
                      size: int) -> Path:
    """:func:`save_checkpoint` under ``torch.distributed``: rank 0 owns the temporary directory."""
    import torch.distributed as dist

    from .optim import checkpoint as dcp

    with atomic_directory(path) if rank == 0 else contextlib.nullcontext() as tmp:
        where: list[str] = [str(tmp) if rank == 0 else ""]
        dist.broadcast_object_list(where, src=0)  # rank 0's temporary directory, to every rank
        tmp = Path(where[0])
        dcp.save(state.model, state.optimizer, str(tmp / DCP_DIR))
        with write_errors(path):
            torch.save(payload, tmp / _rank_file(rank))
        if rank == 0:
            write_json(tmp / INFO_FILE, {**info, "world_size": size})
        dist.barrier()  # every rank has written before rank 0 fsyncs and renames
    dist.barrier()  # the checkpoint is in place when any rank goes on
    return path


#: How a model is made to fit a checkpoint of a run whose ranks changed (said by every shape error of a resume).
RESHAPE_HINT = ("; a run whose ranks changed while training (IncreLoRA, ElaLoRA, Cuttlefish) is resized to the "
                "checkpoint's shapes by its callbacks' before_load: build the model as for the first run, and under "
                "FSDP2 resize it before fully_shard with rankwise.train.reshape_for_resume "
                "(rankwise train --nproc does)")


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the model and the optimizer of a checkpoint written under ``torch.distributed`` (every rank);
    a model whose tensors differ from the saved ones (names, shapes) is a ValueError naming them."""
    from .optim import checkpoint as dcp

    dcp.load(model, optimizer, str(path / DCP_DIR), RESHAPE_HINT)


def sharded_tensors(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """What a resume hands the callbacks' ``before_load`` for a checkpoint written under
    ``torch.distributed``: every model tensor in its ``dcp/`` by name, ``model``'s buffers with their
    saved values (a layer's rank counter), the others as ``meta`` tensors of the saved shape and dtype
    (only the metadata is read). Call on every rank."""
    from .optim import checkpoint as dcp

    where = str(path / DCP_DIR)
    shapes = dcp.model_shapes(where)
    buffers = dcp.load_model_tensors(where, sorted({n for n, _ in model.named_buffers()} & set(shapes)))
    return {n: buffers[n] if n in buffers else torch.empty(shape, dtype=dtype, device="meta")
            for n, (shape, dtype) in shapes.items()}


def all_ranks(flag: bool) -> bool:
    """``flag`` and the same on every rank (one rank's False makes it False everywhere)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return flag
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, flag)
    return all(flags)


def _number(path: Path) -> int:
    """N of a ``checkpoint-N`` directory name (-1 for other names)."""
    tail = path.name[len(CHECKPOINT_PREFIX):]
    return int(tail) if tail.isdigit() else -1


def checkpoints(path: str | Path) -> list[Path]:
    """``path`` itself when it is a checkpoint, else its ``checkpoint-N`` directories (directly or under
    checkpoints/), newest first; FileNotFoundError when there is none."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return [path]
    for root in (path, path / "checkpoints"):
        found = sorted(
            (p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if _number(p) >= 0 and (p / STATE_FILE).is_file()),
            key=_number, reverse=True,
        )
        if found:
            return found
    raise FileNotFoundError(f"resume_from={str(path)!r}: no checkpoint ({STATE_FILE}) found there")


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint, else its newest ``checkpoint-N`` (directly or under checkpoints/)."""
    return checkpoints(path)[0]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The loop state saved in checkpoint directory ``path`` (tensors on CPU); this rank's own in a
    checkpoint written under ``torch.distributed``."""
    name = _rank_file(world()[0]) if (path / DCP_DIR).is_dir() else STATE_FILE
    return torch.load(path / name, map_location="cpu", weights_only=True)


class UnreadableCheckpoint(ValueError):
    """A checkpoint whose files cannot be read (zero-length, truncated or corrupt)."""


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(loop state, trained tensors, recorded config)`` of checkpoint ``path``, all read before any of
    it is used; :class:`UnreadableCheckpoint` naming the file that cannot be read. A checkpoint written
    under ``torch.distributed`` gives this rank's loop state and no tensors (they are in ``dcp/``:
    :func:`load_sharded`)."""
    sharded = (path / DCP_DIR).is_dir()
    size = world()[1]
    files = [(INFO_FILE, lambda: json.loads((path / INFO_FILE).read_text())),
             (_rank_file(world()[0]) if sharded else STATE_FILE, lambda: load_checkpoint(path))]
    if not sharded:
        files.append((TENSORS_FILE, lambda: load_file(str(path / TENSORS_FILE))))
    parts: list[Any] = []
    for name, read in files:
        try:
            if (path / name).stat().st_size == 0:
                raise ValueError("zero-length file")
            parts.append(read())
        except Exception as e:  # noqa: BLE001  any failure to read or parse the file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UnreadableCheckpoint(f"{path / name}: {reason}") from None
        if name == INFO_FILE and isinstance(parts[0], dict):
            saved = int(parts[0].get("world_size", 1)) if sharded else 1
            if saved != size:
                raise ValueError(f"resume_from: {path} was written by {saved} process(es) and this run has {size}; "
                                 f"resume it with the same number of processes (--nproc {saved})")
    info, payload, *rest = parts
    tensors = rest[0] if rest else {}
    if not isinstance(payload, dict) or not isinstance(info, dict):
        raise UnreadableCheckpoint(f"{path}: not a rankwise checkpoint")
    return payload, tensors, info.get("config") or {}


#: TrainConfig fields that never change what is trained: they may differ on resume.
FREE_KEYS = ("progress", "log_every", "measure_memory", "eval_every", "eval_max_batches", "checkpoint_every",
             "keep_checkpoints", "output_dir", "device", "gradient_checkpointing")
#: Fields that may grow on resume without being allowed (the run is continued for longer).
GROW_KEYS = ("max_steps", "epochs")
#: Fields a resume cannot change even when allowed: the optimizer state is restored as it was saved.
FIXED_KEYS = ("optimizer", "optimizer_kwargs")


def config_changes(old: dict[str, Any], new: dict[str, Any], allow: Iterable[str] = (),
                   free: Iterable[str] = FREE_KEYS, fixed: Iterable[str] = FIXED_KEYS) -> list[str]:
    """The settings that differ between the ``old`` and ``new`` run configs and are not allowed to:
    ``"key: old -> new"`` for each. ``free`` keys may always differ, :data:`GROW_KEYS` may grow, the
    ``allow`` keys may change, the ``fixed`` keys never."""
    allow, free, fixed = set(allow), set(free), set(fixed)
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key in free or a == b:
            continue
        grows = key in GROW_KEYS and isinstance(a, int) and isinstance(b, int) and b > a
        if key in fixed:
            out.append(f"{key}: {a!r} -> {b!r} (cannot change on resume)")
        elif not grows and key not in allow:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def prune_checkpoints(root: Path, keep: int | None) -> None:
    """Delete all but the ``keep`` newest ``checkpoint-N`` directories under ``root`` (None: keep all)."""
    if keep is None:
        return
    ckpts = sorted((p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if _number(p) >= 0 and p.is_dir()), key=_number)
    for old in ckpts[:-keep]:  # renamed aside first: a kill mid-delete leaves no half checkpoint-N
        aside = old.with_name(f".{old.name}{TMP_TAG}{os.getpid()}-pruned")
        os.replace(old, aside)
        shutil.rmtree(aside, ignore_errors=True)
