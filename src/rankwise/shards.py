"""Parameters sharded by FSDP2 (``fully_shard``) as the rank controllers need them.

Under FSDP2 a parameter is a ``DTensor`` sharded along dim 0 (each rank holds a ``torch.chunk`` of its
rows) and its gradient is the reduced mean over the ranks, sharded alike. A controller that scores,
masks, prunes or grows a factor reads the few tensors it needs whole (:func:`full`, one all-gather),
computes exactly as on one process, and writes back only this rank's rows (:func:`write_full_`, no
communication). A statistic a hook takes inside the forward / backward (where FSDP2 hands the module
the gathered parameter and this rank's local-batch gradient) is averaged over the ranks
(:func:`average_over_ranks_`) as FSDP2 averages the gradients.

A factor whose *shape* changes (a rank grown or pruned, a dense weight factorized) cannot be resized in
place: FSDP2 fixes each parameter's padded shard when ``fully_shard`` runs. :func:`set_parameter`
re-shards it: the parameter's entry in its FSDP2 parameter group is rebuilt from the new full tensor,
exactly as ``fully_shard`` builds it, while the group is resharded (between steps), and the
``nn.Parameter`` object is kept (so the optimizer's references and state keys stay valid).
:func:`shard_replacement` moves a module's place in its group to the module that replaces it (a dense
layer factorized into U, V). These use FSDP2's parameter-group internals (``FSDPParam``), which torch
does not expose publicly (``fully_shard`` cannot be applied to a module twice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

try:  # torch.distributed may be absent from a build
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - builds without torch.distributed
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]

__all__ = ["average_over_ranks_", "backward_full", "editing", "full", "gather_rows", "gradients", "is_dtensor",
           "mesh_of", "require_resharding", "set_parameter", "shard_added", "shard_like",
           "shard_replacement", "sharded", "sum_over_ranks_", "write_full_"]


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The full (gathered) plain tensor of a DTensor; a plain tensor is returned as is."""
    return t.full_tensor() if is_dtensor(t) else t


def sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2 sharded it)."""
    return any(is_dtensor(p) for p in model.parameters())


def shard_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (a plain full tensor, the same on every rank) laid out like the DTensor ``ref`` (this rank's
    ``torch.chunk`` of it, no communication); ``x`` itself when ``ref`` is plain."""
    if not is_dtensor(ref):
        return x
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(x, ref.device_mesh, ref.placements, src_data_rank=None)


