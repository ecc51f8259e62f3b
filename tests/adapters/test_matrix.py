"""The generic matrix: every registered adapter method on a tiny BERT and a tiny Llama.

Checks the trainable set and parameter-count formula, the initial-output property, save/load round
trip, merge == unmerged forward, and that unmerge restores the frozen base. The methods with PEFT parity
tests of their own (DoRA, VeRA, RandLoRA, Bone, HRA, FourierFT, C³A, DeLoRA, GraLoRA) are also trained
before the round trip (save/load, merge/unmerge, unload).
"""

from __future__ import annotations

import pytest
import torch

import rankwise as rw

from ..conftest import MODEL_KINDS, init_data_for, lm_batches, make_tiny_llama
from .peft_pairs import _close, _train

# the quantized-base methods (qlora, loftq) have their own tests (tests/adapters/test_qlora.py): they do
# not start at the full-precision base, which this matrix checks; methods built from the model's adapters
# (needs_adapters: MeteoRA) cannot adapt a bare model and have their own tests
METHODS = sorted(n for n, s in rw.REGISTRY.items() if s.family != "quantization" and not s.needs_adapters)
RANK = 4
# trained (not only randomized) before the round trip: the methods with PEFT parity tests of their own
MY_METHODS = ["dora", "vera", "randlora", "bone", "hra", "fourierft", "c3a", "delora", "gralora"]


def _adapt(kind: str, method: str, seed: int = 0):
    make, batches, logits = MODEL_KINDS[kind]
    model = make(seed)
    data = batches()
    rw.adapt(model, method, r=RANK, init_data=init_data_for(method, data, RANK))
    return model, data, logits


def _randomize(model, seed: int = 1) -> None:
    """Give every trainable adapter tensor a non-trivial value so ΔW ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            for name, p in layer.named_parameters():
                if p.requires_grad and not name.startswith("base_layer."):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
            layer.finish_warmup()


def _randomize_feasibly(model, method: str) -> None:
    """``_randomize``, then back into the method's feasible set where it has one: ARD-LoRA's scales α ∈ [0, 1]
    (its controller projects there after every step; above 1 every component is fully on and ∂m/∂α = 0)."""
    _randomize(model)
    if method == "ard_lora":
        with torch.no_grad():
            for _, layer in rw.adapter_layers(model):
                layer.head_scale.clamp_(0.0, 1.0)


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
@pytest.mark.parametrize("method", METHODS)
def test_trainable_set_and_count(kind, method):
    model, _, _ = _adapt(kind, method)
    layers = rw.adapter_layers(model)
    assert layers
    adapter_params = {id(p) for _, l in layers for n, p in l.named_parameters() if not n.startswith("base_layer.")}
    head = set(rw.adapter_state(model).trainable_modules)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert id(p) in adapter_params or name.split(".")[0] in head, name
    for _, layer in layers:
        assert not layer.base_layer.weight.requires_grad
        n = sum(p.numel() for k, p in layer.named_parameters() if p.requires_grad and not k.startswith("base_layer."))
        assert n == layer.trainable_count()
    assert rw.summary(model).per_method[layers[0][1].method] == sum(l.trainable_count() for _, l in layers)


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
@pytest.mark.parametrize("method", METHODS)
def test_initial_output(kind, method):
    make, _, _ = MODEL_KINDS[kind]
    model, data, logits = _adapt(kind, method)
    base = make(0)
    same = torch.allclose(logits(model(**data[0])), logits(base(**data[0])), atol=1e-4)
    assert same == rw.adapter_layers(model)[0][1].identity_at_init
    with rw.adapters_disabled(model):
        assert torch.allclose(logits(model(**data[0])), logits(base(**data[0])), atol=1e-4)


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(kind, method, tmp_path):
    make, _, _ = MODEL_KINDS[kind]
    model, data, logits = _adapt(kind, method)
    _randomize(model)
    expected = logits(model(**data[1]))
    rw.save_adapter(model, tmp_path / "adapter")
    fresh = rw.load_adapter(make(0), tmp_path / "adapter")
    assert torch.allclose(logits(fresh(**data[1])), expected, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge(kind, method):
    model, data, logits = _adapt(kind, method)
    if not rw.get_method(method).mergeable:  # no ΔW (denselora's GELU): merging is refused by name
        with pytest.raises(ValueError, match=f"{method}.*cannot be merged"):
            rw.merge(model)
        return
    frozen = {n: l.base_layer.weight.detach().clone() for n, l in rw.adapter_layers(model)}
    _randomize(model)
    expected = logits(model(**data[2]))
    rw.merge(model)
    assert torch.allclose(logits(model(**data[2])), expected, atol=1e-4)
    rw.unmerge(model)
    for name, layer in rw.adapter_layers(model):
        assert torch.allclose(layer.base_layer.weight, frozen[name], atol=1e-5)
    assert torch.allclose(logits(model(**data[2])), expected, atol=1e-5)
    plain = rw.merge_and_unload(model)
    assert not rw.adapter_layers(plain)
    assert torch.allclose(logits(plain(**data[2])), expected, atol=1e-4)


@pytest.mark.parametrize("method", MY_METHODS)
def test_trained_save_load_merge_unmerge_unload(method, tmp_path):
    kwargs = {"bone": {"r": 4}, "randlora": {"r": 8, "alpha": 16}}.get(method, {"r": 4})
    model = rw.adapt(make_tiny_llama(0), method, **kwargs)
    w0 = {n: l.base_layer.weight.clone() for n, l in rw.adapter_layers(model)}
    _train(model, steps=3)
    batch = lm_batches(seed=7)[1]
    expected = model(**batch).logits
    assert not torch.allclose(expected, make_tiny_llama(0)(**batch).logits, atol=1e-4)
    rw.save_adapter(model, tmp_path / method)
    fresh = rw.load_adapter(make_tiny_llama(0), tmp_path / method)
    _close(fresh(**batch).logits, expected, atol=1e-6, rtol=0)
    rw.merge(model)
    _close(model(**batch).logits, expected, atol=1e-4)
    for name, layer in rw.adapter_layers(model):  # W₀ is recoverable while merged
        _close(layer.original_weight(), w0[name], atol=1e-5)
    rw.unmerge(model)
    for name, layer in rw.adapter_layers(model):
        _close(layer.base_layer.weight, w0[name], atol=1e-5)
    _close(model(**batch).logits, expected, atol=1e-5)
    rw.merge(model)
    plain = rw.unload(model)
    for name, w in w0.items():
        _close(plain.get_submodule(name).weight, w, atol=1e-5)
