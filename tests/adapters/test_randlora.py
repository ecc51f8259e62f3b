"""RandLoRA: shared sparse random bases equal to PEFT's, only the diagonals train, a full-rank update, parity with
PEFT 0.21.2."""

from __future__ import annotations

import peft
import pytest
import torch

import rankwise as rw
from rankwise.adapters.randlora import RandLoRALayer, num_bases, randlora_bases

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import TARGETS, _close, _loss_and_grads, _pair, _peft_layer, _train


@pytest.mark.parametrize("sparse", ["sparse", "very_sparse"])
def test_randlora_sparse_bases_equal_peft_bit_for_bit(sparse):
    cfg = peft.RandLoraConfig(
        r=8,
        target_modules=TARGETS,
        projection_prng_key=5,
        sparse=sparse == "sparse",
        very_sparse=sparse == "very_sparse",
    )
    pm, mine = _pair(cfg, "randlora", r=8, seed=5, sparse=sparse)
    name, layer = rw.adapter_layers(mine)[0]
    pl = _peft_layer(pm, name)
    pa, pb = next(iter(pl.randlora_A.values())), next(iter(pl.randlora_B.values()))
    assert torch.equal(layer.randlora_A, pa.squeeze(1)) and torch.equal(layer.randlora_B, pb)
    for basis in (layer.randlora_A, layer.randlora_B):  # ternary {−c, 0, c}, normalised to unit std
        values = torch.unique(basis)
        assert len(values) == 3 and values[1] == 0 and values[0] == -values[2]
        _close(basis.std(), torch.tensor(1.0), atol=1e-5)


def _copy_randlora_from_peft(pm, mine, seed: int = 0):
    layers = rw.adapter_layers(mine)
    pl0 = _peft_layer(pm, layers[0][0])
    with torch.no_grad():  # the shared bases: one copy updates every layer
        layers[0][1].randlora_A.copy_(next(iter(pl0.randlora_A.values())).squeeze(1))
        layers[0][1].randlora_B.copy_(next(iter(pl0.randlora_B.values())))
    g = torch.Generator().manual_seed(seed)
    pairs = []
    with torch.no_grad():
        for name, layer in layers:
            pl = _peft_layer(pm, name)
            lam, gam = pl.randlora_lambda["default"], pl.randlora_gamma["default"]
            lam.copy_(torch.randn(lam.shape, generator=g) * 0.05)
            gam.mul_(1 + torch.randn(gam.shape, generator=g))
            layer.randlora_lambda.copy_(lam)
            layer.randlora_gamma.copy_(gam)
            pairs += [(layer.randlora_lambda, lam), (layer.randlora_gamma, gam)]
    return pairs


@pytest.mark.parametrize("route", ["dense", "factored"])
def test_randlora_matches_peft_outputs_and_gradients(route, monkeypatch):
    cfg = peft.RandLoraConfig(r=8, randlora_alpha=16, target_modules=TARGETS, projection_prng_key=0)
    pm, mine = _pair(cfg, "randlora", r=8, alpha=16)
    pairs = _copy_randlora_from_peft(pm, mine)
    monkeypatch.setattr(RandLoRALayer, "route", route)
    for name, layer in rw.adapter_layers(mine):
        _close(layer.delta_weight(), _peft_layer(pm, name).get_delta_weight("default"), atol=1e-5)
    batch = lm_batches()[2]
    loss_p, grads_p = _loss_and_grads(pm, batch, [p for _, p in pairs])
    loss_m, grads_m = _loss_and_grads(mine, batch, [p for p, _ in pairs])
    _close(loss_m, loss_p, atol=1e-5)
    for gm, gp in zip(grads_m, grads_p, strict=True):
        _close(gm, gp, atol=1e-6, rtol=1e-3)


def test_randlora_only_diagonals_train_bases_regenerate_and_update_is_full_rank(tmp_path):
    r = 4
    model = rw.adapt(make_tiny_llama(0), "randlora", r=r, seed=2)
    layers = rw.adapter_layers(model)
    a0, b0 = layers[0][1].randlora_A, layers[0][1].randlora_B
    a_copy, b_copy = a0.clone(), b0.clone()
    assert all(l.randlora_A is a0 and l.randlora_B is b0 for _, l in layers)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"randlora_lambda", "randlora_gamma"}
    for _, layer in layers:
        k = min(layer.in_features, layer.out_features)
        assert layer.n == num_bases(k, r) and layer.trainable_count() == layer.n * (r + k)
        assert torch.all(layer.delta_weight() == 0)
    _train(model, steps=3)
    assert torch.equal(a0, a_copy) and torch.equal(b0, b_copy) and a0.grad is None and b0.grad is None
    for _, layer in layers:
        k = min(layer.in_features, layer.out_features)
        rank = torch.linalg.matrix_rank(layer.delta_weight().detach()).item()
        assert rank > r and rank == k, (rank, r, k)  # full rank, far above the rank of each basis
    batch = lm_batches(seed=4)[0]
    expected = model(**batch).logits
    rw.save_adapter(model, tmp_path / "randlora")
    fresh = rw.load_adapter(make_tiny_llama(0), tmp_path / "randlora")
    f_layer = rw.adapter_layers(fresh)[0][1]
    assert torch.equal(f_layer.randlora_A, a0) and torch.equal(f_layer.randlora_B, b0)
    assert torch.equal(fresh(**batch).logits, expected)


def test_randlora_routes_agree_and_bases_are_seeded():
    model = rw.adapt(make_tiny_llama(0), "randlora", r=4, alpha=8)
    _train(model, steps=2)
    layer = rw.adapter_layers(model)[-1][1]  # down_proj: in 64 > out 32, the transposed case
    x = torch.randn(3, 5, layer.in_features)
    layer.route = "dense"
    dense = layer(x)
    layer.route = "factored"
    _close(layer(x), dense, atol=1e-5)
    a1, b1 = randlora_bases(1, 4, 64, 32)
    a2, b2 = randlora_bases(1, 4, 64, 32)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and b1.shape == (64, 8, 4)
    assert not torch.equal(a1, randlora_bases(2, 4, 64, 32)[0])


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"sparse": "dense"}, "sparse='dense' is not allowed"), ({"alpha": 0}, "alpha=0 must be")]
)
def test_randlora_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rw.adapt(make_tiny_llama(0), "randlora", r=4, **kwargs)
