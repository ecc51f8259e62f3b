"""LoRS (Hu et al. 2025): ΔW = (s·BA) ⊙ (W ≠ 0) with the mask recomputed, nothing out×in saved for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert


def _prune_half(model: nn.Module) -> dict[str, torch.Tensor]:
    """Magnitude-prune every linear layer's weight to 50% in place; the keep-masks by name."""
    masks = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                keep = mod.weight.abs() >= mod.weight.abs().flatten().median()
                mod.weight.mul_(keep)
                masks[name] = keep
    return masks


def _layer(out_f: int = 6, in_f: int = 8, r: int = 2):
    model = nn.Sequential(nn.Linear(in_f, out_f))
    _prune_half(model)
    rw.adapt(model, "lors", targets=["0"], r=r, alpha=2)
    layer = rw.adapter_layers(model)[0][1]
    with torch.no_grad():
        layer.lora_B.normal_()
    return model, layer


def test_pruned_positions_stay_exactly_zero_after_training_and_merge():
    model = make_tiny_bert(0)
    masks = _prune_half(model)
    rw.adapt(model, "lors", r=2, targets=["query", "value"])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, cls_batches(n=3), config=TrainConfig.plain(3), optimizer=opt)
    layers = rw.adapter_layers(model)
    assert all(float(layer.lora_B.detach().abs().sum()) > 0 for _, layer in layers)
    rw.merge(model)
    for name, layer in layers:
        w, keep = layer.base_weight, masks[name]
        assert bool((w[~keep] == 0).all()), name
        assert int((w[keep] == 0).sum()) == 0  # every kept weight was updated, none pruned


def test_forward_is_the_masked_update():
    model, layer = _layer()
    x = torch.randn(3, 8)
    w = layer.base_weight
    expected = x @ (w + layer.scale * (layer.lora_B @ layer.lora_A) * (w != 0)).t() + layer.bias
    torch.testing.assert_close(model(x), expected)


def test_no_out_by_in_tensor_is_saved_for_backward():
    """Recompute: the saved activations are smaller than a mask-storing baseline's (which keeps the
    out×in mask and masked delta), and none of them has the weight's shape except W itself."""
    model, layer = _layer(out_f=64, in_f=48)
    x = torch.randn(5, 48, requires_grad=True)

    def saved_bytes(fn) -> int:
        seen = {}

        def pack(t):
            if t.data_ptr() != layer.base_weight.data_ptr():
                seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum()
        return sum(seen.values())

    def baseline():
        mask = layer.base_weight != 0  # the stored mask of mask-based sparse LoRA
        return torch.nn.functional.linear(x, layer.scale * (layer.lora_B @ layer.lora_A) * mask)

    lors = saved_bytes(lambda: layer.delta_forward(x))
    assert lors < saved_bytes(baseline)
    assert lors <= (5 * 48 + 2 * 48 + 64 * 2) * 4  # x, A, B only


def test_rearranged_gradients():
    """∂x exact through the masked delta; ∂A, ∂B through the low-rank path (no out×in gradient)."""
    model, layer = _layer()
    x = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(4, 6)
    layer.delta_forward(x).backward(g)
    s, a, b = layer.scale, layer.lora_A.detach(), layer.lora_B.detach()
    mask = layer.base_weight != 0
    torch.testing.assert_close(x.grad, g @ (s * (b @ a) * mask))
    torch.testing.assert_close(layer.lora_A.grad, s * (g @ b).t() @ x.detach())
    torch.testing.assert_close(layer.lora_B.grad, s * g.t() @ (x.detach() @ a.t()))


def test_not_exportable_to_peft():
    assert rw.get_method("lors").export == "none"


@pytest.mark.parametrize("bad", [{"alpha": -1}, {"use_rslora": "yes"}])
def test_bad_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        rw.adapt(make_tiny_bert(0), "lors", r=2, **bad)
