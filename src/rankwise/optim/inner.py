"""Inner updates: the optimizer that runs on the (projected) gradient R and returns a direction N.

``update(R, state, group, p) -> (N, c)``: the engine applies ``p -= lr · c · back(N)``. Keeping the
bias-correction factor ``c`` outside N reproduces galore-torch / apollo-torch / Fira numerics exactly
(they compute N = m/(√v + ε) and fold √(1−β₂ᵗ)/(1−β₁ᵗ) into the step size). Moments live in the
per-parameter state under the keys in ``state_keys`` and have R's shape (r×n or m×r).

* ``adamw`` — Adam moments (Kingma & Ba 2015) with decoupled weight decay applied by the engine
  (Loshchilov & Hutter 2019), transformers/galore-torch numerics (ε added to √v before bias correction).
* ``adamw8bit`` — the same update with both moments stored blockwise-quantized to 8 bits (256-element
  blocks, absmax scales, dynamic codebook; Dettmers et al. 2022). Tensors smaller than
  ``min_8bit_size`` (4096) keep fp32 moments, as bitsandbytes does.
* ``adafactor`` — factored second moment (row/column EMAs) with β₂ₜ = 1 − t^decay_rate, update clipping
  and optional first moment (Shazeer & Stern 2018, Alg. 4/5). ``lr`` is explicit (no relative step);
  with ``scale_parameter`` the step is scaled by max(ε₂, RMS(W)).
* ``lion`` — sign of an interpolated momentum (Chen et al. 2023, "Symbolic Discovery of Optimization
  Algorithms", Alg. 2), used by Online Subspace Descent's Lion variant.
* ``natural_adamw`` — AdamW on the natural gradient g̃ = (λI + HᵀH)⁻¹g, H = the last ``natural_history``
  (s) gradients g as rows, applied through Woodbury's identity with an s×s Cholesky solve (Natural
  GaLore, Das 2024, Sec. 3 "Natural GaLore algorithm"; λ = ``natural_damping``).

``transition(state, T, side)`` carries the moments into a new basis when the subspace changes
(``reproject_moments=True``), with T = B_newᵀ·B_old (r×r). First moment: M ← T·M (GaLore's
P_newᵀ P_old M). Second moment: LDAdam's projection-aware rule (Robert et al., ICLR 2025,
"LDAdam: Adaptive Optimization from Low-Dimensional Gradient Statistics", projection-aware update):
v̂ ← |(T∘T)(v̂ − m̂²) + (T·m̂)²| on the bias-corrected moments, i.e. the variance of each old coordinate
is propagated through T as for independent coordinates and the mean is rotated exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..checks import choice
from . import fused, quant
from .projectors import power_of_two_scale
from .sharding import full, is_dtensor, like

State = dict[str, Any]

_GRAD_IS_WORKSPACE = False


@contextmanager
def grad_workspace() -> Iterator[None]:
    """Within this context a step may use a parameter's ``.grad`` buffer as workspace (the layer-wise
    mode frees the gradient right after the step): the AdamW update of a full gradient then writes
    √v + ε and N into that buffer instead of allocating a temporary of the parameter's size.
    Bit-identical results; only ``p.grad``'s contents after the step change."""
    global _GRAD_IS_WORKSPACE
    previous, _GRAD_IS_WORKSPACE = _GRAD_IS_WORKSPACE, True
    try:
        yield
    finally:
        _GRAD_IS_WORKSPACE = previous


def _workspace(g: torch.Tensor, p: torch.Tensor) -> bool:
    return _GRAD_IS_WORKSPACE and g is p.grad and g.is_contiguous() and not is_dtensor(g)


def _rotate(x: torch.Tensor, T: torch.Tensor, side: str) -> torch.Tensor:
    """Apply the change of basis T to the r-dim coordinate axis of x (rows for left, columns for right)."""
    return T @ x if side == "left" else x @ T.t()


