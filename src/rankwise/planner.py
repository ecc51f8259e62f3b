"""Memory you can predict: ``rw.plan(...)`` itemizes the per-rank memory of a training setup before
any weight is loaded.

Nothing here is a hand formula where a real object can answer:

* **weights / gradients**: the model is built on the ``meta`` device from its config (no weights),
  the adapter is injected with ``rw.adapt`` on ``meta``, and the bytes are ``numel · element_size``
  of the real parameter objects (4-bit base layers: bitsandbytes' exact storage bits).
* **optimizer state and projectors**: the optimizer is built by ``rw.optim.make`` on the meta model;
  then one real step runs on CPU on *one representative tensor per distinct (group, shape, dtype)*
  and the state is read with the optimizer's own storage accounting (``accounting.py``), so it is
  exact to the byte for every optimizer whose state is per parameter (the exact SVD is replaced by a
  shape-only stand-in during this probe: the state's shapes do not depend on its values).
* **activations, logits, the backward peak**: one forward + backward on ``meta`` tensors at the
  requested batch and length, with ``saved_tensors_hooks`` (bytes saved for backward, each storage
  once, parameters excluded) and a dispatch mode that follows every storage's life (so the
  backward's transients, gradient buffers and checkpoint recomputation are seen as they happen).
  Scaled-dot-product attention is run as a flash-style kernel (it saves q, k, v, the output and the
  log-sum-exp, never the S×S matrix), which is what CUDA and CPU SDPA do; dropout runs as the planned
  ``device``'s kernels run it (CUDA: bool masks, none inside attention; CPU: masks in the input's dtype,
  and the math attention kernel when SDPA has dropout).

What is still a formula: the refresh-step transient of a projected optimizer (the SVD's factors and
workspace, exact and randomized), the foreach AdamW temporary, FSDP2's gathered layer, and how sharded
tensors split over ranks (dimension 0, padded). ``docs/plan.md`` lists them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checks
from .memory import enable_activation_checkpointing

__all__ = ["DTYPES", "Plan", "build_meta_model", "plan"]

#: ``dtype`` policies: the dtype of the base weights (adapter weights stay fp32 whatever it is).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Projector classes whose refresh runs an exact SVD / a randomized range finder.
_EXACT = ("SVDProjector", "Int4SVDProjector")
_RANDOMIZED = ("RandomizedSVDProjector", "Int4RandomizedSVDProjector")


# ----------------------------------------------------------------------------------------------- result
@dataclass
class Plan:
    """Per-rank memory of one training setup (bytes). ``rows()`` gives the itemized table."""

    model: str
    method: str | None
    optimizer: str
    batch_size: int
    seq_len: int
    dtype: str
    checkpointing: bool
    layerwise: bool
    quant: str | None
    world_size: int
    params_total: int
    params_trainable: int
    weights: int
    gradients: int
    optimizer_state: int
    projectors: int
    refresh_exact: int
    refresh_randomized: int
    refresh_used: str
    step_transient: int
    activations: int
    logits: int
    backward_peak: int
    forward_backward: int
    step_phase: int
    peak: int
    peak_phase: str
    budget: int | None = None
    notes: list[str] = field(default_factory=list)
    device: str = "cuda"

    @property
    def fits(self) -> bool | None:
        """Whether ``peak`` fits ``budget`` (None without a budget)."""
        return None if self.budget is None else self.peak <= self.budget

    def rows(self) -> list[tuple[str, int, str]]:
        """``(item, bytes, what it is)`` in display order."""
        return [
            ("weights", self.weights, "parameters as stored (frozen base + trainable), per rank"),
            ("gradients", self.gradients, "gradient buffers of trainable parameters at the optimizer step"),
            ("optimizer state", self.optimizer_state, "moments etc., projectors excluded (exact, probed)"),
            ("projectors", self.projectors, "subspace bases / seeds / index sets (replicated over ranks)"),
            ("refresh, exact SVD", self.refresh_exact, "transient of one refresh of the largest projected matrix"),
            ("refresh, randomized", self.refresh_randomized, "same with the randomized range finder"),
            ("step transient", self.step_transient,
             "temporaries of optimizer.step: measured on the probe"
             + {"exact": " + SVD workspace", "randomized": " (randomized refresh)"}.get(self.refresh_used, "")),
            ("activations", self.activations, "saved for backward in the layers (meta trace)"),
            ("logits", self.logits, "saved for backward by the output head and the loss"),
            ("backward peak", self.backward_peak, "live non-parameter bytes at the worst point of fwd+bwd"),
            ("peak", self.peak, f"max(forward+backward, optimizer step): {self.peak_phase}"),
        ]

    def to_dict(self) -> dict[str, Any]:
        """Every field plus ``fits`` (JSON-ready)."""
        return {**asdict(self), "fits": self.fits}

    def table(self) -> str:
        """A readable table (GiB and MiB) with the budget verdict."""
        lines = [f"rankwise plan: {self.model}, method {self.method or 'full'}, optimizer {self.optimizer}, "
                 f"batch {self.batch_size} x {self.seq_len}, {self.dtype}"
                 f"{', 4-bit ' + self.quant if self.quant else ''}{', checkpointing' if self.checkpointing else ''}"
                 f"{', layer-wise' if self.layerwise else ''}, world size {self.world_size} (per rank), "
                 f"{self.device} kernels",
                 f"parameters: {self.params_total:,} total, {self.params_trainable:,} trainable", ""]
        width = max(len(r[0]) for r in self.rows())
        lines.append(f"{'item':{width}}  {'MiB':>10}  {'GiB':>7}  note")
        for name, nbytes, note in self.rows():
            lines.append(f"{name:{width}}  {nbytes / 2**20:10.1f}  {nbytes / 2**30:7.3f}  {note}")
        if self.budget is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines += ["", f"budget {self.budget / 2**30:.2f} GiB: {verdict} "
                          f"(headroom {(self.budget - self.peak) / 2**30:+.2f} GiB)"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ model
def _config(spec: str) -> tuple[Any, str]:
    """``(transformers config, default task)`` for a packaged name, a model directory, a config.json
    or a config name in the local Hugging Face cache (offline)."""
    from transformers import AutoConfig

    from .models import loaders

    path = Path(spec)
    if path.is_file():
        with open(path) as f:
            data = json.load(f)
        if "model_type" not in data:
            raise ValueError(f"{spec!r} has no 'model_type'; give a transformers config.json")
        return AutoConfig.for_model(**data), "causal-lm"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{spec!r} is a directory without config.json")
        return AutoConfig.from_pretrained(str(path), local_files_only=True), "causal-lm"
    try:
        key = loaders.resolve_model_name(spec)
    except ValueError:
        try:
            return AutoConfig.from_pretrained(spec, local_files_only=True), "causal-lm"
        except (OSError, ValueError):
            raise ValueError(f"unknown model {spec!r}: give a packaged name ({', '.join(loaders.MODELS)}), a "
                             "model directory, a config.json, or a config cached offline") from None
    if key.startswith("scratch-"):
        return loaders.llama_config(key.removeprefix("scratch-")), "causal-lm"
    if key == "minilm-l6":
        info = loaders.MODELS[key]
        directory = loaders.asset_dir(info.package, *info.files) / "model"
        return AutoConfig.from_pretrained(str(directory), local_files_only=True), "seq-cls"
    cache = loaders.smollm2_cache_path()
    if (cache / "config.json").is_file():
        return AutoConfig.from_pretrained(str(cache), local_files_only=True), "causal-lm"
    source = loaders._smollm2_source()
    return AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True), "causal-lm"


def build_meta_model(spec: str | Any, task: str | None = None, dtype: torch.dtype = torch.float32,
                     num_labels: int = 2) -> tuple[nn.Module, str]:
    """``(model on the meta device, task)`` from a name/path (see ``_config``) or a transformers config."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    config, default_task = _config(os.fspath(spec)) if isinstance(spec, str | os.PathLike) else (spec, "causal-lm")
    task = task or default_task
    checks.choice("task", task, ("causal-lm", "seq-cls", "base"))
    if task == "seq-cls":
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
    auto = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification,
            "base": AutoModel}[task]
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
    return model, task


