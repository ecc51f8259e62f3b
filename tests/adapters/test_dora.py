"""DoRA, VeRA, RandLoRA and Bone: the faithful property of each method, and parity with PEFT 0.21.2."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import rankwise as rw
from rankwise.adapters.bone import bone_delta
from rankwise.adapters.randlora import RandLoRALayer, num_bases, randlora_bases
from rankwise.adapters.vera import vera_projections

from ..conftest import lm_batches, make_tiny_llama

peft = pytest.importorskip("peft")

# every Linear of the tiny Llama: (out, in) = q 32x32, k/v 16x32, o 32x32, gate/up 64x32, down 32x64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MY_METHODS = ["dora", "vera", "randlora", "bone"]


def _pair(peft_config, method: str, **ours):
    """The same tiny Llama adapted by PEFT and by rankwise (PEFT's tensors are copied over by callers)."""
    base = make_tiny_llama(0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config)
    mine = rw.adapt(copy.deepcopy(base), method, targets=TARGETS, trainable=None, **ours)
    return pm, mine


def _peft_layer(pm, name: str):
    return pm.base_model.model.get_submodule(name)


def _loss_and_grads(model, batch, params):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in params]


def _train(model, steps: int = 3, lr: float = 1e-2, seed: int = 0) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for batch in lm_batches(n=steps, seed=seed):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _close(a, b, atol=1e-5, rtol=1e-4):
    assert torch.allclose(a, b, atol=atol, rtol=rtol), (a - b).abs().max().item()


# ====================================================================== DoRA
def test_dora_init_magnitude_is_row_norm_and_output_is_base():
    base = make_tiny_llama(0)
    model = rw.adapt(copy.deepcopy(base), "dora", r=4)
    batch = lm_batches()[0]
    for _, layer in rw.adapter_layers(model):
        _close(layer.magnitude, torch.linalg.norm(layer.base_layer.weight, dim=1), atol=1e-6, rtol=0)
        assert layer.factors() is None
        assert layer.trainable_count() == 4 * (layer.in_features + layer.out_features) + layer.out_features
    _close(model(**batch).logits, base(**batch).logits, atol=1e-5)


def test_dora_merged_row_norms_equal_magnitude_after_training():
    model = rw.adapt(make_tiny_llama(0), "dora", r=4, alpha=8)
    frozen = {n: l.base_layer.weight.clone() for n, l in rw.adapter_layers(model)}
    _train(model, steps=4)
    assert any(l.lora_B.abs().max() > 0 for _, l in rw.adapter_layers(model))
    batch = lm_batches(seed=5)[0]
    expected = model(**batch).logits
    rw.merge(model)
    for name, layer in rw.adapter_layers(model):
        merged = layer.base_layer.weight
        assert not torch.allclose(layer.magnitude, torch.linalg.norm(frozen[name], dim=1), atol=1e-4)
        _close(torch.linalg.norm(merged, dim=1), layer.magnitude.detach(), atol=1e-5, rtol=0)
    _close(model(**batch).logits, expected, atol=1e-4)
    rw.unmerge(model)
    for name, layer in rw.adapter_layers(model):
        _close(layer.base_layer.weight, frozen[name], atol=1e-5)


