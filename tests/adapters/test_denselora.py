"""DenseLoRA: the layers of one module type hold the same Enc and Dec tensors (one gradient summed over every
layer), each layer owns only an r×r M (the model trains L·r² + Σ_types r(out + in)), Δh follows
s·GELU(Dec·M·GELU(Enc·x)), and with its GELU the adapter refuses merge and PEFT export."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.adapters.denselora import DenseLoRAConfig
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _by_type(model) -> dict[str, list]:
    out = defaultdict(list)
    for name, layer in rw.adapter_layers(model):
        out[name.rsplit(".", 1)[-1]].append(layer)
    return out


def test_encoder_decoder_shared_per_module_type_and_only_m_is_per_layer():
    model = make_tiny_llama()
    rw.adapt(model, "denselora", TARGETS, r=3)
    groups = _by_type(model)
    assert set(groups) == set(TARGETS) and all(len(layers) == 2 for layers in groups.values())
    for layers in groups.values():
        assert len({id(layer.dense_encoder) for layer in layers}) == 1
        assert len({id(layer.dense_decoder) for layer in layers}) == 1
        assert layers[0].dense_encoder.data_ptr() == layers[1].dense_encoder.data_ptr()
    # k and v have the same shape but, as in the authors' code, each its own pair
    assert groups["k_proj"][0].dense_encoder is not groups["v_proj"][0].dense_encoder
    per_layer = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert per_layer == {"dense_encoder", "dense_decoder", "dense_M"}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # each shared tensor once
    shared = sum(3 * (layers[0].out_features + layers[0].in_features) for layers in groups.values())
    assert trainable == 10 * 3 * 3 + shared
    ms = [p for n, p in model.named_parameters() if n.endswith("dense_M")]
    assert len(ms) == 10 and all(m.shape == (3, 3) for m in ms)


def test_delta_is_gelu_dec_m_gelu_enc():
    model = make_tiny_llama()
    rw.adapt(model, "denselora", ["up_proj"], r=2, alpha=3.0)
    layer = _by_type(model)["up_proj"][0]
    x = torch.randn(4, layer.in_features)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # Dec = 0: the base model at init
    with torch.no_grad():
        layer.dense_decoder.normal_()
    h = F.gelu(F.gelu(x @ layer.dense_encoder.t()) @ layer.dense_M.t() @ layer.dense_decoder.t()) * 1.5
    torch.testing.assert_close(layer(x), layer.base_layer(x) + h, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot be merged"):
        rw.merge(model)
    with pytest.raises(ValueError, match="cannot be exported"):
        rw.export_peft(model, "unused")


def test_the_shared_gradient_is_the_sum_over_every_layer():
    model = make_tiny_llama()
    rw.adapt(model, "denselora", ["q_proj"], r=2)
    layers = _by_type(model)["q_proj"]
    with torch.no_grad():
        layers[0].dense_decoder.normal_()
    batch = lm_batches(n=1)[0]
    model(**batch).loss.backward()
    shared = layers[0].dense_encoder.grad.clone(), layers[0].dense_decoder.grad.clone()
    model.zero_grad()
    for layer in layers:  # untie: each layer its own copies
        layer.dense_encoder = nn.Parameter(layer.dense_encoder.detach().clone())
        layer.dense_decoder = nn.Parameter(layer.dense_decoder.detach().clone())
    model(**batch).loss.backward()
    for i, name in enumerate(("dense_encoder", "dense_decoder")):
        per_layer = [getattr(layer, name).grad for layer in layers]
        assert all(g.abs().sum() > 0 for g in per_layer)
        torch.testing.assert_close(shared[i], sum(per_layer), atol=1e-6, rtol=1e-5)


def test_sharing_survives_training_and_save_load(tmp_path):
    model = make_tiny_llama()
    rw.adapt(model, "denselora", ["q_proj", "v_proj"], r=2)
    train(model, lm_batches(n=3), config=TrainConfig.plain(3))
    layers = _by_type(model)["q_proj"]
    assert layers[0].dense_decoder is layers[1].dense_decoder and layers[0].dense_decoder.abs().sum() > 0
    batch = lm_batches(n=1, seed=5)[0]
    expected = model(**batch).logits
    rw.save_adapter(model, tmp_path / "a")
    fresh = rw.load_adapter(make_tiny_llama(), tmp_path / "a")
    loaded = _by_type(fresh)["q_proj"]
    assert loaded[0].dense_encoder is loaded[1].dense_encoder
    torch.testing.assert_close(fresh(**batch).logits, expected)


@pytest.mark.parametrize("bad", [{"alpha": 0}, {"r": 0}])
def test_bad_options_name_the_parameter(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DenseLoRAConfig(**bad)
