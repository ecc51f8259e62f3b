"""FRUGAL (Zmushko et al. 2024, "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for
Scalable Training", gradient splitting).

The gradient of each projected matrix is split into a low-dimensional part, updated by a stateful
optimizer (AdamW), and the rest, updated by a state-free rule: signSGD (default) or SGD, or nothing
(``inactive_update_rule='no'``). The subspace is re-chosen every T steps by a *selector*:

* ``'svd'`` — GaLore's top singular vectors (``GaloreAdamW`` in the official code), from the
  warm-started randomized range finder (``projector='rsvd'``, default) or the exact SVD
  (``projector='svd'``);
* ``'randk'`` — random columns/rows (``CoordAdamW``);
* ``'block'`` — whole parameter tensors, ``round(density·#tensors)`` of them active, chosen at random
  (``block_order='random'``) or in ascending order (BAdam-style, ``BlockAdamW``); inactive tensors keep
  no state at all.

``density`` ρ sets the subspace size: r = round(ρ·dim) of the projected side for svd/randk (if
``density`` is None the group's ``rank`` is used; the block selector then uses ρ = 0.25). With
``reset_statistics=True`` (the paper's default) the Adam moments are reset at every re-selection.
Coordinates outside the subspace move by exactly −lr·α·s·sign(g) (s = ``inactive_lr_scale``).
With ``inactive_update_rule='no'`` and ``reset_statistics=False`` the svd selector is GaLore.
State bytes per m×n matrix (svd/randk, right side, fp32): 4·2·m·r (+ P: 4·r·n for svd; 8·r for randk).
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import choice, fraction, non_negative
from .inner import get_inner
from .named import ADAMW_ARGS, NamedProjected
from .projectors import Projector, next_proj_seed

SELECTORS = {"svd": "rsvd", "randk": "coords", "block": "blocks"}
SVD_PROJECTORS = ("rsvd", "svd")  # the svd selector's basis: randomized (fast, default) or exact
RULES = {"sign_sgd": "sign_sgd", "sgd": "sgd", "no": "none"}


class FRUGAL(NamedProjected):
    """FRUGAL with AdamW as the state-full optimizer."""

    takes = {
        **ADAMW_ARGS, "eps": 1e-8, "update_gap": 200, "density": 0.25, "selector": "svd",
        "inactive_update_rule": "sign_sgd", "inactive_lr_scale": 1.0, "reset_statistics": True, "block_order": "random",
        "projector": "rsvd", "proj_side": "std", "scale": 1.0, "seed": 0,
    }
    fixed = {"inner": "adamw"}

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        selector, rule, density = args.pop("selector"), args.pop("inactive_update_rule"), args.pop("density")
        choice("selector", selector, SELECTORS)
        choice("inactive_update_rule", rule, RULES)
        fraction("density", density, optional=True)
        choice("block_order", args["block_order"], ("random", "ascending"))
        choice("projector", args["projector"], SVD_PROJECTORS)
        non_negative("inactive_lr_scale", args["inactive_lr_scale"])
        self.density, self.selector = density, selector
        self.reset_statistics, self.block_order = bool(args.pop("reset_statistics")), args.pop("block_order")
        self.inactive_update_rule = rule
        return {**args, "projector": args["projector"] if selector == "svd" else SELECTORS[selector],
                "residual": RULES[rule], "inactive_lr_scale": float(args["inactive_lr_scale"])}

    # -------------------------------------------------------------- svd / randk: density → rank

    def _rank_for(self, p: torch.Tensor, group: dict[str, Any], side: str) -> int:
        if self.density is None:
            return int(group["rank"])
        dim = p.shape[0] if side == "left" else p.shape[1]
        return min(dim, max(1, round(self.density * dim)))

    def _after_refresh(self, p, group, state, proj: Projector, first: bool) -> None:
        if self.reset_statistics and not first:
            get_inner(group["inner"]).reset(state)

    # -------------------------------------------------------------- block: whole tensors

    def _begin_group(self, group: dict[str, Any]) -> None:
        if self.selector != "block":
            return
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            return
        head = self.state[params[0]]
        step = int(head.get("step", 0))
        if "active" in head and step % int(group["update_gap"]) != 0:
            return
        density = 0.25 if self.density is None else self.density
        k = round(density * len(params))
        if self.block_order == "random":
            seed = next_proj_seed(head)
            head["proj_seed"] = seed
            gen = torch.Generator().manual_seed(seed)
            chosen = set(torch.randperm(len(params), generator=gen)[:k].tolist())
        else:
            start = int(head.get("block_next", 0))
            chosen = {(start + i) % len(params) for i in range(k)}
            head["block_next"] = (start + k) % len(params)
        inner = get_inner(group["inner"])
        for i, p in enumerate(params):
            st = self.state[p]
            inner.reset(st)  # the official BlockOptimizer re-initialises every tensor at each switch
            st["active"] = int(i in chosen)
            st.setdefault("step", 0)

    def _projected_step(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        if self.selector != "block":
            return super()._projected_step(p, group, state)
        G, lr = p.grad, group["lr"]
        if state.get("active", 0):
            N, c = get_inner(group["inner"]).update(G, state, group, p)
            p.add_(N, alpha=-lr * c * group["scale"])
        elif self.inactive_update_rule != "no":
            step = G.sign() if self.inactive_update_rule == "sign_sgd" else G
            p.add_(step, alpha=-lr * group["scale"] * group["inactive_lr_scale"])
        state["step"] = int(state.get("step", 0)) + 1
        self._decay(p, group)
