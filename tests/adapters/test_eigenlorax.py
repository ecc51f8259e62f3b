"""EigenLoRAx: coefficients over the frozen principal subspace of the model's LoRA adapters
(Kaushik et al. 2025)."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.adapters.eigenlorax import EigenLoRAxLayer

from ..conftest import lm_batches, make_tiny_llama

TARGETS = ["q_proj", "v_proj"]
IDS = lm_batches(n=1, batch=2, seq=8, seed=3)[0]["input_ids"]


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _train(model, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for batch in lm_batches(n=steps, batch=2, seq=8, seed=5):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()


@torch.no_grad()
def _sources_in_a_subspace(model, names=("t1", "t2"), r: int = 2, dim: int = 3, seed: int = 0):
    """LoRA adapters whose A rows all lie in one dim-dimensional subspace of ℝ^in and whose B columns
    all lie in one of ℝ^out (per layer), with non-trivial coefficients."""
    g = torch.Generator().manual_seed(seed)
    for name in names:
        rw.adapt(model, "lora", targets=TARGETS, r=r, name=name)
    for target in {t for t, _ in rw.adapter_layers(model, names[0])}:
        layers = [dict(rw.adapter_layers(model, n))[target] for n in names]
        in_basis = torch.randn(dim, layers[0].in_features, generator=g)
        out_basis = torch.randn(layers[0].out_features, dim, generator=g)
        for layer in layers:
            layer.lora_A.copy_(torch.randn(r, dim, generator=g) @ in_basis)
            layer.lora_B.copy_(out_basis @ torch.randn(dim, r, generator=g) * 0.3)
    return model


def _eigen_layers(model, name="eigenlorax"):
    return [layer for _, layer in rw.adapter_layers(model, name)]


def test_only_the_coefficients_train_and_their_count_is_2_r_k():
    model = _sources_in_a_subspace(make_tiny_llama(0))
    rw.eigenlorax(model, n_components=3, n_pseudo=2, r=2)
    layers = _eigen_layers(model)
    assert len(layers) == 2 * len(TARGETS)  # tiny llama: two blocks
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"eigen_alpha", "eigen_beta"}
    assert sum(p.numel() for p in trainable.values()) == len(layers) * 2 * 2 * (3 + 2)
    assert all(isinstance(layer, EigenLoRAxLayer) and layer.trainable_count() == 20 for layer in layers)
    assert rw.active_adapters(model) == ["eigenlorax"]  # the sources stay, inactive


def test_components_are_orthonormal_and_bit_identical_after_training():
    model = _sources_in_a_subspace(make_tiny_llama(0))
    rw.eigenlorax(model, n_components=3, n_pseudo=3, r=2, coef_init="uniform")
    frozen = {k: t.clone() for k, t in model.state_dict().items() if "eigen_V" in k or "lora_" in k}
    coefs = {k: t.clone() for k, t in model.state_dict().items() if "eigen_alpha" in k or "eigen_beta" in k}
    _train(model)
    state = model.state_dict()
    assert all(torch.equal(state[k], t) for k, t in frozen.items())  # components and sources untouched
    assert all(not torch.equal(state[k], t) for k, t in coefs.items())
    for layer in _eigen_layers(model):
        eye = torch.eye(6)
        torch.testing.assert_close(layer.eigen_VA @ layer.eigen_VA.T, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.eigen_VB.T @ layer.eigen_VB, eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["t1", "t2"])
@pytest.mark.parametrize("pseudo", [0, 2])
def test_a_source_in_the_span_is_reproduced_exactly_by_its_projection(source, pseudo):
    model = _sources_in_a_subspace(make_tiny_llama(0))
    reference = {t: layer.delta_weight() for t, layer in rw.adapter_layers(model, source)}
    rw.set_active(model, source)
    expected = _logits(model)
    rw.eigenlorax(model, n_components=3, n_pseudo=pseudo, r=2, init_from=source, alpha=4)
    for target, layer in rw.adapter_layers(model, "eigenlorax"):
        error = (layer.delta_weight() - reference[target]).norm() / reference[target].norm()
        assert error < 1e-4, (target, float(error))  # fp32 rounding (K = 2 misses by > 1e-2)
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=0)


def test_too_few_components_cannot_reproduce_the_source():
    """The same fit with K = 2 < the sources' 3 directions misses: the exact fit above is the span's."""
    model = _sources_in_a_subspace(make_tiny_llama(0))
    reference = {t: layer.delta_weight() for t, layer in rw.adapter_layers(model, "t1")}
    rw.eigenlorax(model, n_components=2, r=2, init_from="t1")
    errors = [(layer.delta_weight() - reference[t]).norm() / reference[t].norm()
              for t, layer in rw.adapter_layers(model, "eigenlorax")]
    assert min(errors) > 1e-2


@torch.no_grad()
def test_components_are_the_principal_directions_of_the_centered_factors():
    """Rows μ + t_j·e (‖μ‖ ≫ spread): the top centered component is ±e (uncentered it would be ≈ μ/‖μ‖)."""
    model = make_tiny_llama(0)
    rw.adapt(model, "lora", targets=["q_proj"], r=4, name="src")
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    directions = {}
    for target, layer in rw.adapter_layers(model, "src"):
        q_in, _ = torch.linalg.qr(torch.randn(layer.in_features, 2, generator=g))
        q_out, _ = torch.linalg.qr(torch.randn(layer.out_features, 2, generator=g))
        layer.lora_A.copy_(5 * q_in[:, 0][None, :] + t[:, None] * q_in[:, 1][None, :])
        layer.lora_B.copy_(5 * q_out[:, 0][:, None] + t[None, :] * q_out[:, 1][:, None])
        directions[target] = (q_in[:, 1], q_out[:, 1])
    rw.eigenlorax(model, n_components=1, r=4)
    for target, layer in rw.adapter_layers(model, "eigenlorax"):
        e_in, e_out = directions[target]
        assert abs(float(layer.eigen_VA[0] @ e_in)) > 1 - 1e-5
        assert abs(float(layer.eigen_VB[:, 0] @ e_out)) > 1 - 1e-5


def test_pseudo_components_complete_an_orthonormal_basis_and_a_bare_model_gets_only_them():
    model = _sources_in_a_subspace(make_tiny_llama(0))
    rw.eigenlorax(model, n_components=3, n_pseudo=4, r=2)
    for layer in _eigen_layers(model):
        torch.testing.assert_close(layer.eigen_VA @ layer.eigen_VA.T, torch.eye(7), atol=1e-5, rtol=0)
    bare = rw.adapt(make_tiny_llama(0), "eigenlorax", r=2, n_components=0, n_pseudo=5)
    assert rw.summary(bare).per_method["eigenlorax"] == len(_eigen_layers(bare, "default")) * 2 * 2 * 5
    torch.testing.assert_close(_logits(bare), _logits(make_tiny_llama(0)))  # β = 0: starts at the base


def test_peft_export_as_lora_reproduces_the_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = _sources_in_a_subspace(make_tiny_llama(0))
    rw.eigenlorax(model, n_components=3, n_pseudo=1, r=2, coef_init="uniform")
    _train(model, steps=2)
    rw.export_peft(model, tmp_path / "p", name="eigenlorax")
    loaded = peft.PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / "p").eval()
    torch.testing.assert_close(loaded(input_ids=IDS).logits.detach(), _logits(model), atol=1e-5, rtol=0)


def test_save_load_needs_no_sources(tmp_path):
    model = _sources_in_a_subspace(make_tiny_llama(0))
    rw.eigenlorax(model, n_components=3, r=2, coef_init="uniform")
    rw.save_adapter(model, tmp_path / "e", name="eigenlorax")
    back = rw.load_adapter(make_tiny_llama(0), tmp_path / "e")
    torch.testing.assert_close(_logits(back), _logits(model), atol=1e-6, rtol=0)


def test_bad_input_is_refused_before_the_model_changes():
    model = _sources_in_a_subspace(make_tiny_llama(0))
    before = rw.adapter_names(model)
    cases = [
        (dict(sources=["nope"]), "sources: unknown adapter"),
        (dict(sources=["t1"], init_from="t2"), "init_from='t2' must be one of the sources"),
        (dict(n_components=40), "exceeds min"),
        (dict(init_from="t1", r=3), "needs a rank-r=3"),
        (dict(coef_init="gauss"), "coef_init"),
        (dict(n_components=-1), "n_components"),
        (dict(n_components=0, n_pseudo=0), "must be >= 1"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            rw.adapt(model, "eigenlorax", targets=TARGETS, name="e", **{"r": 2, **kwargs})
        assert rw.adapter_names(model) == before
    with pytest.raises(ValueError, match="is not on layer"):
        rw.adapt(model, "eigenlorax", targets=["o_proj"], name="e", sources=["t1"], r=2)
    with pytest.raises(ValueError, match="eigenlorax needs LoRA adapters"):
        rw.eigenlorax(make_tiny_llama(0))