@torch.no_grad()
def write_full_(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p ← value`` for a full ``value`` of ``p``'s shape: a DTensor keeps only its own rows of it (a DTensor
    ``value`` is copied as DTensors copy)."""
    if is_dtensor(p) and not is_dtensor(value):
        p.to_local().copy_(shard_like(value.to(p.dtype), p).to_local())
    else:
        p.copy_(value)


@contextlib.contextmanager
def editing(p: torch.Tensor) -> Iterator[torch.Tensor]:
    """``with editing(p) as v:`` edit ``p``'s full tensor ``v`` in place (a plain ``p``: ``v`` is ``p`` itself;
    a DTensor: its gathered copy, whose rows this rank holds are written back on exit)."""
    with torch.no_grad():
        v = full(p.detach())
        yield v
        if is_dtensor(p):
            write_full_(p, v)


def backward_full(fn: Callable[..., torch.Tensor], params: Sequence[torch.Tensor],
                  weight: float = 1.0) -> torch.Tensor:
    """Add ``weight``·∇ fn(*params) to the parameters' gradients and return fn's (detached) value. On DTensors
    fn runs on their full tensors (gathered) and each parameter's gradient gets this rank's rows of the result,
    so a regularizer over whole factors (AdaLoRA's orthogonality) is exact under FSDP2."""
    if not any(is_dtensor(p) for p in params):
        out = fn(*params)
        (out * weight).backward()
        return out.detach()
    fulls = [full(p.detach()).requires_grad_(p.requires_grad) for p in params]
    out = fn(*fulls)
    grads = torch.autograd.grad(out * weight, [f for f in fulls if f.requires_grad], allow_unused=True)
    for p, g in zip([p for p in params if p.requires_grad], grads, strict=True):
        if g is None:
            continue
        g = shard_like(g, p)
        p.grad = g if p.grad is None else p.grad + g
    return out.detach()


def gradients(loss: torch.Tensor, params: Sequence[torch.Tensor], model: nn.Module) -> list[torch.Tensor | None]:
    """∂loss/∂params, leaving every gradient of ``model`` as it was (a second loss in the same step: a
    validation batch). Plain parameters: ``torch.autograd.grad``. FSDP2 hands gradients to its sharded
    parameters through its own backward hooks, not autograd (``autograd.grad`` w.r.t. them finds nothing),
    so there it is a second ``backward()`` with the model's gradients set aside and restored; the result is
    FSDP2's mean over the ranks (the gradient itself when every rank takes the same batch)."""
    if not any(is_dtensor(p) for p in params):
        return list(torch.autograd.grad(loss, list(params), allow_unused=True))
    trained = [p for p in model.parameters() if p.requires_grad]
    kept = [p.grad for p in trained]
    for p in trained:
        p.grad = None
    loss.backward()
    out = [p.grad for p in params]
    for p, g in zip(trained, kept, strict=True):
        p.grad = g
    return out


@torch.no_grad()
def sum_over_ranks_(t: torch.Tensor, mesh: Any) -> torch.Tensor:
    """``t`` ← its sum over the ranks of the device ``mesh``, in place (``mesh`` None: unchanged)."""
    if mesh is not None:
        for dim in range(mesh.ndim):
            dist.all_reduce(t, group=mesh.get_group(dim))
    return t


@torch.no_grad()
def average_over_ranks_(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` ← its mean over the ranks of ``ref``'s mesh, in place, when ``ref`` is a DTensor (FSDP2's
    gradient reduction, for a statistic of this rank's local batch); unchanged otherwise."""
    if is_dtensor(ref):
        sum_over_ranks_(t, ref.device_mesh).div_(ref.device_mesh.size())
    return t


def gather_rows(t: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The rows of ``t`` (a statistic of this rank's slice of the batch, e.g. its logits) from every rank of
    ``model``'s FSDP2 mesh, concatenated in rank order, for a loss term over the whole batch (an SVD of its
    outputs); differentiable: the backward sums the ranks' gradients (each rank takes the same term, and FSDP2's
    mean of the gradients is then the term's gradient). ``t`` itself when ``model`` is not sharded."""
    mesh = next((mesh_of(p) for p in model.parameters() if is_dtensor(p)), None)
    if mesh is None:
        return t
    if mesh.ndim != 1:
        raise NotImplementedError(f"gather_rows over a {mesh.ndim}-D device mesh (only 1-D, FSDP2's data parallel)")
    from torch.distributed.nn.functional import all_gather

    group = mesh.get_group(0)
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(mesh.size())]
    dist.all_gather(counts, torch.tensor([t.shape[0]]), group=group)
    rows = [int(c) for c in counts]
    padded = torch.cat([t, t.new_zeros(max(rows) - t.shape[0], *t.shape[1:])]) if max(rows) > t.shape[0] else t
    return torch.cat([g[:n] for g, n in zip(all_gather(padded, group=group), rows, strict=True)])


def mesh_of(t: torch.Tensor) -> Any:
    """The device mesh of a DTensor (None for a plain tensor)."""
    return t.device_mesh if is_dtensor(t) else None


def require_resharding(model: nn.Module, method: str) -> None:
    """At the setup of a controller that changes parameter shapes: when ``model`` is FSDP2-sharded, the
    FSDP2 internals :func:`set_parameter` / :func:`shard_replacement` rebuild must be there (as in torch
    2.13); otherwise a RuntimeError naming ``method`` and why, before any step (not a DTensor traceback
    at its first rank change)."""
    if not sharded(model):
        return
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState  # noqa: F401
        from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam, ParamModuleInfo, ShardedState  # noqa: F401

        groups = _groups(model)
        fields = ("fsdp_params", "mesh_info", "post_forward_mesh_info", "mp_policy", "offload_policy",
                  "_sharded_state", "_training_state", "_module_to_pre_save_state_dict_hook_handle")
        ok = bool(groups) and all(hasattr(g, f) for g in groups for f in fields)
    except (ImportError, AttributeError):
        ok = False
    if not ok:
        raise RuntimeError(
            f"{method} changes parameter shapes while it trains; under FSDP2 rankwise re-shards such a parameter "
            f"by rebuilding its entry in FSDP2's parameter group (torch has no public API for it), and this torch "
            f"({torch.__version__}) does not have the internals rankwise uses (checked with torch 2.13): train "
            f"{method} without FSDP2, or with a torch whose FSDP2 matches")


def _groups(model: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [g for m in model.modules() if isinstance(m, FSDPModule) for g in m._get_fsdp_state()._fsdp_param_groups]


def _entry(model: nn.Module, module: nn.Module, name: str) -> tuple[Any, int]:
    for group in _groups(model):
        for i, fp in enumerate(group.fsdp_params):
            if fp._module_info.module is module and fp._module_info.param_name == name:
                return group, i
    raise ValueError(f"parameter {name!r} of {type(module).__name__} is not managed by an FSDP2 group of the model")


def _build(group: Any, module: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> Any:
    """A fresh FSDP2 entry for ``module.name`` = ``value`` (full), sharded as ``fully_shard`` shards it,
    and registered on ``module`` (its sharded DTensor)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam, ParamModuleInfo, ShardedState

    if group._sharded_state != ShardedState.SHARDED or group._training_state != TrainingState.IDLE:
        raise RuntimeError("an FSDP2 parameter can be re-sharded only between steps (its group resharded and idle)")
    param = nn.Parameter(value.detach().clone().contiguous(), requires_grad=requires_grad)
    fp = FSDPParam(param, ParamModuleInfo(module, name), group.mesh_info, group.post_forward_mesh_info, group.device,
                   None, group.mp_policy, group.offload_policy)
    fp.init_dtype_attrs(group.mp_policy)
    return fp


@torch.no_grad()
def set_parameter(model: nn.Module, module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Give ``module.name`` the full tensor ``value`` (any shape), keeping the ``nn.Parameter`` object. A
    plain parameter takes it as its ``.data``; an FSDP2-sharded one (a DTensor managed by a parameter group
    of ``model``) is re-sharded: its group entry is rebuilt for the new shape (this rank keeps its rows) and
    the new sharded tensor is swapped into the old object. Its gradient is dropped."""
    p = getattr(module, name)
    if not is_dtensor(p):
        p.data = value.to(p.dtype)
        p.grad = None
        return
    group, i = _entry(model, module, name)
    old = group.fsdp_params[i]
    if old.fsdp_placement != Shard(0):
        raise NotImplementedError(f"re-sharding {name!r} placed {old.fsdp_placement} (only Shard(0))")
    fp = _build(group, module, name, value.to(p.dtype), p.requires_grad)
    p.grad = None
    _adopt(fp, p)  # p holds the new shards; the optimizer keeps p
    fp._param_fqn = old._param_fqn
    old._post_load_hook_handle.remove()
    group.fsdp_params[i] = fp


def _adopt(fp: Any, p: nn.Parameter) -> None:
    """The existing Parameter object ``p`` takes FSDP2 entry ``fp``'s new sharded tensor and becomes that entry's
    parameter on its modules (references to ``p``, the optimizer's included, stay valid)."""
    torch.utils.swap_tensors(p, fp.sharded_param)
    fp.sharded_param = p
    fp._setattr_on_modules(p)


def _join(group: Any, module: nn.Module, name: str, keep: nn.Parameter | None = None) -> nn.Parameter:
    """``module.name`` (a plain, full parameter) joins FSDP2 ``group``, sharded as ``fully_shard`` shards it;
    ``keep`` (an existing Parameter object) receives the sharded tensor, so the optimizer keeps that object."""
    value = getattr(module, name)
    fp = _build(group, module, name, value.detach(), value.requires_grad)
    if keep is not None:
        _adopt(fp, keep)
    fp._param_fqn = name
    group.fsdp_params.append(fp)
    return fp.sharded_param


@torch.no_grad()
def shard_added(model: nn.Module, near: nn.Module, module: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """Parameters ``names`` just added to ``module`` (plain, full: a lazy adapter, LoRA put on a trained layer)
    join the FSDP2 parameter group that holds ``near``'s parameters when those are sharded, sharded as
    ``fully_shard`` shards them. Returns the parameters now registered on ``module`` (give those to the
    optimizer); unsharded: ``module``'s own, unchanged."""
    if is_dtensor(next(near.parameters())):
        group, _ = _entry(model, near, next(n for n, _ in near.named_parameters()))
        for name in names:
            _join(group, module, name)
    return [getattr(module, name) for name in names]


@torch.no_grad()
def shard_replacement(model: nn.Module, old: nn.Module, new: nn.Module, keep: dict[str, nn.Parameter]) -> None:
    """Before ``new`` takes ``old``'s place in ``model``: when ``old``'s parameters are FSDP2-sharded, every
    parameter of ``new`` (plain, full) joins the parameter group that held ``old``'s, sharded as
    ``fully_shard`` shards it, and ``old``'s entries leave it; ``keep[name]`` (a parameter of ``old``, e.g.
    a bias that carries on) receives ``new.name``'s sharded tensor, so the optimizer keeps that object and
    its state. Unsharded: ``new.name = keep[name]``."""
    first = next(old.parameters())
    if not is_dtensor(first):
        for name, p in keep.items():
            setattr(new, name, p)
        return
    group, _ = _entry(model, old, next(n for n, q in old.named_parameters() if q is first))
    for name, _ in list(new.named_parameters(recurse=False)):
        _join(group, new, name, keep.get(name))
    for fp in [fp for fp in group.fsdp_params if fp._module_info.module is old]:
        group.fsdp_params.remove(fp)
        fp._post_load_hook_handle.remove()
    save, load = group._module_to_pre_save_state_dict_hook_handle, group._module_to_pre_load_state_dict_hook_handle
    if old in save:  # FSDP2 reshards a group before a state dict is taken from a module it manages
        save.pop(old).remove()
        load.pop(old).remove()
        save[new] = new.register_state_dict_pre_hook(lambda *a, **k: group._to_sharded())
        load[new] = new._register_load_state_dict_pre_hook(lambda *a, **k: group._to_sharded())
