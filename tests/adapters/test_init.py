"""Faithful tests of the adapter initializations (``adapters.init``): PiSSA, OLoRA, LoRA-GA (LoRA-shaped inits),
LoRA-XS, LoRA-SB, LoLDU, SVFit (core-matrix adapters); save/load/merge round trips of these methods (and
LoRA+), their option errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.gradients import estimate_gradients
from rankwise.adapters.init import InitContext, ldu, lora_ga_init
from rankwise.linalg import randomized_svd
from rankwise.targets import find_targets

from ..conftest import cls_batches, lm_batches, make_tiny_bert, make_tiny_llama


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def _rank_r(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def _originals(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in find_targets(model, "all-linear")}


def _train(model: nn.Module, data: list[dict], steps: int = 3, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        opt.zero_grad()
        model(**data[i % len(data)]).loss.backward()
        opt.step()
    model.eval()


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _frozen(layer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.named_buffers() if not k.startswith("base_layer.") and k != "core_init"}


# ------------------------------------------------------------------------------------ PiSSA
def test_pissa_residual_plus_principal_is_w0_and_eckart_young():
    base, data = make_tiny_bert(), cls_batches(n=1)
    w0 = _originals(base)
    model = rw.adapt(copy.deepcopy(base), "pissa", r=4, alpha=8)
    for name, layer in rw.adapter_layers(model):
        principal = layer.delta_weight()
        assert torch.allclose(layer.base_layer.weight + principal, w0[name], atol=1e-6)
        s = torch.linalg.svdvals(w0[name])
        residual = (w0[name] - principal).pow(2).sum()
        assert torch.isclose(residual, s[4:].pow(2).sum(), rtol=1e-4)  # optimal rank-4 part
        assert torch.allclose(layer.lora_B.T @ layer.lora_B * layer.scale, torch.diag(s[:4]), atol=1e-5)
    assert torch.allclose(_logits(model, data[0]), _logits(base, data[0]), atol=1e-5)


def test_pissa_randomized_svd_matches_exact_on_decaying_spectrum():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 48, generator=g))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    spectrum = 0.7 ** torch.arange(40.0)
    w = (u[:, :40] * spectrum) @ v.T

    def adapted(**kw):
        model = nn.Sequential(nn.Linear(40, 64))
        with torch.no_grad():
            model[0].weight.copy_(w)
        rw.adapt(model, "pissa", targets=["0"], r=6, trainable=None, **kw)
        return model[0]

    exact, fast = adapted(), adapted(init_iters=2)
    rel = (fast.delta_weight() - exact.delta_weight()).norm() / exact.delta_weight().norm()
    assert rel < 1e-4
    assert torch.allclose(fast.base_layer.weight + fast.delta_weight(), w, atol=1e-5)
    assert torch.equal(adapted(init_iters=2).lora_A, fast.lora_A)  # deterministic (layer generator)
    # the range finder itself: same singular values as LAPACK, to fp tolerance
    _, s_fast, _ = randomized_svd(w, 6, iters=2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(s_fast, spectrum[:6], rtol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_parity(init):
    import peft
    base, batch = make_tiny_bert(), cls_batches(n=1)[0]
    targets = ["query", "value", "dense"]
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init)
    ).eval()
    ours = rw.adapt(copy.deepcopy(base), init, r=4, alpha=8, targets=targets)
    assert torch.allclose(_logits(ours, batch), _logits(theirs, batch), atol=1e-6)
    for name, layer in rw.adapter_layers(ours):
        ref = theirs.base_model.model.get_submodule(name)
        # equal up to the sign ambiguity of each singular vector / QR column
        assert torch.allclose(layer.lora_B.abs(), ref.lora_B["default"].weight.abs(), atol=1e-5)
        assert torch.allclose(layer.lora_A.abs(), ref.lora_A["default"].weight.abs(), atol=1e-5)
        assert torch.allclose(layer.base_layer.weight, ref.base_layer.weight, atol=1e-6)


# ------------------------------------------------------------------------------------ OLoRA
def test_olora_orthonormal_b_and_exact_reconstruction():
    base, data = make_tiny_llama(), lm_batches(n=1)
    w0 = _originals(base)
    model = rw.adapt(copy.deepcopy(base), "olora", r=4, alpha=16)
    for name, layer in rw.adapter_layers(model):
        assert torch.allclose(layer.lora_B.T @ layer.lora_B, torch.eye(4), atol=1e-5)
        assert torch.allclose(torch.triu(layer.lora_A[:, :4]), layer.lora_A[:, :4])  # R is upper-triangular
        assert torch.allclose(layer.base_layer.weight + layer.scale * layer.lora_B @ layer.lora_A, w0[name], atol=1e-6)
    assert torch.allclose(_logits(model, data[0]), _logits(base, data[0]), atol=1e-5)


# ------------------------------------------------------------------------------------ LoRA-GA
def _first_lora_update_cosines(method: str, r: int = 2) -> list[float]:
    """cos(first LoRA-equivalent update, best rank-2r approx of the full update −ηG), per layer."""
    base, data = make_tiny_llama(), lm_batches(n=2)
    names = [n for n, _ in find_targets(base, "all-linear")]
    grads = estimate_gradients(copy.deepcopy(base), names, data)
    model = rw.adapt(copy.deepcopy(base), method, r=r, init_data=data, trainable=None)
    model.train()
    (sum(model(**b).loss for b in data) / len(data)).backward()
    out = []
    for name, layer in rw.adapter_layers(model):
        # one SGD step: ΔW ≈ s(ΔB·A₀ + B₀·ΔA) = −η·s·(g_B·A₀ + B₀·g_A)
        update = -(layer.lora_B.grad @ layer.lora_A + layer.lora_B @ layer.lora_A.grad).detach()
        out.append(_cos(update, _rank_r(-grads[name], 2 * r)))
    return out


def test_lora_ga_first_step_is_best_rank_2r_gradient_step():
    ga, default = _first_lora_update_cosines("lora_ga"), _first_lora_update_cosines("lora")
    assert min(ga) > 0.999
    assert max(default) < 0.6 and sum(default) / len(default) < 0.4


def test_lora_ga_takes_a_from_the_top_r_and_b_from_the_next_r_singular_vectors():
    """Thm 3.1: A₀ = ζ·V[:, :r]ᵀ and B₀ = ζ·U[:, r:2r] of the gradient's SVD (not the other way round)."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    v, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    grad = (u[:, :10] * torch.arange(10, 0, -1).float()) @ v.T  # distinct singular values 10, 9, ..., 1
    f = lora_ga_init(torch.zeros(12, 10), InitContext(name="w", grad=grad, r=2))
    zeta = 12**0.25 / 16**0.5  # ζ = d_out^{1/4}/√γ with the default γ = 16
    torch.testing.assert_close((f.right @ v[:, :2]).abs(), zeta * torch.eye(2), atol=1e-5, rtol=0)
    torch.testing.assert_close((u[:, 2:4].T @ f.left).abs(), zeta * torch.eye(2), atol=1e-5, rtol=0)