def ldadam_transition(
    m: torch.Tensor, v: torch.Tensor, T: torch.Tensor, side: str, t: int, betas: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """New (m, v) after a basis change T (LDAdam rule, see module docstring); ``t`` = steps taken so far."""
    b1, b2 = betas
    bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
    m_hat, v_hat = m / bc1, v / bc2
    T = T.to(m.dtype)
    var = _rotate(v_hat - m_hat * m_hat, T * T, side)
    m_rot = _rotate(m_hat, T, side)
    # an overflowed (inf) second moment gives 0·inf / inf − inf = NaN in the rotation: the new coordinates
    # mixing it get inf, i.e. no update, as AdamW does for the overflowed coordinate itself
    inf = float("inf")
    v_new = (var + m_rot * m_rot).abs_().nan_to_num_(nan=inf, posinf=inf) * bc2
    return m_rot * bc1, v_new


class Inner:
    name = "base"
    state_keys: tuple[str, ...] = ()
    options: tuple[str, ...] = ()  # the group keys this update reads besides lr, betas, eps, correct_bias
    supports_transition = True

    def update(self, g: torch.Tensor, state: State, group: dict, p: torch.Tensor) -> tuple[torch.Tensor, float]:
        raise NotImplementedError  # pragma: no cover

    def reset(self, state: State) -> None:
        """Forget the moments (FRUGAL's ``reset_statistics``); the bias-correction clock restarts."""
        for k in (*self.state_keys, "inner_step"):
            state.pop(k, None)

    def transition(self, state: State, T: torch.Tensor, side: str, group: dict) -> None:
        raise NotImplementedError  # pragma: no cover

    def init_state(
        self, state: State, shape: tuple[int, ...], group: dict, device: torch.device, dtype: torch.dtype
    ) -> bool:
        """Allocate, before the first update, the moment buffers the first ``update`` on a gradient of
        ``shape`` would create (zeros, so the numerics are unchanged). Returns False when (some of) the
        state cannot be allocated ahead (it is then created at the first update, as without this call)."""
        return False

    def fused_step(self, p: torch.Tensor, g: torch.Tensor, state: State, group: dict) -> bool:
        """Do the whole plain step (update, p ← p − lr·c·N, weight decay) in one chunked pass and return
        True, or return False (nothing done) for the engine's unfused code."""
        return False


def _zeros(state: State, keys: tuple[str, ...], shape, device, dtype) -> None:
    for key in keys:
        if key not in state:
            state[key] = torch.zeros(shape, device=device, dtype=dtype)


def _tick(state: State) -> int:
    state["inner_step"] = t = int(state.get("inner_step", 0)) + 1
    return t


def _adam_factor(group: dict, t: int) -> float:
    if not group.get("correct_bias", True):
        return 1.0
    b1, b2 = group["betas"]
    return math.sqrt(1.0 - b2**t) / (1.0 - b1**t)


class AdamW(Inner):
    """m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², N = m/(√v + ε), c = √(1−β₂ᵗ)/(1−β₁ᵗ)."""

    name = "adamw"
    state_keys = ("exp_avg", "exp_avg_sq")

    def update(self, g, state, group, p):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        b1, b2 = group["betas"]
        t = _tick(state)
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        # m / (√v + ε) with one buffer (the gradient's under grad_workspace): bit-identical to the
        # two-temporary expression
        denom = torch.sqrt(v, out=g) if _workspace(g, p) else v.sqrt()
        denom.add_(group["eps"])
        return torch.div(m, denom, out=denom), _adam_factor(group, t)

    def init_state(self, state, shape, group, device, dtype):
        _zeros(state, self.state_keys, shape, device, dtype)
        return True

    def fused_step(self, p: torch.Tensor, g: torch.Tensor, state: State, group: dict) -> bool:
        """The plain (unprojected) step of the engine, ``update`` + p ← p − lr·c·N + weight decay, done
        in cache-sized chunks (``fused.adamw_``, bit-identical); False (nothing done) when the tensors
        are not :func:`fused.chunkable`."""
        if not fused.chunkable(p, g):
            return False
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if not fused.chunkable(p, m, v) or m.shape != g.shape or v.shape != g.shape:
            return False
        t = _tick(state)
        lr, wd = group["lr"], group["weight_decay"]
        fused.adamw_(p, g, m, v, group["betas"], group["eps"], -lr * _adam_factor(group, t),
                     -lr * wd if wd > 0.0 else None)
        return True

    def transition(self, state, T, side, group):
        t = int(state.get("inner_step", 0))
        if t == 0 or "exp_avg" not in state:
            return
        state["exp_avg"], state["exp_avg_sq"] = ldadam_transition(
            state["exp_avg"], state["exp_avg_sq"], T, side, t, group["betas"]
        )


class AdamW8bit(Inner):
    """AdamW with both moments stored as blockwise 8-bit codes + fp32 absmax per block.

    State: ``exp_avg_q``/``exp_avg_absmax`` (signed map) and ``exp_avg_sq_q``/``exp_avg_sq_absmax``
    (unsigned map). Each step dequantizes, updates in fp32, computes N, and requantizes; the weight is
    never copied.
    """

    name = "adamw8bit"
    options = ("quant_block", "min_8bit_size")
    state_keys = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax", "exp_avg", "exp_avg_sq")
    _fp32 = AdamW()

    @staticmethod
    def _small(g: torch.Tensor, group: dict) -> bool:
        return g.numel() < int(group.get("min_8bit_size", 4096))

    def _load(self, g: torch.Tensor, state: State, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg_q" not in state:
            return torch.zeros_like(g, dtype=torch.float32), torch.zeros_like(g, dtype=torch.float32)
        m = quant.dequantize_blockwise(state["exp_avg_q"], state["exp_avg_absmax"], True, g.shape, block)
        v = quant.dequantize_blockwise(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], False, g.shape, block)
        return m, v

    def _store(self, m: torch.Tensor, v: torch.Tensor, state: State, block: int) -> None:
        state["exp_avg_q"], state["exp_avg_absmax"] = quant.quantize_blockwise(m, True, block)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quant.quantize_blockwise(v, False, block)

    def init_state(self, state, shape, group, device, dtype):
        # small tensors keep fp32 moments (allocated here); the 8-bit codes of a large one are
        # re-created by every update (dequantize → update → quantize), so there is nothing to keep ahead
        if math.prod(shape) < int(group.get("min_8bit_size", 4096)):
            return self._fp32.init_state(state, shape, group, device, dtype)
        return False

    def update(self, g, state, group, p):
        if self._small(g, group):
            return self._fp32.update(g, state, group, p)
        if is_dtensor(g):
            raise NotImplementedError(
                "8-bit moments (galore_8bit, inner='adamw8bit') are not supported on FSDP2 DTensors: the "
                "blockwise codes would follow each rank's shard; use inner='adamw' (fp32 moments) under FSDP2, "
                f"or raise min_8bit_size above {g.numel()} to keep this tensor's moments fp32"
            )
        block = int(group.get("quant_block", 256))
        m, v = self._load(g, state, block)
        b1, b2 = group["betas"]
        t = _tick(state)
        gf = g.float()
        m.mul_(b1).add_(gf, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(gf, gf, value=1.0 - b2)
        N = (m / v.sqrt().add_(group["eps"])).to(g.dtype)
        self._store(m, v, state, block)
        return N, _adam_factor(group, t)

    def transition(self, state, T, side, group):
        t = int(state.get("inner_step", 0))
        if t == 0:
            return
        if "exp_avg" in state:  # small tensor, fp32 moments
            return self._fp32.transition(state, T, side, group)
        if "exp_avg_q" not in state:
            return
        block = int(group.get("quant_block", 256))
        numel = state["exp_avg_q"].numel()
        r = T.shape[0]
        shape = (r, numel // r) if side == "left" else (numel // r, r)
        m, v = self._load(torch.empty(shape, device=T.device), state, block)
        m, v = ldadam_transition(m, v, T.float(), side, t, group["betas"])
        self._store(m, v, state, block)


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square ‖x‖₂/√numel."""
    return x.norm(2) / (x.numel() ** 0.5)


def adafactor_precondition(g: torch.Tensor, state: State, t: int, decay_rate: float, eps1: float) -> torch.Tensor:
    """Adafactor's second-moment normalisation of g (Shazeer & Stern 2018, Alg. 4): V̂ = R Cᵀ/(1ᵀR), u = g/√V̂.

    β₂ₜ = 1 − t^decay_rate; for 2-D g only the row/column EMAs ``exp_avg_sq_row``/``exp_avg_sq_col``
    are stored (m + n floats), else the full ``exp_avg_sq``. Returns a new tensor u.

    Overflow: each g² is capped at ``finfo.max / max(shape)`` (|g| ≳ 1e17 in float32), so the row and
    column means and the EMAs stay finite and u stays finite for any finite g (without the cap a huge
    gradient makes the statistics inf and the row normalisation inf/inf = NaN). Ordinary gradients
    are far below the cap and unaffected.
    """
    beta2t = 1.0 - math.pow(t, decay_rate)
    cap = torch.finfo(g.dtype).max / max(g.shape, default=1)
    sq = (g * g).clamp_(max=cap).add_(eps1)
    if g.dim() == 2:
        if "exp_avg_sq_row" not in state:
            state["exp_avg_sq_row"] = g.new_zeros(g.shape[0])
            state["exp_avg_sq_col"] = g.new_zeros(g.shape[1])
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
        # clamped: a zero-gradient row next to huge ones underflows to 0 here, and rsqrt(0)·0 is NaN
        r_factor = (row / row.mean(dim=-1, keepdim=True)).clamp_(min=torch.finfo(row.dtype).tiny).rsqrt_().unsqueeze(-1)
        return r_factor * col.unsqueeze(-2).rsqrt() * g
    if "exp_avg_sq" not in state:
        state["exp_avg_sq"] = torch.zeros_like(g)
    v = state["exp_avg_sq"]
    v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
    return v.rsqrt() * g


class Adafactor(Inner):
    """Factored second moment (Shazeer & Stern 2018), explicit lr, optional β₁; N is the clipped update."""

    name = "adafactor"
    options = ("adafactor_eps", "decay_rate", "clip_threshold", "beta1", "scale_parameter")
    state_keys = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg")
    supports_transition = False

    def init_state(self, state, shape, group, device, dtype):
        if len(shape) == 2:
            _zeros(state, ("exp_avg_sq_row",), (shape[0],), device, dtype)
            _zeros(state, ("exp_avg_sq_col",), (shape[1],), device, dtype)
        else:
            _zeros(state, ("exp_avg_sq",), shape, device, dtype)
        if group.get("beta1"):
            _zeros(state, ("exp_avg",), shape, device, dtype)
        return True

    def update(self, g, state, group, p):
        eps1, eps2 = group.get("adafactor_eps", (1e-30, 1e-3))
        t = _tick(state)
        u = adafactor_precondition(g, state, t, group.get("decay_rate", -0.8), eps1)
        u.div_((rms(u) / group.get("clip_threshold", 1.0)).clamp_(min=1.0))
        beta1 = group.get("beta1")
        if beta1:
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(g)
            u = state["exp_avg"].mul_(beta1).add_(u, alpha=1.0 - beta1).clone()
        if group.get("scale_parameter", False):
            u.mul_(rms(p.detach().float()).clamp(min=eps2).to(u.dtype))
        return u, 1.0


class Lion(Inner):
    """N = sign(β₁m + (1−β₁)g); then m ← β₂m + (1−β₂)g (Chen et al. 2023)."""

    name = "lion"
    state_keys = ("exp_avg",)

    def update(self, g, state, group, p):
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(g)
        m = state["exp_avg"]
        b1, b2 = group["betas"]
        _tick(state)
        N = (m * b1 + g * (1.0 - b1)).sign_()
        m.mul_(b2).add_(g, alpha=1.0 - b2)
        return N, 1.0

    def init_state(self, state, shape, group, device, dtype):
        _zeros(state, self.state_keys, shape, device, dtype)
        return True

    def transition(self, state, T, side, group):
        if "exp_avg" in state:
            state["exp_avg"] = _rotate(state["exp_avg"], T.to(state["exp_avg"].dtype), side)


def natural_gradient(history: torch.Tensor, damping: float) -> torch.Tensor:
    """F̂⁻¹g for the empirical Fisher F̂ = λI + HᵀH, H = ``history`` (s rows: past gradients, the
    last one g itself). Woodbury's identity gives F̂⁻¹g = g/λ − Hᵀ(λI + HHᵀ)⁻¹Hg/λ, which for
    g = Hᵀe_s is Hᵀ(λI + HHᵀ)⁻¹e_s (the same identity without the cancellation of the difference):
    one s×s Cholesky solve, in float64 on H divided by a power of two near max|H| (exact, undone at
    the end), so any finite gradient gives a finite direction; a damping below the Gram matrix's
    float64 resolution (1e-12·trace) is raised to it. Returns a float64 vector."""
    H = history.double()
    scale = power_of_two_scale(H)
    H = H / scale
    gram = H @ H.t()
    lam = max(float(damping) / scale**2, 1e-12 * float(gram.diagonal().sum()))
    e = torch.zeros(H.shape[0], 1, dtype=H.dtype, device=H.device)
    e[-1] = 1.0
    L = torch.linalg.cholesky_ex(gram + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)).L
    return (H.t() @ torch.cholesky_solve(e, L)).squeeze(1) / scale


class NaturalAdamW(Inner):
    """AdamW on the natural gradient (λI + HᵀH)⁻¹g of the last s = ``natural_history`` gradients
    (``natural_gradient``). State adds ``grad_history`` (s × numel(g), a ring buffer, in g's dtype)
    and ``history_count`` (gradients seen); a basis change rotates the stored gradients like the
    first moment."""

    name = "natural_adamw"
    options = ("natural_history", "natural_damping")
    state_keys = ("exp_avg", "exp_avg_sq", "grad_history", "history_count")
    _adamw = AdamW()

    def _push(self, g: torch.Tensor, state: State, group: dict) -> torch.Tensor:
        size = int(group.get("natural_history", 20))
        flat = full(g).reshape(-1)  # FSDP2: the gathered gradient, the same history on every rank
        if "grad_history" not in state:
            state["grad_history"] = flat.new_zeros(size, flat.numel())
            state["history_count"] = 0
        count = int(state["history_count"])
        state["grad_history"][count % size].copy_(flat)
        state["history_count"] = count + 1
        rows = torch.arange(count + 1 - min(count + 1, size), count + 1, device=flat.device) % size
        return state["grad_history"].index_select(0, rows)  # oldest first, g last

    def update(self, g, state, group, p):
        history = self._push(g, state, group)
        direction = natural_gradient(history, float(group.get("natural_damping", 1e-3)))
        direction = direction.to(g.dtype).reshape(g.shape)
        if is_dtensor(g):  # back to g's sharding (every rank holds the same full direction)
            direction = like(direction, g).redistribute(g.device_mesh, g.placements)
        return self._adamw.update(direction, state, group, p)

    def init_state(self, state, shape, group, device, dtype):
        size = int(group.get("natural_history", 20))
        if "grad_history" not in state:
            state["grad_history"] = torch.zeros(size, math.prod(shape), device=device, dtype=dtype)
            state["history_count"] = 0
        return self._adamw.init_state(state, shape, group, device, dtype)

    def transition(self, state, T, side, group):
        self._adamw.transition(state, T, side, group)
        count = int(state.get("history_count", 0))
        if count == 0:
            return
        H = state["grad_history"]
        r = T.shape[0]
        shape = (H.shape[0], r, H.shape[1] // r) if side == "left" else (H.shape[0], H.shape[1] // r, r)
        rows = H.reshape(shape)
        T = full(T).to(H.dtype)
        H.copy_((T @ rows if side == "left" else rows @ T.t()).reshape(H.shape))


_CLASSES: dict[str, Inner] = {
    inner.name: inner for inner in (AdamW(), AdamW8bit(), Adafactor(), Lion(), NaturalAdamW())
}
#: The inner-update names.
INNERS = tuple(_CLASSES)
#: Every option some inner update reads.
INNER_OPTIONS = tuple(sorted({o for inner in _CLASSES.values() for o in inner.options}))


def get_inner(name: str) -> Inner:
    """The inner update ``name`` (one of ``INNERS``); stateless, shared."""
    return _CLASSES[choice("inner", name, INNERS)]
