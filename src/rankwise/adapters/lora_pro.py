"""LoRA-Pro (Wang & Liang 2024, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025).

With ΔW = s·B·A (B: m×r, A: r×n), one LoRA step changes W by −η·g̃ with the *equivalent gradient*
g̃ = s(B·g_A + g_B·A). Plain LoRA's g_A = s·BᵀG, g_B = s·G·Aᵀ (G the full gradient of W) give
g̃ = s²(BBᵀG + GAᵀA), far from G. LoRA-Pro (Sec. 2) chooses the g_A, g_B whose g̃ is the
least-squares closest to G, which only needs the LoRA gradients:

    g_A = (1/s²)(BᵀB)⁻¹·g_A^lora + X·A
    g_B = (1/s²)(I − B(BᵀB)⁻¹Bᵀ)·g_B^lora·(AAᵀ)⁻¹ − B·X

so g̃ = P_B·G + (I − P_B)·G·P_A (P_B, P_A the projections onto B's columns and A's rows). Every X
gives that g̃; LoRA-Pro's X keeps g_A, g_B closest to the LoRA gradients: the
Sylvester equation BᵀB·X + X·AAᵀ = −(1/s²)(BᵀB)⁻¹·g_A^lora·Aᵀ, solved here exactly from the two
r×r eigendecompositions. ``eps`` adds eps·I to BᵀB and AAᵀ (B = 0 at init).

:class:`LoRAProAdamW` is the paper's AdamW form: Adam's moments are kept for the
full m×n equivalent gradient (so its state is full-size, as in the paper), and the Adam direction D
is mapped back to the factors by the same closed form (G := D). Every other trainable parameter
(a classification head, biases) takes a plain AdamW step.

The adapter is plain LoRA (PEFT LoRA export); ``rankwise.train.train`` builds :class:`LoRAProAdamW`
by itself (``config.training_optimizer``); in a hand-written loop use ``lora_pro_optimizer(model, lr=...)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checks import beta_pair, non_negative, number
from ..shards import full, is_dtensor, write_full_
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, adapter_layers, register


def solve_sylvester(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """X with P·X + X·Q = C for symmetric positive (semi-)definite P, Q: with P = UΛUᵀ, Q = VMVᵀ,
    X = U[(UᵀCV)_ij / (λ_i + μ_j)]Vᵀ."""
    lam, u = torch.linalg.eigh(p)
    mu, v = torch.linalg.eigh(q)
    return u @ ((u.T @ c @ v) / (lam[:, None] + mu[None, :])) @ v.T


def lora_pro_gradients(
    a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, scale: float, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's adjusted (g_A, g_B) from the LoRA gradients (module doc): s(B·g_A + g_B·A) is the
    projection of the full gradient onto {B·X + Y·A}, and (g_A, g_B) the closest such pair to the LoRA one."""
    s2 = float(scale) ** 2
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    btb, aat = b.T @ b + eps * eye, a @ a.T + eps * eye
    btb_inv_ga = torch.linalg.solve(btb, grad_a)  # (BᵀB)⁻¹ g_A^lora
    gb_aat_inv = torch.linalg.solve(aat, grad_b.T).T  # g_B^lora (AAᵀ)⁻¹ (AAᵀ symmetric)
    outside_b = gb_aat_inv - b @ torch.linalg.solve(btb, b.T @ gb_aat_inv)  # (I − P_B)·...
    x = solve_sylvester(btb, aat, -(btb_inv_ga @ a.T) / s2)
    return btb_inv_ga / s2 + x @ a, outside_b / s2 - b @ x