def test_lora_ga_stable_scale_and_base_offset():
    base, data = make_tiny_llama(), lm_batches(n=2)
    w0 = _originals(base)
    model = rw.adapt(copy.deepcopy(base), "lora_ga", r=2, init_data=data, stable_gamma=4.0)
    for name, layer in rw.adapter_layers(model):
        zeta2 = layer.out_features**0.5 / 4.0  # ζ² = √d_out / γ
        assert torch.allclose(layer.lora_A @ layer.lora_A.T, zeta2 * torch.eye(2), atol=1e-5)
        assert torch.allclose(layer.lora_B.T @ layer.lora_B, zeta2 * torch.eye(2), atol=1e-5)
        assert torch.allclose(layer.original_weight(), w0[name], atol=1e-6)
    assert torch.allclose(_logits(model, data[0]), _logits(base, data[0]), atol=1e-5)


# ------------------------------------------------------------------------------------ LoRA-XS
def test_lora_xs_r_squared_frozen_svd_factors_and_export():
    base, data = make_tiny_bert(), cls_batches(n=2)
    w0 = _originals(base)
    model = rw.adapt(copy.deepcopy(base), "lora_xs", r=4, alpha=16, trainable=None)
    layers = rw.adapter_layers(model)
    for name, layer in layers:
        assert layer.trainable_count() == 16 and layer.core.shape == (4, 4)
        assert torch.allclose(layer.frozen_B.T @ layer.frozen_B, torch.eye(4), atol=1e-5)  # B = U_r
        assert torch.allclose(layer.frozen_B @ layer.frozen_A, _rank_r(w0[name], 4), atol=1e-5)  # B·A = U_r S_r V_rᵀ
    before = {n: _frozen(l) for n, l in layers}
    core0 = {n: l.core.detach().clone() for n, l in layers}
    _train(model, data)
    for name, layer in layers:
        assert all(torch.equal(t, before[name][k]) for k, t in _frozen(layer).items())
        assert not torch.equal(layer.core, core0[name])
    # the exported pair (B·R, A) applied to the untouched base reproduces the adapted outputs
    plain = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in layers:
            b, a, s = layer.factors()
            plain.get_submodule(name).weight.add_(s * b @ a)
    assert torch.allclose(_logits(plain, data[0]), _logits(model, data[0]), atol=1e-5)