# ------------------------------------------------------------------------------------------------ bytes
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _per_rank(shape: tuple[int, ...], esize: int, world: int) -> int:
    """Bytes of one FSDP2 shard: dimension 0 split over ``world`` ranks, padded to equal shards."""
    if world == 1 or not shape:
        return math.prod(shape) * esize
    return -(-shape[0] // world) * math.prod(shape[1:]) * esize


def _unique(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------------- optimizer probe
@contextlib.contextmanager
def _shape_only_linalg() -> Iterator[None]:
    """``torch.linalg.svd`` / ``qr`` replaced by orthonormal factors of the right shapes: the probe
    needs the state's shapes, not its values (a real SVD of a 4096×11008 matrix takes seconds)."""
    real_svd, real_qr = torch.linalg.svd, torch.linalg.qr

    def eye(m: int, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.eye(m, n, dtype=like.dtype, device=like.device).expand(*like.shape[:-2], m, n).clone()

    def svd(A: torch.Tensor, full_matrices: bool = True, **_: Any) -> Any:
        m, n = A.shape[-2], A.shape[-1]
        k = min(m, n)
        S = torch.ones(*A.shape[:-2], k, dtype=A.dtype, device=A.device)
        return torch.return_types.linalg_svd(  # type: ignore[attr-defined]
            (eye(m, m if full_matrices else k, A), S,
                                              eye(n if full_matrices else k, n, A)))

    def qr(A: torch.Tensor, mode: str = "reduced", **_: Any) -> Any:
        m, n = A.shape[-2], A.shape[-1]
        k = m if mode == "complete" else min(m, n)
        Q = A.new_empty(0) if mode == "r" else eye(m, k, A)
        return torch.return_types.linalg_qr(  # type: ignore[attr-defined]
            (Q, eye(k, n, A)))

    def eigh(A: torch.Tensor, UPLO: str = "L", **_: Any) -> Any:
        n = A.shape[-1]
        L = torch.ones(*A.shape[:-1], dtype=A.dtype, device=A.device)
        return torch.return_types.linalg_eigh((L, eye(n, n, A)))  # type: ignore[attr-defined]

    real_eigh = torch.linalg.eigh
    torch.linalg.svd, torch.linalg.qr, torch.linalg.eigh = svd, qr, eigh  # type: ignore[assignment]
    try:
        with _Fp32Matmul():
            yield
    finally:
        torch.linalg.svd, torch.linalg.qr, torch.linalg.eigh = real_svd, real_qr, real_eigh  # type: ignore[assignment]


class _Fp32Matmul(torch.utils._python_dispatch.TorchDispatchMode):
    """CPU bf16/fp16 matrix products computed in fp32 and cast back (same output dtype and shape, so
    the same memory; a bf16 GEMM without AMX takes minutes at 11008×4096 in the probe). Entered
    outside the storage tracker, so the fp32 copies it makes are not counted."""

    _OPS = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
            torch.ops.aten.baddbmm.default)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        low = [a for a in args if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16)
               and a.device.type == "cpu"]
        if func not in self._OPS or not low:
            return func(*args, **kwargs)
        dtype = low[0].dtype
        up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        return func(*up, **kwargs).to(dtype)


def _is_projector_key(key: Any) -> bool:
    return isinstance(key, str) and (key == "P" or key.startswith("P_") or key in ("idx", "Q"))


@dataclass
class _Probe:
    per_param: dict[int, tuple[int, int]]  # id(meta param) -> (moment bytes, projector bytes) on one rank
    sharded: dict[int, int]  # id(meta param) -> moment bytes that shard with the parameter (dim 0)
    shared: int  # bytes not attributable to one parameter (shared bases, sampler tensors, options)
    projector_kind: dict[int, str]  # id(meta param) -> projector class name ("" when not projected)
    step_temp: dict[int, int]  # id(meta param) -> bytes its own first step holds on top of its state


def _step_temporaries(group: dict[str, Any], rep: nn.Parameter,
                      build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]) -> int:
    """Bytes one parameter's first step (state creation, subspace refresh, update) holds beyond the
    state it leaves: a fresh optimizer on a copy of ``rep``, stepped under the storage tracker (the
    LAPACK / cuSOLVER workspace of a decomposition is not an op output and is not seen)."""
    p = nn.Parameter(rep.detach().clone())
    p.grad = rep.grad.detach().clone() if rep.grad is not None else None
    opt = build([{**{k: v for k, v in group.items() if k != "params"}, "params": [p]}])
    with _shape_only_linalg(), torch.no_grad(), _LiveBytes([p, *([p.grad] if p.grad is not None else [])]) as live:
        opt.step()
        return max(0, live.peak - live.current)