def equivalent_gradient(
    a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """g̃ = s(B·g_A + g_B·A): the change of W per unit step of the factors (m×n)."""
    return scale * (b @ grad_a + grad_b @ a)


def adam_direction(state: dict[str, Any], grad: torch.Tensor, betas: tuple[float, float], eps: float) -> torch.Tensor:
    """Adam's bias-corrected m̂/(√v̂ + ε) after adding ``grad`` to the moments in ``state``."""
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    state["step"] += 1
    t = float(state["step"])
    b1, b2 = betas
    state["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
    m_hat = state["exp_avg"] / (1 - b1**t)
    v_hat = state["exp_avg_sq"] / (1 - b2**t)
    return m_hat / (v_hat.sqrt() + eps)


def pair_groups(params: Iterable[torch.Tensor], pairs: Sequence[tuple[Any, ...]], label: str, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float) -> tuple[list[Any], list[Any]]:
    """Checks an AdamW-style pair optimizer's arguments; returns (the pairs' A, B tensors in order, the other
    parameters of ``params``), for the group of the pairs and the plain-AdamW group (LoRA-Pro, LoFT)."""
    number("lr", lr, 0.0, low_open=True, what="> 0 and finite")
    beta_pair("betas", betas)
    non_negative("eps", eps)
    non_negative("weight_decay", weight_decay)
    if not pairs:
        raise ValueError(f"pairs is empty: {label} needs the (A, B, ...) of at least one LoRA layer")
    paired = [t for pair in pairs for t in pair[:2]]
    ids = {id(t) for t in paired}
    return paired, [p for p in params if id(p) not in ids]


@contextlib.contextmanager
def gathered(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Iterator[None]:
    """Under FSDP2, while a pair step runs: ``group``'s sharded factors are replaced by full plain stand-ins (values
    and reduced gradients gathered, the optimizer's state moved onto them), since the step's r×r products and
    inverses (AᵀA, B Bᵀ, ...) span a factor's whole rows; on exit each rank writes back its rows and the state
    (whole, the same on every rank) returns to the parameters. Unsharded: nothing changes."""
    params = group["params"]
    if not any(is_dtensor(p) for p in params):
        yield
        return
    stand_ins = []
    for p in params:
        q = full(p.detach()).clone().requires_grad_(p.requires_grad)
        q.grad = None if p.grad is None else full(p.grad)
        if p in optimizer.state:
            optimizer.state[q] = optimizer.state.pop(p)
        stand_ins.append(q)
    group["params"] = stand_ins
    try:
        yield
    finally:
        group["params"] = params
        for p, q in zip(params, stand_ins, strict=True):
            write_full_(p, q.detach())
            if q in optimizer.state:
                optimizer.state[p] = optimizer.state.pop(q)


class PairOptimizer(torch.optim.Optimizer):
    """Base of the pair optimizers (LoRA-Pro, LoFT, RiemannLoRA), whose state is computed in float32 whatever the
    factors' dtype. ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its parameter's
    dtype, which would round bf16 factors' moments on a resume (no longer the uninterrupted run) and give float64
    factors' moments another dtype than the step's: here the loaded state keeps the dtypes it was saved with."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"]), strict=True))
        for i, saved in state_dict["state"].items():
            state = self.state[params[i]]
            for key, value in saved.items():
                if torch.is_tensor(value) and key in state and state[key].dtype != value.dtype:
                    state[key] = value.to(device=state[key].device, copy=True)


def paired_step(optimizer: torch.optim.Optimizer, closure: Any, key: str,
                pair_group: Callable[[dict[str, Any]], None]) -> Any:
    """One step of an optimizer built by :func:`pair_groups` (LoRA-Pro, LoFT, RiemannLoRA): ``pair_group(group)``
    for the groups flagged ``group[key]``, a plain AdamW step (decoupled weight decay) for the others."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    for group in optimizer.param_groups:
        if group[key]:
            with gathered(optimizer, group):
                pair_group(group)
            continue
        for p in group["params"]:
            if p.grad is not None:
                direction = adam_direction(optimizer.state[p], p.grad, group["betas"], group["eps"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(direction, alpha=-group["lr"])
    return loss


class LoRAProAdamW(PairOptimizer):
    """LoRA-Pro with AdamW (module doc). ``pairs``: ``(A, B, s)`` of every LoRA layer, also listed in
    ``params``; the other parameters of ``params`` take plain AdamW steps. ``pro_eps`` damps BᵀB, AAᵀ."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        pairs: Sequence[tuple[nn.Parameter, nn.Parameter, float]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        pro_eps: float = 1e-8,
    ) -> None:
        non_negative("pro_eps", pro_eps)
        paired, rest = pair_groups(params, pairs, "LoRA-Pro", lr, betas, eps, weight_decay)
        groups: list[dict[str, Any]] = [{"params": paired, "scales": [float(s) for _, _, s in pairs],
                                         "lora_pro": True}]
        if rest:
            groups.append({"params": rest, "scales": [], "lora_pro": False})
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "pro_eps": pro_eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        return paired_step(self, closure, "lora_pro", self._pair_group)

    def _pair_group(self, group: dict[str, Any]) -> None:
        for i, s in enumerate(group["scales"]):
            self._pair_step(group["params"][2 * i], group["params"][2 * i + 1], s, group)

    def _pair_step(self, a: torch.Tensor, b: torch.Tensor, s: float, group: dict[str, Any]) -> None:
        if a.grad is None or b.grad is None:
            return
        af, bf = a.detach().float(), b.detach().float()
        eps = group["pro_eps"]
        g_a, g_b = lora_pro_gradients(af, bf, a.grad.float(), b.grad.float(), s, eps)
        full = equivalent_gradient(af, bf, g_a, g_b, s)  # P_B G + (I − P_B) G P_A
        d = adam_direction(self.state[a], full, group["betas"], group["eps"])
        d_a, d_b = lora_pro_gradients(af, bf, s * (bf.T @ d), s * (d @ af.T), s, eps)  # G := D
        self._apply(a, d_a.to(a.dtype), group)
        self._apply(b, d_b.to(b.dtype), group)

    @staticmethod
    def _apply(p: torch.Tensor, direction: torch.Tensor, group: dict[str, Any]) -> None:
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-group["lr"])


@dataclass
class LoRAProConfig(LoRAConfig):
    """LoRA options plus ``pro_eps``, the damping eps·I added to BᵀB and AAᵀ before they are inverted."""

    pro_eps: float = 1e-8

    def validate(self) -> None:
        super().validate()
        non_negative("pro_eps", self.pro_eps)

    def training_optimizer(self, model: nn.Module, adapter_name: str, lr: float, weight_decay: float = 0.0,
                           **kwargs: Any) -> torch.optim.Optimizer:
        """What ``rankwise.train.train`` trains this adapter with: :func:`lora_pro_optimizer`."""
        return lora_pro_optimizer(model, lr=lr, weight_decay=weight_decay, adapter_name=adapter_name,
                                  **{"pro_eps": self.pro_eps, **kwargs})


def lora_layers_and_params(model: nn.Module, adapter_name: str | None, method: str,
                           label: str) -> tuple[list[LoRALayer], list[nn.Parameter]]:
    """The LoRA layers of adapter ``adapter_name`` and every trainable parameter of ``model``, for an
    optimizer that treats the LoRA pairs specially (LoRA-Pro, LoFT); a ValueError naming ``method`` if none."""
    layers = [layer for _, layer in adapter_layers(model, adapter_name) if isinstance(layer, LoRALayer)]
    if not layers:
        raise ValueError(f"model has no LoRA layers to train with {label} (rw.adapt(model, '{method}') first)")
    return layers, [p for p in model.parameters() if p.requires_grad]


def lora_pro_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                       adapter_name: str | None = None, **kwargs: Any) -> LoRAProAdamW:
    """:class:`~rankwise.optim.lora_pro.LoRAProAdamW` over every trainable parameter of ``model``, the
    ``(lora_A, lora_B, scale)`` of its LoRA layers (of adapter ``adapter_name``) as the adjusted pairs.
    ``kwargs``: ``betas``, ``eps``, ``pro_eps``."""
    layers, params = lora_layers_and_params(model, adapter_name, "lora_pro", "LoRA-Pro")
    pairs = [(layer.lora_A, layer.lora_B, layer.scale) for layer in layers]
    return LoRAProAdamW(params, pairs, lr=lr, weight_decay=weight_decay, **kwargs)


register(
    MethodSpec(
        "lora_pro",
        "training-dynamics",
        "Wang & Liang 2024, LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
        LoRAProConfig,
        LoRALayer,
        summary="plain LoRA; g_A, g_B replaced by the closed form whose s(B·g_A + g_B·A) best approximates the "
                "full gradient (Sylvester X), AdamW on that equivalent gradient (the loop builds it)",
    )
)
