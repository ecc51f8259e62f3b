"""BA-LoRA (Chang et al. 2024, "BA-LoRA: Bias-Alleviating Low-Rank Adaptation to Mitigate Catastrophic
Inheritance in Large Language Models").

LoRA whose training loss adds three regularisers on the output logits Z (rows: the labelled
positions, labels ≠ −100) of the adapted model, with Z₀ those of the original model (adapters off):

    consistency  L_C = T²·KL(softmax(Z₀/T) ‖ softmax(Z/T))     (mean over rows)
    diversity    L_D = −mean_rows H(softmax(Z))                 (maximise output entropy)
    SVD          L_S = −Σ_{i≤k} σ_i(Z) / ‖Z‖                     (‖Z‖ = Σσ_i, or ‖Z‖_F with ``svd_frob_norm``)

    loss = task + λ₁·L_C + λ₂·L_D + λ₃·L_S

Formulas and defaults (λ = 0.025, 0.005, 0.005; k = 10; T = 2; Frobenius norm; PiSSA init) are the
official code's and run script (github.com/llm172/BA-LoRA), read for the math; its λ schedules
(cosine / two-phase), adaptive λ₁ and top-k entropy are not included. As there, the label mask is
applied to the logits unshifted. :class:`BALoRARegularizers` (the loop callback, attached by
``config.training_callbacks``) adds the terms to ``model(**batch).loss`` through a forward hook while the
model trains, so they reach any loop that uses the model's loss (a custom ``loss_fn`` that ignores
``outputs.loss`` does not get them). With λ₁ = λ₂ = λ₃ = 0 it is LoRA. Exports as PEFT LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..callbacks import Callback, TrainState
from ..checks import integer, non_negative, positive
from ..shards import gather_rows
from .lora import LoRAConfig, LoRALayer
from .ops import adapters_disabled
from .registry import MethodSpec, register


@dataclass
class BALoRAConfig(LoRAConfig):
    """LoRA options plus the regulariser weights λ₁ (consistency), λ₂ (diversity), λ₃ (SVD), the SVD's
    ``svd_k``, the consistency temperature ``distill_temp`` and ``svd_frob_norm``; PiSSA init by default."""

    init: str = "pissa"
    lambda1: float = 0.025
    lambda2: float = 0.005
    lambda3: float = 0.005
    svd_k: int = 10
    distill_temp: float = 2.0
    svd_frob_norm: bool = True

    def validate(self) -> None:
        super().validate()
        for name in ("lambda1", "lambda2", "lambda3"):
            non_negative(name, getattr(self, name))
        integer("svd_k", self.svd_k, 1)
        positive("distill_temp", self.distill_temp)
        if not isinstance(self.svd_frob_norm, bool):
            raise ValueError(f"svd_frob_norm={self.svd_frob_norm!r} must be True or False")

    def training_callbacks(self, model: nn.Module, adapter_name: str, optimizer: Any = None) -> list[Callback]:
        """What ``rankwise.train.train`` runs with this adapter: the regularisers added to the model's loss."""
        return [BALoRARegularizers(model, self)]