def _probe_state(groups: list[dict[str, Any]], build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
                 dtype_of: Callable[[nn.Parameter], torch.dtype]) -> _Probe:
    """One real CPU step on one representative per (group, shape, dtype); per-parameter state bytes."""
    from .optim.accounting import optimizer_bytes, storage_bytes, tensors_in

    reps: dict[tuple[int, tuple[int, ...], torch.dtype], nn.Parameter] = {}
    owner: dict[int, nn.Parameter] = {}
    rep_groups = []
    gen = torch.Generator().manual_seed(0)
    for gi, group in enumerate(groups):
        params = []
        for p in group["params"]:
            key = (gi, tuple(p.shape), dtype_of(p))
            if key not in reps:
                data = (torch.randn(key[1], generator=gen) * 0.02).to(key[2])
                rep = nn.Parameter(data)
                rep.grad = (torch.randn(key[1], generator=gen) * 1e-3).to(key[2])
                reps[key] = rep
                params.append(rep)
            owner[id(p)] = reps[key]
        if params:
            rep_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    temps = {id(rep): _step_temporaries(g, rep, build) for g in rep_groups for rep in g["params"]}
    opt = build(rep_groups)
    with _shape_only_linalg(), torch.no_grad():
        opt.step()
    reps_list = list(reps.values())
    per_rep: dict[int, tuple[int, int, int, str]] = {}
    attributed = 0
    projector_of = getattr(opt, "projector", None)
    for rep in reps_list:
        st = opt.state.get(rep, {})
        proj_tensors = [v for k, v in st.items() if _is_projector_key(k) and torch.is_tensor(v)]
        kind = ""
        if callable(projector_of):
            try:
                proj = projector_of(rep)
            except (KeyError, ValueError, AttributeError):
                proj = None
            if proj is not None:
                kind = type(proj).__name__
                proj_tensors += list(proj.resident_tensors()) if not getattr(proj, "shared", None) else []
        other = [v for k, v in st.items() if not _is_projector_key(k)]
        proj_b = storage_bytes(tensors_in(proj_tensors), exclude=[rep])
        mom_b = storage_bytes(tensors_in(other), exclude=[rep, *proj_tensors])
        shard_b = storage_bytes([t for t in tensors_in(other) if t.ndim >= 1 and t.shape[0] == rep.shape[0]
                                 and rep.ndim >= 1], exclude=[rep, *proj_tensors])
        per_rep[id(rep)] = (mom_b, proj_b, shard_b, kind)
        attributed += mom_b + proj_b
    resident = getattr(opt, "resident_tensors", None)
    total = optimizer_bytes(opt, resident() if callable(resident) else [])
    per_param = {pid: per_rep[id(rep)][:2] for pid, rep in owner.items()}
    sharded = {pid: per_rep[id(rep)][2] for pid, rep in owner.items()}
    kinds = {pid: per_rep[id(rep)][3] for pid, rep in owner.items()}
    return _Probe(per_param, sharded, max(0, total - attributed), kinds,
                  {pid: temps[id(rep)] for pid, rep in owner.items()})


