"""Layer-by-layer pruning on calibration data (Wanda-style methods: DSnoT, ECoFLaP's local stage):
each decoder layer's linears see the outputs of the already-pruned layers before it, and each gets
a mask from its own input statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layout import layer_list
from .layer_inputs import first_layer_inputs


class InputStats:
    """Per input column of one linear: token count, ``Σx``, ``Σx²`` (float64, every token position)."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.count = 0
        self.sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(columns, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        z = x.detach().reshape(-1, x.shape[-1]).double()
        self.count += z.shape[0]
        self.sum += z.sum(0)
        self.sum_sq += z.pow(2).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def var(self) -> torch.Tensor:
        return (self.sum_sq / self.count - self.mean.pow(2)).clamp_min(0)


#: ``mask_fn(full name, name inside the layer, linear, its input statistics) -> pruned mask`` (True = pruned).
MaskFn = Callable[[str, str, nn.Linear, InputStats], torch.Tensor]


@torch.no_grad()
def prune_layerwise(model: nn.Module, data: Iterable, targets: set[str], mask_fn: MaskFn, who: str,
                    progress: bool = False) -> None:
    """For each repeated layer in order: one pass of its (dense) inputs collects every targeted
    linear's :class:`InputStats`, ``mask_fn`` gives each its mask, the masked weights are zeroed, and
    the pruned layer's outputs become the next layer's inputs (as Wanda / DSnoT's official code)."""
    prefix, layers = layer_list(model)
    was_training = model.training
    model.eval()
    captured = first_layer_inputs(model, layers[0], data, who)
    hidden = [h for h, _, _ in captured]
    for i, layer in enumerate(tqdm(list(layers), desc=who, disable=not progress, leave=False)):
        linears = {sub: m for sub, m in layer.named_modules()
                   if isinstance(m, nn.Linear) and f"{prefix}.{i}.{sub}" in targets}
        stats = {sub: InputStats(m.in_features, m.weight.device) for sub, m in linears.items()}
        handles = [m.register_forward_hook(lambda mod, inp, out, s=stats[sub]: s.add(inp[0]))
                   for sub, m in linears.items()]
        try:
            for h, (_, kw, _) in zip(hidden, captured, strict=True):
                layer(h, **kw)
        finally:
            for handle in handles:
                handle.remove()
        for sub, lin in linears.items():
            lin.weight.masked_fill_(mask_fn(f"{prefix}.{i}.{sub}", sub, lin, stats[sub]), 0)
        outs = [layer(h, **kw) for h, (_, kw, _) in zip(hidden, captured, strict=True)]
        hidden = [o[0] if isinstance(o, tuple) else o for o in outs]
    model.train(was_training)
