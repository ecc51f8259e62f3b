"""Maestro — trainable low-rank ordered decomposition, LoD (Horváth et al. 2024, "Maestro:
Uncovering Low-Rank Structures via Trainable Decomposition", ICML 2024; reference code
github.com/SamuelHorvath/Maestro-LoD).

Each target layer becomes ``W = U Vᵀ`` (here ``U`` out×m and ``V`` m×in stored as ``Vᵀ``), m the
full inner rank, initialized from the SVD with the √σ split. Training minimizes (§3, Eq. 3-5)

    L(full) + E_{(i, b)} L(layer i truncated to its first b components) + λ Σ_i Σ_j (‖U_{:,j:}‖ + ‖V_{:,j:}‖)

where (i, b) is drawn uniformly over all (layer, width) pairs — the "one layer at a time" ordered
dropout sampler the paper uses — and the last term is the hierarchical group lasso (‖·_{j:}‖ is
the norm of components j..m, so later components are pushed to zero first). Progressive shrinking
drops components whose importance ``‖U_{:,j}‖·‖V_{:,j}‖`` falls below a threshold. On a linear map
with isotropic inputs the minimizer of the sampled objective is the SVD, ordered by singular value
(Thm. 3.2), so truncating to the first k components is the best rank-k approximation.

Usage::

    rw.sparsify(model, "maestro")
    maestro = Maestro(model, lasso=1e-4)
    loss = maestro.loss(lambda: model(**batch).loss)   # full + sampled truncation + group lasso
    loss.backward(); opt.step(); maestro.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..callbacks import RankController
from ..shards import full
from ..targets import replace_module
from .layers import FactorizedLinear, check_linear


class MaestroLinear(FactorizedLinear):
    """A :class:`FactorizedLinear` whose components are ordered; ``width`` truncates the forward to
    the first ``width`` kept components, ``keep`` (a persistent bool buffer) marks components not
    removed by progressive shrinking."""

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        rank = min(in_features, out_features) if rank is None else rank
        super().__init__(in_features, out_features, rank, bias, device=device, dtype=dtype)
        self.register_buffer("keep", torch.ones(rank, dtype=torch.bool, device=device))
        self.width: int | None = None  # sampled truncation for the current forward (None = all kept)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None) -> MaestroLinear:
        check_linear(linear)
        rank = None if rank is None else checks.rank("rank", rank, min(linear.out_features, linear.in_features))
        base = FactorizedLinear.from_linear(linear, rank)
        layer = cls(linear.in_features, linear.out_features, base.rank, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.load_state_dict({**base.state_dict(), "keep": layer.keep})
        return layer

    @property
    def kept(self) -> int:
        """Number of components left after progressive shrinking."""
        return int(self.keep.sum())

    def factors(self, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) restricted to the kept components, truncated to the first ``width`` of them."""
        return self._select(self.U, self.V, width)

    def _select(self, u: torch.Tensor, v: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = (u, v) if bool(self.keep.all()) else (u[:, self.keep], v[self.keep])
        return (u, v) if width is None else (u[:, :width], v[:width])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.factors(self.width)
        if u.shape[1] == 0:
            out = x.new_zeros(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        return F.linear(F.linear(x, v), u, self.bias)

    def dense_weight(self, width: int | None = None) -> torch.Tensor:
        u, v = self.factors(width)
        return u @ v

    def importance(self) -> torch.Tensor:
        """``‖U_{:,j}‖·‖V_{j,:}‖`` per component (the magnitude of the rank-1 term u_j v_jᵀ)."""
        u, v = full(self.U.detach()), full(self.V.detach())  # gathered under FSDP2
        return u.norm(dim=0) * v.norm(dim=1)

    def group_lasso(self, hierarchical: bool = True) -> torch.Tensor:
        """Σ_j ‖U_{:,j:}‖_F + ‖V_{j:,:}‖_F (hierarchical: tail norms) or Σ_j ‖U_{:,j}‖ + ‖V_{j,:}‖. Under FSDP2
        of the gathered factors (``full_tensor`` is differentiable: each rank's gradient is its rows')."""
        u, v = self._select(full(self.U), full(self.V))
        if hierarchical:
            tail_u = u.pow(2).sum(0).flip(0).cumsum(0).flip(0)
            tail_v = v.pow(2).sum(1).flip(0).cumsum(0).flip(0)
            return (tail_u + 1e-30).sqrt().sum() + (tail_v + 1e-30).sqrt().sum()
        return u.norm(dim=0).sum() + v.norm(dim=1).sum()

    @torch.no_grad()
    def shrink(self, threshold: float) -> int:
        """Progressive shrinking: drop kept components with importance < ``threshold`` (at least one stays)."""
        low = (self.importance() < threshold) & self.keep
        if int((self.keep & ~low).sum()) == 0:
            low[int(torch.nonzero(self.keep)[0])] = False
        self.keep &= ~low
        return self.kept

    @torch.no_grad()
    def to_factorized(self, width: int | None = None) -> FactorizedLinear:
        """The first ``width`` kept components as a plain :class:`FactorizedLinear` (deployment)."""
        u, v = self.factors(width)
        out = FactorizedLinear(self.in_features, self.out_features, u.shape[1], self.bias is not None,
                               device=u.device, dtype=u.dtype)
        out.U.copy_(u)
        out.V.copy_(v)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kept={self.kept}"


class Maestro(RankController):
    """LoD training helper: sampled truncation, group lasso and progressive shrinking. In
    ``rankwise.train.train`` pass it as a callback (shrinking) and its objective as the loss:
    ``loss_fn=lambda m, b: maestro.loss(lambda: default_loss(m, b))``."""

    def __init__(
        self,
        model: nn.Module,
        lasso: float = 0.0,
        hierarchical: bool = True,
        full_pass: bool = True,
        shrink_threshold: float = 0.0,
        shrink_every: int = 0,
        seed: int = 0,
    ) -> None:
        checks.non_negative("lasso", lasso)
        checks.non_negative("shrink_threshold", shrink_threshold)
        checks.integer("shrink_every", shrink_every, 0)  # 0 = never
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MaestroLinear)]
        if not self.layers:
            raise ValueError("model has no MaestroLinear layers; call rw.sparsify(model, 'maestro') first")
        self.model = model
        self.lasso, self.hierarchical, self.full_pass = float(lasso), hierarchical, full_pass
        self.shrink_threshold, self.shrink_every = float(shrink_threshold), shrink_every
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0

    def sample(self) -> tuple[MaestroLinear, int]:
        """(layer, b) uniform over all (layer, width ∈ 1..kept) pairs — the single-layer OD sampler."""
        widths = torch.tensor([m.kept for _, m in self.layers])
        j = int(torch.randint(int(widths.sum()), (1,), generator=self.generator))
        cum = widths.cumsum(0)
        i = int(torch.searchsorted(cum, torch.tensor(j), right=True))
        b = j - (int(cum[i - 1]) if i > 0 else 0) + 1
        return self.layers[i][1], b

    @contextlib.contextmanager
    def truncated(self, layer: MaestroLinear, width: int) -> Iterator[None]:
        """Run forwards with ``layer`` cut to its first ``width`` components."""
        layer.width = width
        try:
            yield
        finally:
            layer.width = None

    def group_lasso(self) -> torch.Tensor:
        return sum(m.group_lasso(self.hierarchical) for _, m in self.layers)

    def loss(self, compute_loss: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``L(full) + L(sampled truncation) + λ·group lasso``; ``compute_loss`` runs the model once."""
        layer, width = self.sample()
        with self.truncated(layer, width):
            total = compute_loss()
        if self.full_pass:
            total = total + compute_loss()
        if self.lasso > 0:
            total = total + self.lasso * self.group_lasso()
        return total

    def state_dict(self) -> dict[str, Any]:
        """The step counter and the truncation sampler's generator (the kept widths are the model's buffers)."""
        return {"steps": self.steps, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])

    def step(self) -> None:
        """After ``optimizer.step()``: progressive shrinking every ``shrink_every`` steps (if enabled)."""
        self.steps += 1
        if self.shrink_every and self.steps % self.shrink_every == 0 and self.shrink_threshold > 0:
            for _, m in self.layers:
                m.shrink(self.shrink_threshold)

    def ranks(self) -> dict[str, int]:
        return {n: m.kept for n, m in self.layers}


@torch.no_grad()
def truncate(model: nn.Module, ranks: int | dict[str, int]) -> dict[str, int]:
    """Replace every :class:`MaestroLinear` by its first ``ranks`` (int or per-layer dict) components."""
    done = {}
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, MaestroLinear)]:
        k = ranks if isinstance(ranks, int) else ranks.get(name, layer.kept)
        k = min(checks.rank("rank", k, min(layer.out_features, layer.in_features), where=name), layer.kept)
        replace_module(model, name, layer.to_factorized(k))
        done[name] = k
    return done
