"""Q-GaLore (Zhang et al. 2024, "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive
Low-Rank Gradients").

GaLore with the projection matrix stored in INT4 (packed two per byte, asymmetric min-max per group
of 256, dequantized once per step and not kept), computed by the warm-started randomized range finder
(``projector="rsvd"``, default) or the exact SVD (``projector="svd"``), 8-bit Adam moments by default,
and the *lazy layer-adaptive* subspace refresh: at each refresh the cosine similarity between the
leading singular vector of the new and the previous projector is pushed into a queue of length k
(``queue_size``, 5); once the queue is full and its mean is ≥ ``cos_threshold`` (0.4), that layer's
refresh interval is multiplied by ``gamma_proj`` (2, as in the official code: intervals T, 2T, 4T, ...
so the per-layer SVD count stops growing linearly); ``gamma_proj=None`` stops refreshing that layer
altogether.

INT8 weights with stochastic rounding (F_SR) are available as ``weight_quant=True``: after
each update every projected weight is re-quantized to INT8 (asymmetric, groups of ``weight_group_size``)
with unbiased stochastic rounding and stored back dequantized, i.e. the weights live on the INT8 grid
(simulated storage, as the official ``*_simulate`` path; a true int8 weight tensor would need a custom
layer, which is not implemented).
State bytes per m×n matrix (right side, 8-bit moments, m·r ≥ 4096): 2·m·r + 8·⌈m·r/256⌉ (moments)
+ ⌈r·n/2⌉ + 8·⌈r·n/256⌉ (INT4 P, scales, zeros) + 4·n (leading vector) + 4·queue_size + ints.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..checks import choice, integer, number
from . import quant
from .named import ADAMW_ARGS, NamedProjected
from .projectors import Projector, advance_seed


class QGaLoreAdamW(NamedProjected):
    """Q-GaLore: INT4 projector + lazy layer-adaptive refresh (+ optional SR-quantized INT8 weights)."""

    takes = {
        **ADAMW_ARGS, "eps": 1e-8, "update_gap": 200, "scale": 0.25, "proj_side": "std", "inner": "adamw8bit",
        "projector": "rsvd", "quant_group_size": 256, "cos_threshold": 0.4, "gamma_proj": 2.0, "queue_size": 5,
        "weight_quant": False, "weight_group_size": 256, "seed": 0,
    }
    fixed = {"residual": "none"}

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        own = ("cos_threshold", "gamma_proj", "queue_size", "weight_quant", "weight_group_size")  # not the engine's
        cos_threshold, gamma_proj, queue_size, weight_quant, weight_group_size = (args.pop(k) for k in own)
        choice("projector", args["projector"], ("rsvd", "svd"))
        number("cos_threshold", cos_threshold, -1.0, 1.0)
        number("gamma_proj", gamma_proj, 1.0, optional=True)  # None freezes the projection
        integer("queue_size", queue_size, 1)
        even = "an even integer >= 2"
        for name, value in (("quant_group_size", args["quant_group_size"]), ("weight_group_size", weight_group_size)):
            if integer(name, value, 2, what=even) % 2:
                raise ValueError(f"{name}={value!r} must be {even}")
        self.cos_threshold, self.gamma_proj, self.queue_size = float(cos_threshold), gamma_proj, queue_size
        self.weight_quant, self.weight_group_size = bool(weight_quant), weight_group_size
        return {**args, "projector": f"{args['projector']}_int4"}

    def _refresh_due(self, proj: Projector, group: dict[str, Any], state: dict[str, Any], step: int) -> bool:
        if not proj.has_basis(state):
            return True
        gap = int(state.get("gap", group["update_gap"]))
        return gap > 0 and step % gap == 0  # gap 0 = frozen

    def _refresh(self, p, G, group, state, proj) -> torch.Tensor | None:
        prev = state.get("P_first")
        prev = None if prev is None else prev.clone()
        projected = super()._refresh(p, G, group, state, proj)
        state["svd_count"] = int(state.get("svd_count", 0)) + 1
        state.setdefault("gap", int(group["update_gap"]))
        if prev is not None:
            self._track_similarity(state, prev)
        return projected

    def _track_similarity(self, state: dict[str, Any], prev: torch.Tensor) -> None:
        """Queue the cosine similarity of the new and previous projector's first vector; freeze or
        widen the gap once the queue's mean passes ``cos_threshold`` (Q-GaLore's lazy refresh)."""
        k = self.queue_size
        queue = state.get("cos_queue")
        if queue is None:
            queue = torch.zeros(k, dtype=torch.float32)
        count = int(state.get("cos_count", 0))
        cos = F.cosine_similarity(prev.float(), state["P_first"].float(), dim=0).cpu()
        if count == k:
            queue = torch.cat([queue[1:], cos.reshape(1)])
        else:
            queue = queue.clone()
            queue[count] = cos
            count += 1
        state["cos_queue"], state["cos_count"] = queue, count
        if count == k and float(queue.mean()) >= self.cos_threshold:
            state["gap"] = 0 if self.gamma_proj is None else int(state["gap"] * self.gamma_proj)

    def _projected_step(self, p, group, state) -> None:
        super()._projected_step(p, group, state)
        if self.weight_quant:
            seed = advance_seed(state.get("wq_seed", state["seed"]))
            state["wq_seed"] = seed
            gen = torch.Generator(device=p.device).manual_seed(seed)
            q, s, z = quant.quantize_int8_stochastic(p.detach(), self.weight_group_size, gen)
            p.copy_(quant.dequantize_int8(q, s, z, p.shape, self.weight_group_size).to(p.dtype))