# ------------------------------------------------------------------------------------------ meta trace
class _FlashSDPA(torch.autograd.Function):
    """Scaled-dot-product attention as flash / memory-efficient kernels run it: the output and a
    float32 log-sum-exp per query are new; q, k, v, output and log-sum-exp are saved for backward."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if q.ndim == 4:  # (B, H, S, D) viewed from a (B, S, H, D) buffer, as the kernels lay it out
            b, h, s, _ = q.shape
            out = q.new_empty((b, s, h, v.shape[-1])).transpose(1, 2)
        else:
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


#: Devices a plan can model: they differ in how dropout runs (see ``_dropout_ops``).
DEVICES = ("cuda", "cpu")


@contextlib.contextmanager
def _dropout_ops(device: str) -> Iterator[None]:
    """Attention and dropout in the meta pass as ``device`` runs them in training.

    ``cuda``: SDPA is a flash / memory-efficient kernel whatever its ``dropout_p`` (the dropout is drawn
    from a Philox seed inside the kernel, no mask is kept), and ``F.dropout`` is the fused
    ``native_dropout``, which saves a bool mask (1 byte per element). ``cpu``: SDPA with
    ``dropout_p > 0`` falls back to the math kernel (the S×S scores, softmax, float dropout mask and
    dropped probabilities are real tensors, the real op on meta runs the same decomposition), and
    ``F.dropout`` is ATen's composite ``x · (bernoulli(1-p) / (1-p))``, which saves a mask in the
    input's dtype (what the meta device runs by itself)."""
    real_sdpa, real_dropout = torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.dropout

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        dropout_p = kwargs.get("dropout_p", args[1] if len(args) > 1 else 0.0)
        if device == "cpu" and dropout_p > 0:
            return real_sdpa(query, key, value, *args, **kwargs)
        return _FlashSDPA.apply(query, key, value)

    def fused_dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
        if training and 0 < p < 1 and not inplace and x.numel() > 0:
            return torch.native_dropout(x, p, True)[0]
        return real_dropout(x, p, training, inplace)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    if device == "cuda":
        torch.nn.functional.dropout = fused_dropout  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
        torch.nn.functional.dropout = real_dropout


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Follows every storage an op creates until it is freed: ``peak`` of the live bytes
    (storages that existed before, such as parameters, are not counted)."""

    def __init__(self, known: Iterable[torch.Tensor]):
        super().__init__()
        self.known = {t.untyped_storage()._cdata for t in known}
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            # a data-dependent branch on meta (transformers asks whether position ids are packed
            # sequences): answer 1 / True, the value of the plain unpacked batch
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key in self.known or key in self.live:
                    continue
                self.live[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, key)
        return out


@dataclass
class Trace:
    """What one forward + backward on meta tensors keeps and peaks at (bytes)."""

    activations: int  # saved for backward before the output head, each storage once
    logits: int  # saved for backward by the head and the loss
    live_peak: int  # the most non-parameter bytes alive at once during forward + backward


def _storage_key(t: torch.Tensor) -> int:
    storage = t.untyped_storage()
    return storage._cdata if t.device.type == "meta" else storage.data_ptr()


def saved_bytes(model: nn.Module, run: Callable[[], Any], head: nn.Module | None = None) -> tuple[int, int]:
    """``(layer bytes, head bytes)`` saved for backward while ``run()`` executes (saved-tensor hooks,
    each storage once, the model's parameters excluded; tensors saved from the moment ``head`` runs
    count as head bytes). Works on meta and real tensors alike (used by the tests as the measurement)."""
    params = {_storage_key(p) for p in model.parameters()}
    saved: dict[int, tuple[int, bool]] = {}
    keep: list[torch.Tensor] = []  # keep storages alive so an address cannot be reused by another
    in_head = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), in_head[0])
        keep.append(t)
        return t

    handle = head.register_forward_pre_hook(lambda *_: in_head.__setitem__(0, True)) if head is not None else None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        if handle is not None:
            handle.remove()
    layers = sum(b for b, h in saved.values() if not h)
    return layers, sum(b for b, h in saved.values() if h)


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that starts the output part: the LM head, else a classifier / pooler."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        return out
    for name in ("classifier", "score", "pooler"):
        for full, module in model.named_modules():
            if full.split(".")[-1] == name:
                return module
    return None


def batch_for(model: nn.Module, task: str, batch_size: int, seq_len: int, device: Any) -> dict[str, torch.Tensor]:
    """Model inputs of the requested shape (token id 1 everywhere; labels for the loss)."""
    ids = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
    if task == "causal-lm":
        return {"input_ids": ids, "labels": ids}
    if task == "seq-cls":
        return {"input_ids": ids, "labels": torch.zeros(batch_size, dtype=torch.long, device=device)}
    return {"input_ids": ids}


def loss_of(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None)
    if loss is None:
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        loss = hidden.float().pow(2).mean()
    return loss


def trace(model: nn.Module, task: str, batch_size: int, seq_len: int, *,
          drop_grads: bool = False, device: str = "cuda") -> Trace:
    """Forward + backward of ``model`` (on meta) at ``batch_size × seq_len``: saved bytes and the live
    peak, with attention and dropout run as on ``device`` (``_dropout_ops``). ``drop_grads``: each
    gradient is freed as soon as it is complete (layer-wise stepping, or FSDP2's reduce-scatter, whose
    sharded gradients the caller adds)."""
    where = next(model.parameters()).device
    inputs = batch_for(model, task, batch_size, seq_len, where)
    handles = []
    if drop_grads:
        for p in _unique(model):
            if p.requires_grad:
                handles.append(p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None)))
    real_autocast = torch.is_autocast_enabled
    # autocast has no meta dispatch key: asking whether it is on for "meta" raises
    torch.is_autocast_enabled = lambda *a: False if a and str(a[0]) == "meta" else real_autocast(*a)  # type: ignore
    try:
        # two passes: saved-tensor hooks keep every saved tensor alive until the forward ends, which
        # under activation checkpointing would inflate the live peak, so the peak is a pass without them
        with _dropout_ops(device):
            with _LiveBytes(model.parameters()):  # (it also answers the meta .item() calls)
                layers, head = saved_bytes(model, lambda: model(**inputs), output_head(model))
            with _LiveBytes(model.parameters()) as live:
                loss_of(model(**inputs)).backward()
    finally:
        torch.is_autocast_enabled = real_autocast  # type: ignore[assignment]
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.grad = None
    return Trace(layers, head, live.peak)


# ------------------------------------------------------------------------------------------ refresh
def _refresh_bytes(m: int, n: int, rank: int, grad_esize: int, oversample: int = 8) -> tuple[int, int]:
    """(exact SVD, randomized) transient bytes of one basis refresh of an m×n gradient (fp32 work):
    a float copy when the gradient is not fp32, then U, S, Vᴴ (k = min(m, n)) plus the LAPACK/cuSOLVER
    copy of the input; randomized: Ω, Y and Q (l = r + oversample columns on the long side), B = QᵀA and
    the small SVD of B."""
    cast = m * n * 4 if grad_esize != 4 else 0
    k = min(m, n)
    exact = cast + 4 * (m * n + m * k + k + k * n)
    l_ = min(rank + oversample, k)
    long_, short = max(m, n), min(m, n)
    randomized = cast + 4 * (short * l_ + 2 * long_ * l_ + l_ * short + l_ * l_ + l_ + l_ * short)
    return exact, randomized


# ------------------------------------------------------------------------------------------------ plan
def _inject(meta: nn.Module, method: str | None, options: dict[str, Any], quant: str | None,
            structure_only: bool = False) -> tuple[Any, set[int]]:
    """Apply the adapter ``method`` on the meta model; ``(QuantConfig or None, ids of 4-bit weights)``.
    ``structure_only``: the layers are built without their initialization (``adapt``'s ``_skip_init``, as
    when a saved adapter is loaded): the same tensors, their values not computed."""
    quant_cfg = None
    quantized: set[int] = set()
    if quant is not None:
        from .quant import SCHEMES, QuantConfig
        from .targets import find_targets

        quant_cfg = QuantConfig(quant) if quant in SCHEMES else QuantConfig.parse(quant, "quant")
        if method is None:
            raise ValueError("a 4-bit base (quant) trains through an adapter: give an adapter method (e.g. lora)")
        quantized = {id(m.weight) for _, m in find_targets(meta, "all-linear") if isinstance(m.weight, torch.Tensor)}
    if method is not None:
        from .adapters import adapt, get_method

        get_method(method)
        try:
            adapt(meta, method, _skip_init=structure_only, **options)
        except (NotImplementedError, RuntimeError, ValueError) as error:
            raise _NeedsRealInit(error) from None
    return quant_cfg, quantized


def _quantizes_base(method: str) -> bool:
    """Whether ``method`` is LoRA over a 4-bit base it quantizes itself (QLoRA, LoftQ: a ``QLoRAConfig``, whose
    ``quant_type`` / ``double_quant`` fix the storage format)."""
    from .adapters import get_method
    from .adapters.lora import QLoRAConfig

    return issubclass(get_method(method).config_cls, QLoRAConfig)


class _NeedsRealInit(Exception):
    """``adapt`` failed on the meta model: its initialization may read real weights or data (which a meta model
    has not); ``cause`` is the error it raised."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