def consistency(logits: torch.Tensor, base_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """T²·mean_rows KL(softmax(Z₀/T) ‖ softmax(Z/T))."""
    log_p = F.log_softmax(logits.float() / temp, dim=-1)
    q = F.softmax(base_logits.float() / temp, dim=-1)
    return F.kl_div(log_p, q, reduction="none").sum(-1).mean() * temp**2


def diversity(logits: torch.Tensor) -> torch.Tensor:
    """−mean_rows H(softmax(Z)): lower when the predictions are more spread out."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * log_p).sum(-1).mean()


def svd_term(logits: torch.Tensor, k: int, frobenius: bool) -> torch.Tensor:
    """−Σ_{i≤k} σ_i(Z)/‖Z‖ (nuclear norm, or Frobenius with ``frobenius``)."""
    s = torch.linalg.svdvals(logits.float())
    norm = s.pow(2).sum().sqrt() if frobenius else s.sum()
    return -s[:k].sum() / norm.clamp_min(1e-8)


def regularizers(logits: torch.Tensor, base_logits: torch.Tensor | None, labels: torch.Tensor,
                 cfg: BALoRAConfig, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The weighted terms {"consistency", "diversity", "svd"} over the rows with labels ≠ −100 (a term with
    λ = 0 is left out). ``model`` sharded with FSDP2: the SVD term is of the whole batch's rows, gathered
    from every rank (:func:`rankwise.shards.gather_rows`; the means are per rank, as the task loss's)."""
    mask = labels != -100
    z = logits[mask]
    terms: dict[str, torch.Tensor] = {}
    whole = z if cfg.lambda3 == 0 or model is None else gather_rows(z, model)  # every rank gathers, rows or not
    if z.shape[0] > 0 and cfg.lambda1 > 0 and base_logits is not None:
        terms["consistency"] = cfg.lambda1 * consistency(z, base_logits[mask], cfg.distill_temp)
    if z.shape[0] > 0 and cfg.lambda2 > 0:
        terms["diversity"] = cfg.lambda2 * diversity(z)
    if cfg.lambda3 > 0 and min(whole.shape) > 1:
        terms["svd"] = cfg.lambda3 * svd_term(whole, cfg.svd_k, cfg.svd_frob_norm)
    return terms
    if cfg.lambda1 > 0 and base_logits is not None:
        terms["consistency"] = cfg.lambda1 * consistency(z, base_logits[mask], cfg.distill_temp)
    if cfg.lambda2 > 0:
        terms["diversity"] = cfg.lambda2 * diversity(z)
    if cfg.lambda3 > 0 and min(z.shape) > 1:
        terms["svd"] = cfg.lambda3 * svd_term(z if model is None else gather_rows(z, model), cfg.svd_k,
                                              cfg.svd_frob_norm)
    return terms


class BALoRARegularizers(Callback):
    """Adds BA-LoRA's regularisers to ``outputs.loss`` of every training forward with labels (module doc).
    ``install()`` / ``remove()`` in a hand-written loop; ``last`` holds the latest weighted terms as floats."""

    def __init__(self, model: nn.Module, config: BALoRAConfig) -> None:
        self.model, self.config = model, config
        self._handles: list[Any] = []
        self._inside = False
        self._base: torch.Tensor | None = None
        self.last: dict[str, float] = {}

    def install(self) -> None:
        if not self._handles:
            self._handles = [self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                             self.model.register_forward_hook(self._hook, with_kwargs=True)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _active(self, module: nn.Module, kwargs: dict[str, Any]) -> bool:
        return not self._inside and module.training and kwargs.get("labels") is not None

    def _base_logits(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """The original model's logits on the same inputs (adapters off, eval mode, no gradient)."""
        inputs = {k: v for k, v in kwargs.items() if k != "labels"}
        self._inside = True
        self.model.eval()
        try:
            with torch.no_grad(), adapters_disabled(self.model):
                return self.model(**inputs).logits
        finally:
            self.model.train()
            self._inside = False

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Z₀ before the adapted forward: switching the adapters off writes the head's original values in
        place, which must not happen while the adapted forward's graph holds them."""
        self._base = self._base_logits(kwargs) if self._active(module, kwargs) and self.config.lambda1 > 0 else None

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not self._active(module, kwargs) or getattr(output, "loss", None) is None:
            return output
        base, self._base = self._base, None
        terms = regularizers(output.logits, base, kwargs["labels"], self.config, self.model)
        if terms:
            output["loss"] = output.loss + sum(terms.values())
        self.last = {k: float(v.detach()) for k, v in terms.items()}
        return output

    def on_train_begin(self, state: TrainState) -> None:
        self.install()

    def on_after_backward(self, state: TrainState) -> None:
        state.log.update({f"ba_{k}": v for k, v in self.last.items()})

    def on_train_end(self, state: TrainState) -> None:
        self.remove()


register(
    MethodSpec(
        "ba_lora",
        "training-dynamics",
        "Chang et al. 2024, BA-LoRA: Bias-Alleviating Low-Rank Adaptation to Mitigate Catastrophic Inheritance "
        "in Large Language Models",
        BALoRAConfig,
        LoRALayer,
        summary="LoRA (PiSSA init) + λ₁·T²KL(base‖adapted) + λ₂·(−entropy) + λ₃·(−top-k σ share) of the output "
                "logits, added to the model's loss while training",
    )
)