def test_dora_norm_is_detached_in_backward():
    """Gradients equal those of m/n·(W₀+sBA)x with n a constant, and differ from a differentiated norm."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16)
    model = torch.nn.Sequential(lin)
    rw.adapt(model, "dora", targets=["0"], r=4, alpha=8, trainable=None)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.5)
        layer.magnitude[3] = 0.0  # a zero magnitude: its gradient cannot come from the (zero) output row
    x = torch.randn(5, 7, 24, requires_grad=True)
    weight_out = torch.randn(5, 7, 16)
    (layer(x) * weight_out).sum().backward()
    ours = [layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad, x.grad]

    def reference(detach: bool):
        a = layer.lora_A.detach().clone().requires_grad_(True)
        b = layer.lora_B.detach().clone().requires_grad_(True)
        m = layer.magnitude.detach().clone().requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        v = lin.weight + layer.scale * b @ a
        n = torch.linalg.norm(v, dim=1)
        n = n.detach() if detach else n
        y = F.linear(xr, (m / n).unsqueeze(1) * v, lin.bias)
        (y * weight_out).sum().backward()
        return [a.grad, b.grad, m.grad, xr.grad]

    for got, want in zip(ours, reference(detach=True), strict=True):
        _close(got, want, atol=1e-5)
    differentiated = reference(detach=False)
    assert not torch.allclose(ours[0], differentiated[0], atol=1e-4)  # the property is discriminating


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_matches_peft_outputs_and_gradients(dropout):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, lora_dropout=dropout)
    pm, mine = _pair(cfg, "dora", r=4, alpha=8, dropout=dropout)
    g = torch.Generator().manual_seed(3)
    pairs = []
    with torch.no_grad():
        for name, layer in rw.adapter_layers(mine):
            pl = _peft_layer(pm, name)
            pa, pb = pl.lora_A["default"].weight, pl.lora_B["default"].weight
            pmag = pl.lora_magnitude_vector["default"].weight
            pb.copy_(torch.randn(pb.shape, generator=g) * 0.1)
            pmag.mul_(1 + 0.1 * torch.randn(pmag.shape, generator=g))
            layer.lora_A.copy_(pa)
            layer.lora_B.copy_(pb)
            layer.magnitude.copy_(pmag)
            pairs += [(layer.lora_A, pa), (layer.lora_B, pb), (layer.magnitude, pmag)]
    batch = lm_batches()[0]
    if dropout:
        pm.train(), mine.train()
    torch.manual_seed(11)
    loss_p, grads_p = _loss_and_grads(pm, batch, [p for _, p in pairs])
    torch.manual_seed(11)
    loss_m, grads_m = _loss_and_grads(mine, batch, [p for p, _ in pairs])
    _close(loss_m, loss_p, atol=1e-5)
    for gm, gp in zip(grads_m, grads_p, strict=True):
        _close(gm, gp, atol=1e-6)
    pm.eval(), mine.eval()
    _close(mine(**batch).logits, pm(**batch).logits, atol=1e-5)


# ====================================================================== VeRA
def test_vera_projections_equal_peft_bit_for_bit_and_outputs_match():
    cfg = peft.VeraConfig(r=4, target_modules=TARGETS, projection_prng_key=7, d_initial=0.1)
    pm, mine = _pair(cfg, "vera", r=4, seed=7)
    layers = rw.adapter_layers(mine)
    peft_a = next(iter(_peft_layer(pm, layers[0][0]).vera_A.values()))
    peft_b = next(iter(_peft_layer(pm, layers[0][0]).vera_B.values()))
    assert torch.equal(layers[0][1].vera_A, peft_a) and torch.equal(layers[0][1].vera_B, peft_b)
    g = torch.Generator().manual_seed(0)
    pairs = []
    with torch.no_grad():
        for name, layer in layers:
            pl = _peft_layer(pm, name)
            lb, ld = pl.vera_lambda_b["default"], pl.vera_lambda_d["default"]
            lb.copy_(torch.randn(lb.shape, generator=g) * 0.1)
            ld.copy_(torch.randn(ld.shape, generator=g))
            layer.vera_lambda_b.copy_(lb)
            layer.vera_lambda_d.copy_(ld)
            pairs += [(layer.vera_lambda_b, lb), (layer.vera_lambda_d, ld)]
            _close(layer.delta_weight(), pl.get_delta_weight("default"), atol=1e-6)
    batch = lm_batches()[1]
    loss_p, grads_p = _loss_and_grads(pm, batch, [p for _, p in pairs])
    loss_m, grads_m = _loss_and_grads(mine, batch, [p for p, _ in pairs])
    _close(loss_m, loss_p, atol=1e-5)
    for gm, gp in zip(grads_m, grads_p, strict=True):
        _close(gm, gp, atol=1e-6)


def test_vera_only_scalings_train_and_shared_bases_regenerate_from_seed(tmp_path):
    model = rw.adapt(make_tiny_llama(0), "vera", r=8, seed=3, d_initial=0.5)
    layers = rw.adapter_layers(model)
    a0, b0 = layers[0][1].vera_A, layers[0][1].vera_B
    a_copy, b_copy = a0.clone(), b0.clone()
    assert all(l.vera_A is a0 and l.vera_B is b0 for _, l in layers)  # one pair, shared by all layers
    assert a0.shape == (8, 64) and b0.shape == (64, 8)  # k_max = 64 (down_proj), d_max = 64 (gate/up)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_b", "vera_lambda_d"}
    assert rw.summary(model).trainable == sum(l.out_features + 8 for _, l in layers)
    assert all(torch.all(l.vera_lambda_b == 0) and torch.all(l.vera_lambda_d == 0.5) for _, l in layers)
    _train(model, steps=3)
    assert torch.equal(a0, a_copy) and torch.equal(b0, b_copy) and not a0.requires_grad
    assert any(l.vera_lambda_b.abs().max() > 0 for _, l in layers)
    # factors give the same ΔW, and the export shape is LoRA's
    for _, layer in layers:
        b, a, s = layer.factors()
        _close(b @ a * s, layer.delta_weight(), atol=1e-6)
    batch = lm_batches(seed=9)[0]
    expected = model(**batch).logits
    rw.save_adapter(model, tmp_path / "vera")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "vera" / "rankwise_adapter.safetensors"))
    assert not any("vera_A" in k or "vera_B" in k for k in saved)
    fresh = rw.load_adapter(make_tiny_llama(0), tmp_path / "vera")
    f_layer = rw.adapter_layers(fresh)[0][1]
    assert torch.equal(f_layer.vera_A, a0) and torch.equal(f_layer.vera_B, b0)
    assert torch.equal(fresh(**batch).logits, expected)
    other_a, _ = vera_projections(4, 8, 64, 64)
    assert not torch.equal(other_a, a0)  # a different seed gives different bases


def test_vera_bad_d_initial():
    with pytest.raises(ValueError, match="d_initial=0 must be a positive number"):
        rw.adapt(make_tiny_llama(0), "vera", r=4, d_initial=0)


@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_shared_bases_refuse_a_per_layer_rank(method):
    with pytest.raises(ValueError, match="per-layer r overrides are not supported"):
        rw.adapt(make_tiny_llama(0), method, r=4, overrides={"model.layers.0.self_attn.q_proj": {"r": 8}})


# ====================================================================== RandLoRA
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


# ====================================================================== Bone
def test_bone_delta_depends_on_w0_and_counts_block_times_out():
    r = 4
    model = rw.adapt(make_tiny_llama(0), "bone", r=r, targets=TARGETS, trainable=None)
    base = make_tiny_llama(0)
    batch = lm_batches()[0]
    _close(model(**batch).logits, base(**batch).logits, atol=1e-6)  # b = 0 at init
    for _, layer in rw.adapter_layers(model):
        assert layer.bone_block.shape == (layer.out_features // r, r, r)
        assert layer.trainable_count() == layer.out_features * r
    _train(model, steps=2)
    layer = rw.adapter_layers(model)[0][1]
    block = layer.bone_block.detach()
    w0 = layer.base_layer.weight.detach()
    w1 = w0 + torch.randn_like(w0)
    d0, d1 = bone_delta(w0, block), bone_delta(w1, block)
    assert not torch.allclose(d0, d1, atol=1e-3)
    # ΔW is affine in W₀: ΔW(W₁) − ΔW(W₀) = (W₁ − W₀) blockwise times b_a (the "Weight Guide")
    _close(d1 - d0, bone_delta(w1 - w0, block) - bone_delta(torch.zeros_like(w0), block), atol=1e-5)
    # block (a, c) explicitly
    a, c = 1, 2
    rows, cols = slice(a * r, (a + 1) * r), slice(c * r, (c + 1) * r)
    _close(d0[rows, cols], w0[rows, cols] @ block[a] + block[a], atol=1e-6)


def test_bone_matches_peft_miss_bat():
    cfg = peft.MissConfig(r=4, target_modules=TARGETS, init_weights="bat")
    pm, mine = _pair(cfg, "bone", r=4)
    g = torch.Generator().manual_seed(1)
    pairs = []
    with torch.no_grad():
        for name, layer in rw.adapter_layers(mine):
            pb = _peft_layer(pm, name).miss_block["default"]
            pb.copy_(torch.randn(pb.shape, generator=g) * 0.1)
            layer.bone_block.copy_(pb)
            pairs.append((layer.bone_block, pb))
    batch = lm_batches()[3]
    loss_p, grads_p = _loss_and_grads(pm, batch, [p for _, p in pairs])
    loss_m, grads_m = _loss_and_grads(mine, batch, [p for p, _ in pairs])
    _close(loss_m, loss_p, atol=1e-5)
    for gm, gp in zip(grads_m, grads_p, strict=True):
        _close(gm, gp, atol=1e-6)
    pm.merge_adapter()
    rw.merge(mine)
    for name, layer in rw.adapter_layers(mine):
        _close(layer.base_layer.weight, _peft_layer(pm, name).get_base_layer().weight, atol=1e-6)


def test_bone_block_size_must_divide_the_layer():
    with pytest.raises(ValueError, match="r=5 must divide in_features=32 and out_features=32"):
        rw.adapt(make_tiny_llama(0), "bone", r=5)


# ====================================================================== all four
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