def _inject_planned(model: str | Any, task: str | None, dtype: torch.dtype, method: str | None,
                    options: dict[str, Any], quant: str | None,
                    notes: list[str]) -> tuple[nn.Module, str, Any, set[int]]:
    """The meta model with ``method`` injected: ``(meta model, task, QuantConfig or None, ids of 4-bit
    weights)``. A method whose initialization needs real weights or data (gradients, layer inputs, an SVD of
    W) is built structure-only: its tensors' shapes do not depend on those values. A method whose data pass
    chooses the layers' shapes (EVA's, GoRA's per-layer ranks: ``MethodSpec.plan``) cannot be planned."""
    meta, task = build_meta_model(model, task, dtype)
    try:
        return (meta, task, *_inject(meta, method, options, quant))
    except _NeedsRealInit as error:
        from .adapters import get_method

        why, spec = str(error), get_method(str(method))
        meta, task = build_meta_model(model, task, dtype)
        try:
            quant_cfg, quantized = _inject(meta, method, options, quant, structure_only=True)
        except _NeedsRealInit as again:
            if isinstance(again.cause, ValueError):  # no data is asked for now: the settings are wrong
                raise again.cause from None
            raise ValueError(f"method {method!r} cannot be planned on the meta device: its layers read the weights' "
                             f"values when they are built ({again})") from None
        if spec.needs_adapters:
            raise ValueError(f"method {method!r} is built from the adapters already on a model ({why}); "
                             "rw.plan plans one method on a bare model") from None
        if spec.plan is not None:
            raise ValueError(f"method {method!r} chooses each layer's shape from data ({why}); its memory "
                             "cannot be planned without the data") from None
    notes.append(f"{method}: its initialization reads real weights or data ({why}); planned from the tensors "
                 "it allocates, whose shapes do not depend on them")
    return meta, task, quant_cfg, quantized