# ------------------------------------------------------------------------------------ LoRA-SB
@pytest.mark.parametrize("update", ["adam", "sgd"])
def test_lora_sb_init_is_best_rank_r_first_update(update):
    base, data = make_tiny_llama(), lm_batches(n=2)
    w0 = _originals(base)
    grads = estimate_gradients(copy.deepcopy(base), list(w0), data)
    model = rw.adapt(copy.deepcopy(base), "lora_sb", r=4, init_data=data, init_lr=1e-2, update=update)
    for name, layer in rw.adapter_layers(model):
        step = torch.sign(grads[name]) if update == "adam" else grads[name]
        first = -1e-2 * step  # the estimated first full fine-tuning update ΔW₁
        init = layer.delta_weight()  # s·B·R·A
        s = torch.linalg.svdvals(first)
        assert torch.isclose((first - init).pow(2).sum(), s[4:].pow(2).sum(), rtol=1e-4)  # Eckart–Young
        assert torch.allclose(init, _rank_r(first, 4), atol=1e-6)
        assert torch.equal(layer.base_layer.weight, w0[name])  # the paper does not offset W₀
        assert layer.trainable_count() == 16
    assert not torch.allclose(_logits(model, data[0]), _logits(base, data[0]), atol=1e-4)


def test_lora_sb_b_and_a_never_change():
    data = lm_batches(n=2)
    model = rw.adapt(make_tiny_llama(), "lora_sb", r=4, init_data=data)
    layers = rw.adapter_layers(model)
    before = {n: _frozen(l) for n, l in layers}
    core0 = {n: l.core.detach().clone() for n, l in layers}
    _train(model, data)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16 * len(layers)
    for name, layer in layers:
        assert set(before[name]) == {"frozen_B", "frozen_A"}
        assert all(torch.equal(t, before[name][k]) for k, t in _frozen(layer).items())
        assert not torch.equal(layer.core, core0[name])


# ------------------------------------------------------------------------------------ LoLDU
def test_ldu_factors_reconstruct_the_weight():
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    perm, lower, d, upper = ldu(w)
    assert torch.allclose(((lower * d) @ upper)[perm], w, atol=1e-5)  # W = P·L·diag(d)·U, P·M = M[perm]
    assert torch.equal(torch.diagonal(lower), torch.ones(16)) and torch.all(torch.triu(lower, 1) == 0)
    assert torch.allclose(torch.diagonal(upper), torch.ones(16)) and torch.all(torch.tril(upper, -1) == 0)
    with pytest.raises(ValueError, match="zero LU pivot"):
        ldu(torch.zeros(4, 4), 2)


