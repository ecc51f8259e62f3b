"""Distributed checkpoints of rankwise optimizers with ``torch.distributed.checkpoint`` (DCP).

``save(model, optimizer, path)`` / ``load(model, optimizer, path)`` write and read model +
optimizer with DCP: every rank writes its shards, a checkpoint saved at one world size loads at
another (DCP reshards the DTensors; projector bases and seeds are plain tensors, the same on every
rank, saved once), and a plain (unsharded) model loads a checkpoint written under FSDP2 and back.

Why not only torch's ``get_state_dict`` / ``set_state_dict``: they keep the optimizer's ``state``
and ``param_groups`` and drop every other entry — the block samplers' ``"sampler"`` (step, awake
blocks, order, RNG), ``GuardedOptimizer``'s ``"guard"`` — and DCP loads into a *template* whose
keys must be those of the checkpoint, while a sampler's state holds only its awake blocks (which
differ between a fresh sampler and the saved one). Here:

* the optimizer state dict is ``optimizer.state_dict()`` with parameter names for keys (what DCP
  reshards by), and its other entries are saved as one serialized blob (``"optim_extra"``);
* ``load`` reads that blob first and hands it to the optimizer (a sampler wakes the saved blocks),
  then builds the template from the optimizer's own state (a zero-gradient, lr=0 step on the awake
  parameters when the state is empty, as DCP does, without moving a sampler's schedule) and loads
  the rest; the optimizer's ``load_state_dict`` gets the whole state dict back.

Plain projected optimizers also work with torch's ``get_state_dict`` / ``set_state_dict`` (see
``docs/distributed.md``); these two functions work for every ``rankwise.optim`` optimizer.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["check_model_fits", "load", "load_model_tensors", "model_shapes", "optimizer_state_dict", "save"]

_MAIN = ("state", "param_groups")
_MODEL = "model."  # DCP flattens the nested ``{"model": {name: tensor}}`` to ``"model.<name>"`` keys


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}


def _check_supported(optimizer: Optimizer) -> None:
    from .layerwise import LayerwiseOptimizer

    if isinstance(optimizer, LayerwiseOptimizer):
        raise ValueError(
            "LayerwiseOptimizer keeps one optimizer per parameter (state_dict()['optimizers']); "
            "checkpoint it with its own state_dict() — rankwise.optim.checkpoint handles one optimizer"
        )


def optimizer_state_dict(model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with the model's parameter names as keys (in ``state`` and in each
    group's ``params``; an empty state left out); every other entry (a sampler's ``"sampler"``) is kept.
    No step is run."""
    _check_supported(optimizer)
    osd = optimizer.state_dict()
    names = _names(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    keys = [k for g in osd["param_groups"] for k in g["params"]]
    if len(keys) != len(params):
        raise ValueError(f"optimizer.state_dict() lists {len(keys)} parameters, its param_groups {len(params)}")
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"{len(missing)} optimizer parameters are not parameters of the model")
    to_name = {k: names[id(p)] for k, p in zip(keys, params, strict=True)}
    out = {k: v for k, v in osd.items() if k not in _MAIN}
    # an emptied state (``optimizer.state[p].clear()``: SST's resampling, a controller's reset) is no state —
    # the next step re-creates it either way — and has no tensors for DCP to save, so it is left out
    out["state"] = {to_name[k]: v for k, v in osd["state"].items() if v}
    out["param_groups"] = [{**g, "params": [to_name[k] for k in g["params"]]} for g in osd["param_groups"]]
    return out