@dataclass
class _States:
    """Per-rank model-state bytes of the parameters that train (at the worst sampler selection)."""

    optimizer_state: int
    projectors: int
    gradients: int  # what is alive at the step (one parameter's under layer-wise stepping)
    gradients_all: int  # every trained parameter's
    trained: list[nn.Parameter]
    refresh_exact: int
    refresh_randomized: int
    refresh_used: str
    step_transient: int
    keeps_batch: bool  # the optimizer holds the last training batch between steps (IST's scoring batch)


def _states(meta: nn.Module, optimizer: str, options: dict[str, Any], world: int, layerwise: bool,
            notes: list[str]) -> _States:
    from .optim import factory

    trainable = [p for p in _unique(meta) if p.requires_grad]
    sampler = optimizer in factory.SAMPLERS
    if layerwise and sampler:
        raise ValueError(f"layer-wise stepping does not combine with the block sampler {optimizer!r}")
    if optimizer == "owlore" and "ratios" not in options:  # its layer odds read W; the plan takes the costliest
        from .layout import layer_list, unwrap

        _, repeated = layer_list(unwrap(meta), options.get("layers"))
        options["ratios"] = [1.0] * len(list(repeated.children()))
    opt: Any = factory.make(optimizer, meta, **options)  # a sampler's units are read below
    kwargs = {k: v for k, v in options.items() if k not in ("rank", "targets")}
    build = (opt._make_inner if sampler
             else lambda g: factory.make(optimizer, g, **kwargs))
    probe = _probe_state(list(opt.param_groups), build, lambda p: p.dtype)

    def moments(p: nn.Parameter) -> int:
        total = probe.per_param.get(id(p), (0, 0))[0]
        shard = probe.sharded.get(id(p), 0)
        return total - shard + shard // p.shape[0] * -(-p.shape[0] // world) if shard else total

    def proj(p: nn.Parameter) -> int:
        return probe.per_param.get(id(p), (0, 0))[1]

    def grad(p: nn.Parameter) -> int:
        return _per_rank(tuple(p.shape), p.element_size(), world)

    extra = 0
    trained = stateful = trainable
    if sampler:  # the worst selection: the always-awake parameters plus the k costliest units
        units: list[list[nn.Parameter]] = opt._units
        k = len(opt._current)
        order = sorted(range(len(units)), key=lambda i: -sum(moments(p) + proj(p) + grad(p) for p in units[i]))
        chosen = opt._always + [p for i in order[:k] for p in units[i]]
        trained = list({id(p): p for p in chosen}.values())
        extra = sum(_nbytes(t) for t in opt._sampler_tensors())
        awake = {id(p) for p in trained}
        kept = opt._kept_on_switch()  # IST keeps a sleeping layer's state: every layer's, once each has woken
        stateful = trained + [p for p in trainable if id(p) in kept and id(p) not in awake]
        for p in trainable:
            p.requires_grad_(id(p) in awake)
        notes.append(f"{optimizer}: {k} of {len(units)} units awake at a time; the plan takes the costliest"
                     + ("; the sleeping units' optimizer state is kept and counted" if len(stateful) > len(trained)
                        else ""))
    grads_all = sum(grad(p) for p in trained)

    rank_of = {id(p): int(g["rank"]) for g in opt.param_groups if "rank" in g for p in g["params"]}
    exact = randomized = 0
    for p in trained:
        if id(p) in rank_of and p.ndim == 2:
            e, r = _refresh_bytes(p.shape[0], p.shape[1], rank_of[id(p)], p.element_size())
            exact, randomized = max(exact, e), max(randomized, r)
    kinds = {probe.projector_kind.get(id(p), "") for p in trained if id(p) in rank_of}
    used = "exact" if kinds & set(_EXACT) else "randomized" if kinds & set(_RANDOMIZED) else "none"
    # measured: the largest one-parameter step (tracked on the probe; parameters step one at a time),
    # plus for an exact SVD the decomposition's workspace (a copy of the input), which is no op output
    transient = max((probe.step_temp.get(id(p), 0) for p in trained), default=0)
    if used == "exact":
        transient += max((4 * p.numel() for p in trained if id(p) in rank_of), default=0)
    if (optimizer == "adamw" or sampler) and not layerwise and options.get("foreach", True):
        # torch's foreach AdamW (the CUDA default) holds one temporary the size of the trained tensors
        transient = max(transient, grads_all)
    return _States(
        optimizer_state=sum(moments(p) for p in stateful) + probe.shared + extra,
        projectors=sum(proj(p) for p in trained),
        gradients=max((grad(p) for p in trained), default=0) if layerwise else grads_all,
        gradients_all=grads_all, trained=trained, refresh_exact=exact, refresh_randomized=randomized,
        refresh_used=used, step_transient=transient, keeps_batch=bool(getattr(opt, "keeps_last_batch", False)),
    )


