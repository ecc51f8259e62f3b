"""Cuttlefish (Wang et al. 2023, "Cuttlefish: Low-Rank Model Training without All The Tuning",
MLSys 2023; reference code github.com/hwang595/Cuttlefish).

Training starts full-rank. Every ``interval`` steps (the paper: every epoch) the controller measures
each target layer's stable rank ``sr(W) = ⌊‖W‖_F² / ‖W‖₂²⌋``. A layer becomes *stable* (for good)
once more than ``window`` measurements exist and the mean of ``|∇ EMA(sr)|`` over the last ``tail``
points is ≤ ``tolerance`` (EMA with weight 2/(window+1), ∇ by central differences as
``numpy.gradient``). When every layer is stable the model switches: each layer is factorized
``W ≈ U V`` (truncated SVD, √σ split) at the **scaled stable rank** ``k = min(full, ⌈sr(W)·ξ⌉)``,
``ξ = full / sr(W_init)`` fixed from the weights at the start (the paper's correction: the stable
rank of a random init is far below the rank a layer needs), and training continues on U and V.

Usage::

    model = rw.sparsify(model, "cuttlefish")          # marks the targets; they stay nn.Linear
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cf = Cuttlefish(model, opt, interval=50)          # ξ measured now, on the initial weights
    rw.train(model, data, cfg, optimizer=opt, callbacks=[cf])   # or cf.step() after opt.step()

Departures from the reference: the first layers the paper keeps full-rank (chosen by profiling a
layer's factorized speed-up) are whatever the ``targets`` leave out; the threshold scaler for the
last one or two unstable layers (1.0 for its transformer runs) is not applied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import checks
from ..callbacks import RankController, TrainState, replace_in_optimizer
from ..linalg import svd_precision
from ..shards import full, is_dtensor, require_resharding, shard_replacement
from ..targets import replace_module
from .layers import FactorizedLinear


def stable_rank(weight: torch.Tensor) -> int:
    """``⌊‖W‖_F² / σ_max(W)²⌋`` (at least 1); of the gathered W under FSDP2."""
    s = torch.linalg.svdvals(svd_precision(full(weight.detach())))
    if float(s[0]) == 0.0:
        return 1
    return max(1, int(float((s**2).sum()) / float(s[0]) ** 2))


def ema(values: list[float], span: int) -> torch.Tensor:
    """Exponential moving average with weight ``2/(span+1)``, started at the first value."""
    w = 2.0 / (span + 1)
    out = [float(values[0])]
    for v in values[1:]:
        out.append(w * float(v) + (1 - w) * out[-1])
    return torch.tensor(out, dtype=torch.float64)


def is_stable(history: list[int], window: int, tail: int, tolerance: float) -> bool:
    """Cuttlefish's detector: more than ``window`` measurements and mean |∇ EMA| over the last
    ``tail`` points ≤ ``tolerance``."""
    if len(history) <= window:
        return False
    (slope,) = torch.gradient(ema(history, window))
    return float(slope.abs()[-tail:].mean()) <= tolerance


def _whole(lin: nn.Linear) -> nn.Linear:
    """``lin`` itself, or under FSDP2 an ``nn.Linear`` holding its gathered weight and bias."""
    if not is_dtensor(lin.weight):
        return lin
    out = nn.utils.skip_init(nn.Linear, lin.in_features, lin.out_features, lin.bias is not None,
                             device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(full(getattr(lin, name).detach()))
    return out


class Cuttlefish(RankController):
    """Full-rank training until every target layer's stable rank settles, then factorized training
    at the scaled stable ranks (see the module docstring). ``optimizer`` must hold the target
    weights; at the switch each weight is replaced in its param group by the new U and V (fresh
    state), the bias keeps its Parameter and state."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        interval: int = 100,
        window: int = 15,
        tail: int = 11,
        tolerance: float = 0.1,
        scaled: bool = True,
    ) -> None:
        state = getattr(model, "rankwise_sparse", None)
        if state is None or state.method != "cuttlefish":
            raise ValueError("model is not prepared for Cuttlefish; call rw.sparsify(model, 'cuttlefish') first")
        self.interval = checks.integer("interval", interval, 1, what="a positive integer")
        self.window = checks.integer("window", window, 1, what="a positive integer")
        self.tail = checks.integer("tail", tail, 1, what="a positive integer")
        self.tolerance = checks.non_negative("tolerance", tolerance)
        self.scaled = checks.choice("scaled", scaled, (True, False))
        self.model, self.optimizer = model, optimizer
        require_resharding(model, "cuttlefish")  # its switch re-shards every target layer
        self.names: list[str] = list(state.layers)
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name in self.names:
            if id(model.get_submodule(name).weight) not in in_opt:
                raise ValueError(f"optimizer must hold the weight of every Cuttlefish layer ('{name}' is missing)")
        self.scale = {n: self._full(n) / stable_rank(model.get_submodule(n).weight) for n in self.names}
        self.steps = 0
        self.history: dict[str, list[int]] = {n: [] for n in self.names}
        self.stable: dict[str, bool] = dict.fromkeys(self.names, False)
        self.ranks: dict[str, int] = {}
        self.switch_step: int | None = None

    def _full(self, name: str) -> int:
        lin = self.model.get_submodule(name)
        return min(lin.in_features, lin.out_features)

    def on_train_begin(self, state: TrainState) -> None:
        if state.optimizer is not self.optimizer:
            raise ValueError("Cuttlefish swaps parameters in the optimizer it was built with: pass that one to "
                             "train(..., optimizer=...)")

    def step(self) -> bool:
        """Count one optimizer step; every ``interval`` steps measure, and switch once all are stable.
        True when this step switched."""
        self.steps += 1
        if self.switch_step is not None or self.steps % self.interval:
            return False
        for name in self.names:
            self.history[name].append(stable_rank(self.model.get_submodule(name).weight))
            if not self.stable[name]:
                self.stable[name] = is_stable(self.history[name], self.window, self.tail, self.tolerance)
        if not all(self.stable.values()):
            return False
        self.switch({n: self.target_rank(n) for n in self.names})
        self.switch_step = self.steps
        return True

    def target_rank(self, name: str) -> int:
        """``min(full, ⌈sr·ξ⌉)`` (scaled) or ``min(full, sr)`` from the last measured stable rank."""
        sr = self.history[name][-1]
        k = math.ceil(sr * self.scale[name]) if self.scaled else sr
        return min(self._full(name), k)

    @torch.no_grad()
    def switch(self, ranks: dict[str, int]) -> None:
        """Factorize every layer at ``ranks`` and put U, V in the weight's place in the optimizer. Under
        FSDP2 the SVD is of the gathered weight and U, V are sharded into the layer's parameter group."""
        factors = {}
        for name in self.names:
            lin = self.model.get_submodule(name)
            fac = FactorizedLinear.from_linear(_whole(lin), ranks[name])
            # the same bias Parameter: its optimizer state carries on
            shard_replacement(self.model, lin, fac, {"bias": lin.bias} if lin.bias is not None else {})
            replace_module(self.model, name, fac)
            factors[lin.weight] = [fac.U, fac.V]
        replace_in_optimizer(self.optimizer, factors)
        self.ranks = dict(ranks)

    def before_load(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """A resume past the switch: factorize at the checkpoint's ranks first, so the tensors and
        the optimizer state fit (the values are then loaded over the factors)."""
        if self.switch_step is None and f"{self.names[0]}.U" in tensors:
            self.switch({n: int(tensors[f"{n}.U"].shape[1]) for n in self.names})

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "history": {n: list(h) for n, h in self.history.items()},
                "stable": dict(self.stable), "ranks": dict(self.ranks), "scale": dict(self.scale),
                "switch_step": self.switch_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state["history"]) != sorted(self.names):
            raise ValueError("Cuttlefish state: its layers differ from this model's")
        self.steps, self.switch_step = int(state["steps"]), state["switch_step"]
        self.history = {n: [int(v) for v in h] for n, h in state["history"].items()}
        self.stable = {n: bool(v) for n, v in state["stable"].items()}
        self.ranks = {n: int(v) for n, v in state["ranks"].items()}
        self.scale = {n: float(v) for n, v in state["scale"].items()}
