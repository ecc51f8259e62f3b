"""LoTR: U and V are single Parameters shared by every adapted layer of one shape (one gradient sums over
the layers, the model trains L·r² + r(out + in) per shape group), each layer owns only its r×r core, and
ΔW_l = s·U·G_l·V; the sharing survives training and a save / load."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.lotr import LoTRConfig
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama


def _groups(model) -> dict[tuple[int, int], list]:
    out = defaultdict(list)
    for _, layer in rw.adapter_layers(model):
        out[(layer.out_features, layer.in_features)].append(layer)
    return out


def test_factors_are_shared_per_shape_and_only_the_core_is_per_layer():
    model = make_tiny_llama()
    rw.adapt(model, "lotr", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], r=3)
    groups = _groups(model)
    assert len(groups) >= 2 and all(len(layers) >= 2 for layers in groups.values())
    cores = set()
    for (out_f, in_f), layers in groups.items():
        assert len({id(layer.lotr_U) for layer in layers}) == 1 and len({id(layer.lotr_V) for layer in layers}) == 1
        assert layers[0].lotr_U.shape == (out_f, 3) and layers[0].lotr_V.shape == (3, in_f)
        cores |= {id(layer.lotr_G) for layer in layers}
    n_layers = sum(len(layers) for layers in groups.values())
    assert len(cores) == n_layers
    expected = n_layers * 9 + sum(3 * (o + i) for o, i in groups)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    layer = next(iter(groups.values()))[1]
    with torch.no_grad():
        layer.lotr_G.normal_()
    delta = layer.lotr_U @ layer.lotr_G @ layer.lotr_V / 3
    torch.testing.assert_close(layer.delta_weight(), delta)
    x = torch.randn(5, layer.in_features)
    torch.testing.assert_close(layer(x), x @ (layer.base_weight + delta).t(), atol=1e-4, rtol=1e-5)


def test_the_shared_gradient_is_the_sum_over_layers():
    model = make_tiny_llama()
    rw.adapt(model, "lotr", ["q_proj", "o_proj"], r=2)
    layers = next(iter(_groups(model).values()))
    assert len(layers) == 4  # q and o of both blocks: 32 × 32
    with torch.no_grad():
        for layer in layers:
            layer.lotr_G.normal_()
    batch = lm_batches(n=1)[0]
    model(**batch).loss.backward()
    shared_grad = layers[0].lotr_U.grad.clone()
    # untie: each layer its own copy of U; the per-layer gradients must add up to the shared one
    model.zero_grad()
    for layer in layers:
        layer.lotr_U = nn.Parameter(layer.lotr_U.detach().clone())
    model(**batch).loss.backward()
    per_layer = [layer.lotr_U.grad for layer in layers]
    assert all(g.abs().sum() > 0 for g in per_layer)
    torch.testing.assert_close(shared_grad, sum(per_layer), atol=1e-6, rtol=1e-5)


def test_sharing_survives_training_and_save_load(tmp_path):
    model = make_tiny_llama()
    rw.adapt(model, "lotr", ["q_proj", "o_proj"], r=2)
    train(model, lm_batches(n=3), config=TrainConfig.plain(3))
    layers = next(iter(_groups(model).values()))
    assert len({id(layer.lotr_U) for layer in layers}) == 1
    rw.save_adapter(model, tmp_path / "a")
    fresh = make_tiny_llama()
    rw.load_adapter(fresh, tmp_path / "a")
    loaded = next(iter(_groups(fresh).values()))
    assert len({id(layer.lotr_U) for layer in loaded}) == 1 and len({id(layer.lotr_V) for layer in loaded}) == 1
    for a, b in zip(layers, loaded, strict=True):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight())


@pytest.mark.parametrize("bad", [{"alpha": 0}, {"r": 0}])
def test_bad_options_name_the_parameter(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LoTRConfig(**bad)