def plan(
    model: str | Any,
    method: str | None = None,
    optimizer: str = "adamw",
    *,
    batch_size: int = 8,
    seq_len: int = 512,
    dtype: str = "fp32",
    checkpointing: bool = False,
    layerwise: bool = False,
    quant: str | None = None,
    world_size: int = 1,
    memory: int | float | None = None,
    task: str | None = None,
    method_options: dict[str, Any] | None = None,
    optimizer_options: dict[str, Any] | None = None,
    device: str = "cuda",
) -> Plan:
    """The per-rank memory plan of training ``model`` (a name, directory, config.json or transformers
    config) with adapter ``method`` (None: full training) and optimizer ``optimizer`` (a
    ``rw.optim.make`` name, with ``optimizer_options`` as its keyword arguments), at
    ``batch_size × seq_len`` tokens per rank.

    ``dtype``: base-weight dtype (``fp32``, ``bf16``, ``fp16``; adapters stay fp32); ``quant``: a 4-bit
    base (``nf4``, ``fp4`` or a ``QuantConfig`` name like ``nf4-b64-dq``) under an adapter method;
    ``checkpointing``: activation checkpointing of every layer; ``layerwise``: the optimizer steps each
    parameter inside backward and frees its gradient (``rw.optim.LayerwiseOptimizer``);
    ``world_size``: FSDP2 ranks (parameters, gradients and per-parameter state sharded on dimension
    0, projectors replicated); ``memory``: a budget in bytes for ``Plan.fits``; ``task``:
    ``causal-lm`` / ``seq-cls`` / ``base`` (default: the model's usual one); ``device``: ``cuda`` or
    ``cpu``, whose attention and dropout kernels keep different tensors for backward (``_dropout_ops``).
    """
    from .optim import factory

    checks.choice("dtype", dtype, tuple(DTYPES))
    checks.choice("device", device, DEVICES)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        checks.integer(name, value, 1)
    checks.choice("optimizer", optimizer, factory.names())
    if memory is not None:
        checks.positive("memory", memory)
    notes: list[str] = []
    planned_method = method
    if method is not None and _quantizes_base(method):  # LoRA over the 4-bit base it makes (its storage options)
        from .quant import QuantConfig

        if quant is not None:
            raise ValueError(f"quant={quant!r}: method {method!r} quantizes the base itself (its quant_type and "
                             "double_quant options); leave quant unset")
        method_options = dict(method_options or {})
        scheme, dq = method_options.pop("quant_type", "nf4"), method_options.pop("double_quant", True)
        method_options.pop("loftq_iter", None)
        quant, method = QuantConfig(scheme, double_quant=dq).name, "lora"
        notes.append(f"{planned_method}: planned as LoRA over its {quant} base")
    meta, task, quant_cfg, quantized = _inject_planned(model, task, DTYPES[dtype], method, dict(method_options or {}),
                                                       quant, notes)
    params = _unique(meta)
    if not any(p.requires_grad for p in params):
        raise ValueError("nothing to train: the method left no trainable parameter")
    trainable_count = sum(p.numel() for p in params if p.requires_grad)

    def stored(p: nn.Parameter) -> int:
        if id(p) in quantized and quant_cfg is not None:
            return -(-quant_cfg.storage_bits(p.numel()) // 8)
        return _per_rank(tuple(p.shape), p.element_size(), world_size)

    weights = sum(stored(p) for p in params)
    st = _states(meta, optimizer, dict(optimizer_options or {}), world_size, layerwise, notes)
    if st.keeps_batch:
        inputs = {id(t): t for t in batch_for(meta, task, batch_size, seq_len, "meta").values()}
        st.optimizer_state += sum(_nbytes(t) for t in inputs.values())
        notes.append(f"{optimizer} keeps the last training batch (its inputs) between steps: in its state")

    if checkpointing:
        enable_activation_checkpointing(meta, "checkpointing")
    meta.train()
    t = trace(meta, task, batch_size, seq_len, drop_grads=layerwise or world_size > 1, device=device)
    resident = weights + st.optimizer_state + st.projectors
    fwd_bwd = resident + t.live_peak
    if world_size > 1:
        from .layout import transformer_blocks

        fwd_bwd += 2 * max(sum(_nbytes(p) for p in m.parameters()) for _, m in transformer_blocks(meta))
        fwd_bwd += 0 if layerwise else st.gradients_all  # sharded gradients, reduce-scattered as they come
        notes.append("FSDP2: two gathered layers (current + prefetched) are counted in forward+backward")
    step_phase = resident + st.gradients + st.step_transient
    if quant_cfg is not None:
        notes.append(f"4-bit base ({quant_cfg.name}): the per-layer dequantized weight of each matmul is not "
                     "in the meta trace")
    return Plan(
        model=str(model) if isinstance(model, str | os.PathLike) else type(model).__name__, method=planned_method,
        optimizer=optimizer, batch_size=batch_size, seq_len=seq_len, dtype=dtype, checkpointing=checkpointing,
        layerwise=layerwise, quant=quant_cfg.name if quant_cfg else None, world_size=world_size,
        params_total=sum(p.numel() for p in params), params_trainable=trainable_count,
        weights=weights, gradients=st.gradients, optimizer_state=st.optimizer_state, projectors=st.projectors,
        refresh_exact=st.refresh_exact, refresh_randomized=st.refresh_randomized, refresh_used=st.refresh_used,
        step_transient=st.step_transient, activations=t.activations, logits=t.logits, backward_peak=t.live_peak,
        forward_backward=fwd_bwd, step_phase=step_phase, peak=max(fwd_bwd, step_phase),
        peak_phase="forward+backward" if fwd_bwd >= step_phase else "optimizer step",
        budget=int(memory) if memory is not None else None, notes=notes, device=device,
    )
