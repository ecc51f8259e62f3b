"""Layer-by-layer compression on calibration data: each decoder layer is changed on the outputs of
the already-compressed layers before it. Pruning (Wanda-style methods: DSnoT, ECoFLaP's local stage)
gives each linear a mask from its own input statistics; SpQR and MoDeGPT process a layer their own way."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

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


class GramStats:
    """``XᵀX`` (float64) of one linear's inputs over every token position."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.gram = torch.zeros(columns, columns, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        z = x.detach().reshape(-1, x.shape[-1]).double()
        self.gram.addmm_(z.T, z)


#: ``mask_fn(full name, name inside the layer, linear, its input statistics) -> pruned mask`` (True = pruned).
MaskFn = Callable[[str, str, nn.Linear, InputStats], torch.Tensor]
#: ``process(layer name, layer, forward)``: changes one decoder layer in place; ``forward()`` runs the
#: layer as it is now on every calibration batch that reaches it (hooks registered around it see the inputs).
ProcessFn = Callable[[str, nn.Module, Callable[[], object]], None]


@torch.no_grad()
def process_layerwise(model: nn.Module, data: Iterable, process: ProcessFn, who: str, progress: bool = False) -> None:
    """For each repeated layer in order: ``process`` changes it (seeing its inputs through ``forward``),
    then the changed layer's outputs become the next layer's inputs (as Wanda / GPTQ / DSnoT's
    official code: each layer is calibrated on the outputs of the already-compressed layers)."""
    prefix, layers = layer_list(model)
    was_training = model.training
    model.eval()
    captured = first_layer_inputs(model, layers[0], data, who)
    hidden = [h for h, _, _ in captured]

    def run(layer: nn.Module) -> list[torch.Tensor]:
        outs = [layer(h, **kw) for h, (_, kw, _) in zip(hidden, captured, strict=True)]
        return [o[0] if isinstance(o, tuple) else o for o in outs]

    for i, layer in enumerate(tqdm(list(layers), desc=who, disable=not progress, leave=False)):
        process(f"{prefix}.{i}", layer, partial(run, layer))
        hidden = run(layer)
    model.train(was_training)


def collect_inputs(prefix: str, layer: nn.Module, targets: set[str], make_stats: Callable[[nn.Linear], Any],
                   forward: Callable[[], object]) -> tuple[dict[str, nn.Linear], dict[str, Any]]:
    """The targeted ``nn.Linear`` modules of one layer (by their name inside it) and, for each,
    ``make_stats(linear)`` fed every input the layer's ``forward()`` gives it (``.add(x)``)."""
    linears = {sub: m for sub, m in layer.named_modules() if isinstance(m, nn.Linear) and f"{prefix}.{sub}" in targets}
    stats = {sub: make_stats(m) for sub, m in linears.items()}
    handles = [m.register_forward_hook(lambda mod, inp, out, s=stats[sub]: s.add(inp[0])) for sub, m in linears.items()]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return linears, stats


def prune_layerwise(model: nn.Module, data: Iterable, targets: set[str], mask_fn: MaskFn, who: str,
                    progress: bool = False) -> None:
    """Layer by layer (:func:`process_layerwise`): one pass of its (dense) inputs collects every
    targeted linear's :class:`InputStats`, ``mask_fn`` gives each its mask, the masked weights are zeroed."""

    def process(prefix: str, layer: nn.Module, forward: Callable[[], object]) -> None:
        linears, stats = collect_inputs(prefix, layer, targets, lambda m: InputStats(m.in_features, m.weight.device),
                                        forward)
        for sub, lin in linears.items():
            lin.weight.masked_fill_(mask_fn(f"{prefix}.{sub}", sub, lin, stats[sub]), 0)

    process_layerwise(model, data, process, who, progress)
