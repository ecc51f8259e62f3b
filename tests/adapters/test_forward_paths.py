"""Every adapter layer's forward against its additive form: ``layer(x) == base(x) + delta_output(x)``.

The forward may take a fused kernel (LoRA-shaped factors: ``kernels.low_rank_linear``; DoRA: its own
kernel; a dense ΔW: one GEMM with W + ΔW), while autocast, mixed dtypes and mixed-adapter batches
(``serving``) take the additive form; both must give the same output and the same gradients, so a change
to one (a dropped scale, a swapped factor) that the other does not share fails here."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw

from .test_matrix import METHODS, _adapt, _randomize


@pytest.mark.parametrize("method", METHODS)
def test_forward_equals_base_plus_delta_output(method):
    model, _, _ = _adapt("llama", method)
    _randomize(model)
    for _, layer in rw.adapter_layers(model):  # a scale ≠ 1, so that dropping it shows
        if isinstance(vars(layer).get("scale"), float):
            layer.scale *= 1.7
    model.eval()
    g = torch.Generator().manual_seed(3)
    checked = 0
    for name, layer in rw.adapter_layers(model):
        if layer.base_kind != "linear" or not layer.enabled or layer.merged:
            continue
        x = torch.randn(2, 5, layer.in_features, generator=g, requires_grad=True)
        params = [p for p in layer.parameters() if p.requires_grad]
        fused = layer(x)
        general = layer.base_layer(x)
        general = general + layer.delta_output(x, general.dtype)
        torch.testing.assert_close(fused, general, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        w = torch.randn(fused.shape, generator=g)
        grads_f = torch.autograd.grad((fused * w).sum(), [x, *params], allow_unused=True)
        grads_g = torch.autograd.grad((general * w).sum(), [x, *params], allow_unused=True)
        for a, b in zip(grads_f, grads_g, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name} grad: {m}")
        checked += 1
    assert checked > 0