def test_loldu_trains_only_the_diagonal_of_fixed_unit_triangular_factors():
    base, data = make_tiny_bert(), cls_batches(n=2)
    w0 = _originals(base)
    model = rw.adapt(copy.deepcopy(base), "loldu", r=4, trainable=None)
    layers = rw.adapter_layers(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * len(layers)
    assert torch.allclose(_logits(model, data[0]), _logits(base, data[0]), atol=1e-5)
    for name, layer in layers:
        lower, upper = layer.frozen_B, layer.frozen_A
        assert layer.trainable_count() == 4 and layer.core.shape == (4,)
        assert torch.equal(torch.diagonal(lower[:4]), torch.ones(4)) and torch.all(torch.triu(lower[:4], 1) == 0)
        assert torch.allclose(torch.diagonal(upper), torch.ones(4)) and torch.all(torch.tril(upper, -1) == 0)
        assert torch.allclose(layer.original_weight(), w0[name], atol=1e-6)
        assert torch.allclose(layer.core, ldu(w0[name], 4)[2])  # z starts at the LDU pivots D_r
    before = {n: _frozen(l) for n, l in layers}
    _train(model, data)
    for name, layer in layers:
        assert all(torch.equal(t, before[name][k]) for k, t in _frozen(layer).items())


# ------------------------------------------------------------------------------------ SVFit
def test_svfit_trains_top_singular_values_in_fixed_subspaces():
    base, data = make_tiny_bert(), cls_batches(n=2)
    w0 = _originals(base)
    model = rw.adapt(copy.deepcopy(base), "svfit", r=3, trainable=None)
    layers = rw.adapter_layers(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3 * len(layers)
    assert torch.allclose(_logits(model, data[0]), _logits(base, data[0]), atol=1e-5)
    for name, layer in layers:
        assert torch.allclose(layer.core, torch.linalg.svdvals(w0[name])[:3], atol=1e-5)
    before = {n: _frozen(l) for n, l in layers}
    _train(model, data)
    for name, layer in layers:
        assert all(torch.equal(t, before[name][k]) for k, t in _frozen(layer).items())
        u, vh = layer.frozen_B, layer.frozen_A
        delta = (layer.base_layer.weight + layer.delta_weight() - w0[name]).detach()
        assert delta.norm() > 1e-4
        assert torch.linalg.matrix_rank(delta, atol=1e-5) <= 3
        assert torch.allclose(u @ (u.T @ delta), delta, atol=1e-5)  # columns in span(U_r)
        assert torch.allclose((delta @ vh.T) @ vh, delta, atol=1e-5)  # rows in span(V_r)


def test_svfit_energy_rule_sets_a_per_layer_rank(tmp_path):
    base, data = make_tiny_bert(), cls_batches(n=1)
    model = rw.adapt(copy.deepcopy(base), "svfit", energy=0.9)
    ranks = set()
    for _name, layer in rw.adapter_layers(model):
        power = torch.linalg.svdvals(layer.original_weight()).double() ** 2
        share = torch.cumsum(power, 0) / power.sum()
        r = layer.r
        assert share[r - 1] >= 0.9 and (r == 1 or share[r - 2] < 0.9)
        assert layer.trainable_count() == r == layer.core.numel()
        ranks.add(r)
    assert len(ranks) > 1  # query/value (32x32) and the MLP (64x32) need different ranks
    _randomize(model)
    rw.save_adapter(model, tmp_path / "a")
    fresh = rw.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert torch.allclose(_logits(fresh, data[0]), _logits(model, data[0]), atol=1e-5)


# ------------------------------------------------------------------------------------ round trips
def _randomize(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            for _name, p in layer.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)


CASES = [
    ("pissa", {"init_iters": 2, "alpha": 8}),
    ("olora", {"use_rslora": True}),
    ("lora_ga", {"stable_gamma": 8.0}),
    ("loraplus", {}),
    ("lora_xs", {"alpha": 16, "init_std": 0.0}),
    ("lora_sb", {"update": "sgd", "init_lr": 1e-2}),
    ("loldu", {"alpha": 2.0}),
    ("svfit", {"energy": 0.8}),
]


@pytest.mark.parametrize(("method", "options"), CASES, ids=[c[0] for c in CASES])
def test_save_load_merge_unmerge(method, options, tmp_path):
    base, data = make_tiny_llama(), lm_batches(n=2)
    model = rw.adapt(copy.deepcopy(base), method, r=2, init_data=data, **options)
    _randomize(model)
    expected = _logits(model, data[1])
    rw.save_adapter(model, tmp_path / "adapter")
    fresh = rw.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    assert torch.allclose(_logits(fresh, data[1]), expected, atol=1e-6)
    frozen = {n: l.base_layer.weight.clone() for n, l in rw.adapter_layers(fresh)}
    rw.merge(fresh)
    assert torch.allclose(_logits(fresh, data[1]), expected, atol=1e-5)
    rw.unmerge(fresh)
    for name, layer in rw.adapter_layers(fresh):
        assert torch.allclose(layer.base_layer.weight, frozen[name], atol=1e-6)
    plain = rw.unload(fresh)
    assert torch.allclose(_logits(plain, data[1]), _logits(base, data[1]), atol=1e-5)


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("svfit", {"energy": 1.5}, "energy=1.5 must be in (0, 1]"),
        ("lora_xs", {"init_std": -1.0}, "init_std=-1.0 must be a number >= 0"),
        ("lora_sb", {"update": "rmsprop"}, "update='rmsprop' is not allowed; choose one of ['adam', 'sgd']"),
        ("lora_sb", {"init_lr": 0}, "init_lr=0 must be a positive number"),
        ("loldu", {"alpha": 0}, "alpha=0 must be a positive number"),
        ("lora_ga", {"stable_gamma": 0}, "stable_gamma=0 must be a positive number"),
        ("lora_ga", {"r": 10}, "r=10 is too large for LoRA-GA"),
        ("lora_xs", {"energy": 0.9}, "unknown option(s) ['energy'] for method 'lora_xs'"),
    ],
)
def test_bad_options(method, options, message):
    options = {"r": 4, **options}
    with pytest.raises(ValueError) as err:
        rw.adapt(make_tiny_llama(), method, init_data=lm_batches(n=1), **options)
    assert message in str(err.value)


def test_gradient_inits_need_data():
    for method in ("lora_ga", "lora_sb"):
        with pytest.raises(ValueError, match="needs init_data"):
            rw.adapt(make_tiny_bert(), method, r=2)