def _blob(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _unblob(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def _split(osd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return {k: osd[k] for k in _MAIN}, {k: v for k, v in osd.items() if k not in _MAIN}


def save(model: nn.Module, optimizer: Optimizer, checkpoint_id: str, **extra: Any) -> None:
    """``torch.distributed.checkpoint.save`` of the model (``get_model_state_dict``: parameter names,
    DTensor shards) and the optimizer (:func:`optimizer_state_dict`); ``extra`` entries (a step
    counter, an LR scheduler's state dict) are saved beside them. Call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    main, rest = _split(optimizer_state_dict(model, optimizer))
    meta = {"entries": rest, "stateful": sorted(main["state"])}
    state = {"model": get_model_state_dict(model), "optim": main, "optim_extra": _blob(meta)}
    if extra:
        state["extra"] = _blob(extra)
    dcp.save(state, checkpoint_id=checkpoint_id)


def _stepper(optimizer: Optimizer) -> Optimizer:
    """The optimizer a priming step runs: a sampler's inner optimizer (its schedule must not move)."""
    from .blocks import _SampledBlocks

    target = getattr(optimizer, "optimizer", optimizer)  # GuardedOptimizer wraps one optimizer
    if isinstance(target, _SampledBlocks):
        assert target._inner is not None
        return target._inner
    return optimizer


@torch.no_grad()
def _prime(optimizer: Optimizer, wanted_params: list[torch.Tensor]) -> None:
    """Create the state of ``wanted_params`` (and only theirs) with the structure a step creates: zero
    gradients, lr 0, one step (torch.distributed.checkpoint's ``_init_optim_state``), of a sampler's inner
    optimizer. Every parameter the step visits gets the zero gradient, not only the wanted ones: a pair
    optimizer (LoRA-Pro, RiemannLoRA) keeps a pair's state on A but steps the pair only when B has a
    gradient too; the other states are dropped afterwards."""
    stepper = _stepper(optimizer)
    wanted = {id(p) for p in wanted_params}
    visited = [q for g in stepper.param_groups for q in g["params"]]
    params = list({id(p): p for p in [*wanted_params, *visited]}.values())
    if any(p.grad is not None for p in params):
        raise ValueError("load() needs an optimizer whose parameters hold no gradient; call zero_grad() first")
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in stepper.param_groups]
    for g in stepper.param_groups:
        g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
    try:
        stepper.step()
    finally:
        for g, lr in zip(stepper.param_groups, lrs, strict=True):
            g["lr"] = lr
        for p in params:
            p.grad = None
    for p in list(optimizer.state):  # the projected engine writes a seed for every awake parameter
        if id(p) not in wanted:
            del optimizer.state[p]


def model_shapes(checkpoint_id: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """``{name: (global shape, dtype)}`` of every model tensor :func:`save` wrote (read from the
    checkpoint's metadata; no tensor data is read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    return {k[len(_MODEL):]: (v.size, v.properties.dtype) for k, v in meta.items()
            if k.startswith(_MODEL) and isinstance(v, TensorStorageMetadata)}


def load_model_tensors(checkpoint_id: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The saved model tensors ``names``, whole (plain tensors, the same on every rank). Call on every rank."""
    import torch.distributed.checkpoint as dcp

    shapes = model_shapes(checkpoint_id)
    state = {"model": {n: torch.empty(shapes[n][0], dtype=shapes[n][1]) for n in names}}
    if names:
        dcp.load(state, checkpoint_id=checkpoint_id)
    return state["model"]


def check_model_fits(model_state: dict[str, Any], checkpoint_id: str, hint: str = "") -> None:
    """ValueError naming the tensors of ``model_state`` (a model state dict, DTensors by their global
    shape; other entries are not compared) that the checkpoint lacks, that it holds and the model
    lacks, or whose shape differs. DCP alone raises a ``CheckpointException`` from inside its planner
    for a shape or a missing name, and ignores a saved tensor the model lacks."""
    saved = model_shapes(checkpoint_id)
    model_state = {n: t for n, t in model_state.items() if torch.is_tensor(t)}  # not a module's extra state
    missing, unexpected = sorted(set(model_state) - set(saved)), sorted(set(saved) - set(model_state))
    wrong = [f"{n}: {tuple(saved[n][0])} in the checkpoint, {tuple(t.shape)} in the model"
             for n, t in model_state.items() if n in saved and tuple(t.shape) != tuple(saved[n][0])]
    if missing or unexpected or wrong:
        raise ValueError(
            f"the model does not fit the checkpoint {checkpoint_id}"
            + (f"; shapes differ: {'; '.join(wrong[:3])}" if wrong else "")
            + (f"; not in the checkpoint: {missing[:3]}" if missing else "")
            + (f"; only in the checkpoint: {unexpected[:3]}" if unexpected else "") + hint
        )


def load(model: nn.Module, optimizer: Optimizer, checkpoint_id: str, hint: str = "") -> dict[str, Any]:
    """Load what :func:`save` wrote into ``model`` and ``optimizer`` (built as for the saved run, at
    any world size, sharded or not); returns the ``extra`` entries. Call on every rank. A model whose
    tensors differ from the saved ones (names or shapes) is a ValueError naming them, ``hint`` appended,
    before anything is loaded (:func:`check_model_fits`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    _check_supported(optimizer)
    check_model_fits(get_model_state_dict(model), checkpoint_id, hint)
    head: dict[str, Any] = {"optim_extra": b""}
    dcp.load(head, checkpoint_id=checkpoint_id)
    meta = _unblob(head["optim_extra"])
    entries, stateful = meta["entries"], list(meta["stateful"])
    current = optimizer_state_dict(model, optimizer)
    if entries:  # a sampler wakes the saved blocks (its state is loaded below)
        optimizer.load_state_dict(_to_positions(optimizer, {"state": {}, "param_groups": current["param_groups"],
                                                            **entries}))
    for st in list(optimizer.state):
        del optimizer.state[st]
    if stateful:  # the template: state for exactly the saved parameters
        by_name = dict(model.named_parameters(remove_duplicate=False))
        _prime(optimizer, [by_name[n] for n in stateful if n in by_name])
    main, _ = _split(optimizer_state_dict(model, optimizer))
    if sorted(main["state"]) != stateful:
        have, want = set(main["state"]), set(stateful)
        raise ValueError(
            "the optimizer does not fit the checkpoint: state for "
            f"{sorted(want - have)[:3]} saved but not created here, {sorted(have - want)[:3]} created but not saved; "
            "build the same optimizer (method, options, parameters) as the saved run"
        )
    state = {"model": get_model_state_dict(model), "optim": main}
    extra = "extra" in dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    if extra:
        state["extra"] = b""
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_model_state_dict(model, state["model"])
    optimizer.load_state_dict(_to_positions(optimizer, {**state["optim"], **entries}))
    return _unblob(state["extra"]) if extra else {}


def _to_positions(optimizer: Optimizer, osd: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed state dict keyed by position again (the keys ``Optimizer.state_dict`` writes),
    so any ``load_state_dict`` (torch's own included) pairs it with the parameters."""
    names = [k for g in osd["param_groups"] for k in g["params"]]
    pos = {name: i for i, name in enumerate(names)}
    groups, i = [], 0
    for g in osd["param_groups"]:
        groups.append({**g, "params": list(range(i, i + len(g["params"])))})
        i += len(g["params"])
    out = {k: v for k, v in osd.items() if k not in _MAIN}
    out["state"] = {pos[k]: v for k, v in osd["state"].items()}
    out["param_groups"] = groups
    return out
