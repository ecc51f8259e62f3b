"""rw.sparsify and the faithful test of each structured-training method (SLTrain, ReLoRA, SST, TRP, Maestro)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise import catalogue
from rankwise.checkpoint import trained_tensors
from rankwise.sparse import (
    SST,
    TRP,
    Maestro,
    MaestroLinear,
    ReLoRA,
    SparseLowRankLinear,
    SpectralLinear,
    TRPLinear,
    decompose,
    densify,
    nuclear_subgradient,
    relora_schedule,
    sample_active,
    sampling_probabilities,
    truncate,
)
from rankwise.sparse.layers import FactorizedLinear
from rankwise.sparse.relora import lora_parameters

from ..conftest import lm_batches, make_tiny_llama

METHOD_CONFIGS = {
    "sltrain": {"rank": 4, "density": 0.1},
    "sst": {"rank": 4},
    "trp": {},
    "maestro": {},
    "relora": {"rank": 4},
    "lte": {"heads": 2, "rank": 2},
    "slope": {"rank": 4},
    "refactor_reset": {"rank": 4},
}



def orthogonal_pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q1, q2


def train_lm(model, steps: int, controller=None, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for batch in lm_batches(n=steps, batch=2, seq=8):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if controller is not None:
            controller.step()


# ---------------------------------------------------------------------------- sparsify / densify
@pytest.mark.parametrize("method", [r.name for r in catalogue.records(api="sparsify")])
def test_sparsify_trains_and_densify_keeps_the_function(method):
    """Generic, for every catalogued structured method (options for this tiny model from METHOD_CONFIGS)."""
    model = rw.sparsify(make_tiny_llama(), method, **METHOD_CONFIGS.get(method, {}))
    assert model.rankwise_sparse.method == method and len(model.rankwise_sparse.layers) == 14
    train_lm(model, 2)
    ids = torch.randint(1, 100, (2, 8))
    model.eval()  # the inference function (LTE's heads are per-chunk in training)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        densify(model)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj")))


@pytest.mark.parametrize("method", [r.name for r in catalogue.records(api="sparsify")])
def test_sparsified_model_trains_under_bf16_autocast(method):
    """Generic: the forward under CPU bf16 autocast, the backward outside it (torch's AMP recipe): every
    trainable gradient in its parameter's dtype, within bf16 rounding of the fp32 pass's."""
    model = rw.sparsify(make_tiny_llama(), method, **METHOD_CONFIGS.get(method, {}))
    batch = lm_batches(n=1, batch=2, seq=8)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    exact = torch.autograd.grad(model(**batch).loss, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    got = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g, want in zip(params, got, exact, strict=True):
        assert g is not None and g.dtype == p.dtype
        assert (g - want).norm() <= 0.08 * want.norm() + 1e-6


@pytest.mark.parametrize("method", ["sltrain", "sst", "maestro"])
def test_structured_layers_parameter_count_formula(method):
    model = rw.sparsify(make_tiny_llama(), method, **METHOD_CONFIGS[method])
    layers = [m for m in model.modules() if hasattr(m, "trainable_count")]
    assert len(layers) == 14
    for m in layers:
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) == m.trainable_count()


def test_sparsify_zero_distortion_for_svd_based_methods():
    ids = torch.randint(1, 100, (2, 8))
    ref = make_tiny_llama()(input_ids=ids).logits
    for method in ("sst", "trp", "maestro", "relora"):
        out = rw.sparsify(make_tiny_llama(), method, **METHOD_CONFIGS[method])(input_ids=ids).logits
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("nope", {}, "method='nope' is not allowed; choose one of ["),
        ("sltrain", {"density": 0.0}, "density=0.0 must be a number in (0, 1]"),
        ("sltrain", {"density": 1.2}, "density=1.2 must be a number in (0, 1]"),
        ("sltrain", {"rank": 20},
         "rank=20 is larger than min(out_features, in_features)=16 of 'model.layers.0.self_attn.k_proj'"),
        ("sst", {"rank": 0}, "rank=0 must be a positive integer"),
        ("maestro", {"rank": 40}, "rank=40 is larger than min(out_features, in_features)"),
        ("sltrain", {"kernel": "gpu"}, "kernel='gpu' is not allowed"),
        ("sltrain", {"r": 4}, "unknown option(s) ['r'] for sparse method 'sltrain'; allowed options: ["),
        ("trp", {"targets": ["embed_tokens"]}, "only nn.Linear modules can be adapted"),
        ("relora", {"rank": 64},
         "rank=64 is larger than min(out_features, in_features)=32 of 'model.layers.0.self_attn.q_proj'"),
    ],
)
def test_sparsify_bad_input(method, kwargs, message):
    kwargs = {**METHOD_CONFIGS.get(method, {}), **kwargs}
    with pytest.raises(ValueError) as err:
        rw.sparsify(make_tiny_llama(), method, **kwargs)
    assert message in str(err.value)


def test_sparsify_twice_is_refused():
    model = rw.sparsify(make_tiny_llama(), "trp")
    with pytest.raises(ValueError, match="already sparsified"):
        rw.sparsify(model, "sltrain", rank=2)


# ---------------------------------------------------------------------------- SLTrain
def test_sltrain_fixed_support_exact_size_no_dense_weight_and_output_formula():
    model = rw.sparsify(make_tiny_llama(), "sltrain", rank=4, density=0.1, alpha=8.0, seed=3)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLowRankLinear)}
    assert len(layers) == 14
    before = {}
    for name, layer in layers.items():
        m, n = layer.out_features, layer.in_features
        assert layer.nnz == int(0.1 * m * n) and layer.index.unique().numel() == layer.nnz
        assert not any(p.shape == (m, n) for p in layer.parameters())  # W is never a parameter
        assert torch.count_nonzero(layer.B) == 0 and layer.scale == 8.0 / 4  # B = 0, scale α/r
        bound = 1 / n**0.5
        assert float(layer.values.detach().abs().max()) <= bound and float(layer.A.detach().abs().max()) <= bound
        before[name] = (layer.index.clone(), layer.values.detach().clone())
    train_lm(model, 3)
    x = torch.randn(3, 32)
    for name, layer in layers.items():
        index, values = before[name]
        assert torch.equal(layer.index, index)  # support identical after training
        assert not torch.equal(layer.values.detach(), values)  # ... while its values were learned
        if layer.in_features != 32:
            continue
        scatter = torch.zeros(layer.out_features * layer.in_features).index_add_(0, layer.index, layer.values.detach())
        w = layer.scale * layer.B.detach() @ layer.A.detach() + scatter.view(layer.out_features, layer.in_features)
        torch.testing.assert_close(layer(x).detach(), x @ w.T, atol=1e-5, rtol=1e-5)


def test_sltrain_supports_are_seeded_per_layer_and_state_dict_round_trips():
    a = rw.sparsify(make_tiny_llama(), "sltrain", rank=4, density=0.1, seed=0)
    b = rw.sparsify(make_tiny_llama(), "sltrain", rank=4, density=0.1, seed=1)
    q0, k0 = a.model.layers[0].self_attn.q_proj, a.model.layers[0].self_attn.k_proj
    assert not torch.equal(q0.index, k0.index[: q0.nnz]) or q0.nnz != k0.nnz
    assert not torch.equal(q0.index, b.model.layers[0].self_attn.q_proj.index)
    train_lm(a, 2)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(1, 100, (2, 8))
    torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits)
    assert torch.equal(b.model.layers[0].self_attn.q_proj.index, q0.index)


# ---------------------------------------------------------------------------- ReLoRA
def relora_setup(reset: str, prune_ratio: float = 0.9):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
    rw.sparsify(model, "relora", rank=2, alpha=4.0, targets=["0", "2"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    sched = relora_schedule(opt, total_steps=20, warmup_steps=2, restart_every=5, restart_warmup_steps=2)
    relora = ReLoRA(model, opt, merge_every=5, reset=reset, prune_ratio=prune_ratio)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(8, 16, generator=g)
    x = torch.randn(64, 16, generator=g)
    y = torch.tanh(x @ target.T) * 3
    return model, opt, sched, relora, x, y


def test_relora_segments_are_rank_r_and_cumulative_update_is_high_rank():
    model, opt, sched, relora, x, y = relora_setup("zero")
    layer = model[0]
    w0 = layer.base_layer.weight.detach().clone()
    seg_start = w0.clone()
    nonlora = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in lora_parameters(model))]
    assert nonlora  # biases / other layers train in full (ReLoRA keeps them trainable)
    lrs = []
    for step in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        (model(x) - y).square().mean().backward()
        opt.step()
        sched.step()
        delta = layer.delta_weight().detach().clone()
        other_state = {id(p): opt.state[p]["exp_avg"].clone() for p in nonlora}
        out_before = model(x).detach()
        merged = relora.step()
        opt.zero_grad()
        assert merged == ((step + 1) % 5 == 0)
        if not merged:
            assert torch.equal(layer.base_layer.weight, seg_start)  # the base only moves at merges
            continue
        w = layer.base_layer.weight.detach()
        torch.testing.assert_close(w - seg_start, delta)  # the merged segment update is s·B·A ...
        assert torch.linalg.matrix_rank(w - seg_start) <= 2  # ... of rank <= r
        torch.testing.assert_close(model(x).detach(), out_before, atol=1e-5, rtol=1e-5)  # merge keeps f
        assert torch.count_nonzero(layer.lora_B) == 0
        for p in lora_parameters(model):  # A/B optimizer state reset ...
            assert all(torch.count_nonzero(opt.state[p][k]) == 0 for k in ("exp_avg", "exp_avg_sq"))
        for p in nonlora:  # ... the rest untouched
            assert torch.equal(opt.state[p]["exp_avg"], other_state[id(p)])
        seg_start = w.clone()
    assert relora.merges == 4
    assert torch.linalg.matrix_rank(layer.base_layer.weight - w0) > 2  # high rank from low-rank updates
    for k in (5, 10, 15):  # jagged schedule: LR falls to 0 at each merge and re-warms
        assert lrs[k] == 0.0 < lrs[k + 1] < lrs[k + 2]
        assert lrs[k - 1] > lrs[k + 1]


def test_relora_state_holds_the_merged_base_so_a_resume_continues_from_it():
    model, opt, sched, relora, x, y = relora_setup("zero")
    for _ in range(5):  # one merge
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
        relora.step()
    fresh, _, _, fresh_relora, _, _ = relora_setup("zero")
    saved = trained_tensors(model)
    with torch.no_grad():  # what a checkpoint of the trained tensors restores ...
        for k, t in trained_tensors(fresh).items():
            t.copy_(saved[k])
    fresh_relora.load_state_dict(relora.state_dict())  # ... and the controller's own state
    assert (fresh_relora.steps, fresh_relora.merges) == (5, 1)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="other layers"):
        fresh_relora.load_state_dict({**relora.state_dict(), "base": {}})


def test_relora_magnitude_pruning_keeps_the_largest_state():
    model, opt, sched, relora, x, y = relora_setup("prune", prune_ratio=0.9)
    for _ in range(4):
        (model(x) - y).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        relora.step()
    params = (model[0].lora_A, model[0].lora_B)
    snapshot = [opt.state[p]["exp_avg"].clone() for p in params]
    relora.reset_optimizer_state()
    for p, before in zip(params, snapshot, strict=True):
        assert torch.count_nonzero(before) == before.numel()
        after = opt.state[p]["exp_avg"]
        kept = after != 0
        assert int(kept.sum()) == before.numel() - int(0.9 * before.numel())  # 90% pruned
        assert float(before.abs()[kept].min()) >= float(before.abs()[~kept].max())  # by magnitude
        assert torch.equal(after[kept], before[kept])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"merge_every": 0}, "merge_every=0 must be an integer >= 1"),
        ({"reset": "half"}, "reset='half' is not allowed"),
        ({"prune_ratio": 0.0}, "prune_ratio=0.0 must be a number in (0, 1]"),
        ({"prune_ratio": 1.5}, "prune_ratio=1.5 must be a number in (0, 1]"),
    ],
)
def test_relora_bad_input(kwargs, message):
    model = rw.sparsify(nn.Sequential(nn.Linear(4, 4)), "relora", rank=2, targets=["0"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError) as err:
        ReLoRA(model, opt, **{"merge_every": 5, **kwargs})
    assert message in str(err.value)
    with pytest.raises(ValueError, match="restart_warmup_steps=5 must be < restart_every=5"):
        relora_schedule(opt, 20, 2, 5, 5)


# ---------------------------------------------------------------------------- SST
def sst_layer(seed: int = 0, rank: int = 3) -> tuple[nn.Module, SpectralLinear]:
    torch.manual_seed(seed)
    model = rw.sparsify(nn.Sequential(nn.Linear(10, 12)), "sst", rank=rank, seed=seed, targets=["0"])
    return model, model[0]


def test_sst_trains_under_bf16_autocast():
    """Mixed precision: bf16 activations in, fp32 gradients of Σ and the active vectors out, close to fp32's."""
    model, layer = sst_layer()
    x = torch.randn(16, 10)
    params = [layer.sigma, layer.u_active, layer.vh_active, layer.bias]
    exact = torch.autograd.grad(model(x).square().mean(), params)
    x_bf16 = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x_bf16).float().square().mean()
    grads = torch.autograd.grad(loss, [x_bf16, *params])
    assert grads[0].dtype == torch.bfloat16
    for got, want in zip(grads[1:], exact, strict=True):
        assert got.dtype == torch.float32 and (got - want).norm() <= 0.05 * want.norm()


def test_sst_all_sigma_every_step_only_sampled_vectors():
    model, layer = sst_layer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sst = SST(model, opt, iteration_steps=3, iterations_per_round=100)
    x, y = torch.randn(32, 10), torch.randn(32, 12)
    for _ in range(2):
        u0, vh0 = layer.full_factors()
        s0 = layer.sigma.detach().clone()
        active = layer.active.clone()
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sst.step()
        u1, vh1 = layer.full_factors()
        assert bool((layer.sigma.detach() != s0).all())  # every singular value moved
        frozen = torch.ones(layer.inner_dim, dtype=torch.bool)
        frozen[active] = False
        assert torch.equal(u1[:, frozen], u0[:, frozen]) and torch.equal(vh1[frozen], vh0[frozen])
        assert not torch.equal(u1[:, active], u0[:, active]) and not torch.equal(vh1[active], vh0[active])
        torch.testing.assert_close(layer.u_active.norm(dim=0), torch.ones(3))  # unit singular vectors
        torch.testing.assert_close(layer.vh_active.norm(dim=1), torch.ones(3))
        assert bool((layer.sigma >= 0).all())
    # end of the iteration (3 steps): commit, resample, optimizer state of the active vectors reset
    (model(x) - y).square().mean().backward()
    opt.step()
    opt.zero_grad()
    layer.project_()  # what sst.step() does first (idempotent)
    w_before = layer.dense_weight()
    sst.step()
    assert sst.iterations == 1 and len(opt.state[layer.u_active]) == 0 and len(opt.state[layer.sigma]) > 0
    torch.testing.assert_close(layer.dense_weight(), w_before)  # committing / resampling keeps W


def test_sst_enhanced_gradient_is_dLdW_times_singular_vectors():
    model, layer = sst_layer(seed=1)
    x = torch.randn(7, 10)
    w = layer.dense_weight().requires_grad_(True)
    g = torch.randn(7, 12)
    (nn.functional.linear(x, w, layer.bias.detach()) * g).sum().backward()
    dw = w.grad  # ∂L/∂W of the same loss
    (model(x) * g).sum().backward()
    u, vh = layer.full_factors()
    torch.testing.assert_close(layer.u_active.grad, dw @ vh[layer.active].T)  # (∂L/∂W) V_I, no Σ factor
    torch.testing.assert_close(layer.vh_active.grad, (dw.T @ u[:, layer.active]).T)
    torch.testing.assert_close(layer.sigma.grad, torch.einsum("oi,om,mi->m", dw, u, vh))  # U_iᵀ (∂L/∂W) V_i


def test_sst_sampling_frequency_follows_singular_values():
    sigma = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    for mix in (0.0, 0.5):
        p = sampling_probabilities(sigma, mix)
        if mix == 0.0:
            torch.testing.assert_close(p, sigma / sigma.sum())  # frequency ∝ σ_i
        else:
            torch.testing.assert_close(p, 0.5 / 6 + 0.5 * sigma / sigma.sum())  # SST's ½(1/m + σ_i/Σσ)
        n = 5000
        counts = torch.bincount(torch.cat([sample_active(sigma, 1, g, mix) for _ in range(n)]), minlength=6)
        freq = counts / n
        assert bool(((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9).all())
    draws = sample_active(sigma, 4, g)
    assert draws.unique().numel() == 4  # r distinct vectors per iteration


def test_sst_round_end_resvd_restores_orthonormal_bases():
    model, layer = sst_layer(seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2)
    sst = SST(model, opt, iteration_steps=2, iterations_per_round=2)
    x, y = torch.randn(32, 10), torch.randn(32, 12)
    for step in range(4):
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 3:
            layer.project_()  # what sst.step() does first (idempotent)
            w_before = layer.dense_weight()
            u, _ = layer.full_factors()
            assert not torch.allclose(u.T @ u, torch.eye(10), atol=1e-4)  # training broke orthogonality
        sst.step()
    assert sst.iterations == 2  # one round done: re-SVD
    u, vh = layer.full_factors()
    torch.testing.assert_close(u.T @ u, torch.eye(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(vh @ vh.T, torch.eye(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.dense_weight(), w_before, atol=1e-5, rtol=1e-5)
    assert bool((layer.sigma[:-1] >= layer.sigma[1:]).all()) and len(opt.state[layer.sigma]) == 0


def test_sst_state_dict_round_trip():
    model, layer = sst_layer(seed=3)
    other, _ = sst_layer(seed=4)
    other.load_state_dict(model.state_dict())
    x = torch.randn(5, 10)
    torch.testing.assert_close(other(x), model(x))
    assert torch.equal(other[0].active, layer.active)


# ---------------------------------------------------------------------------- TRP
def test_trp_nuclear_subgradient_is_uv_and_is_added_to_the_gradient():
    torch.manual_seed(0)
    w = torch.randn(9, 6, dtype=torch.double, requires_grad=True)
    torch.linalg.svdvals(w).sum().backward()  # ‖W‖_* for full-rank W with distinct σ
    u, _, vh = torch.linalg.svd(w.detach(), full_matrices=False)
    torch.testing.assert_close(nuclear_subgradient(w), u @ vh)
    torch.testing.assert_close(w.grad, u @ vh)

    model = rw.sparsify(nn.Sequential(nn.Linear(6, 9)), "trp", targets=["0"])
    layer = model[0]
    assert isinstance(layer, TRPLinear) and isinstance(layer, nn.Linear)
    trp = TRP(model, energy=0.95, nuclear_weight=0.1)
    x = torch.randn(4, 6)
    model(x).square().sum().backward()
    with_reg = layer.weight.grad.clone()
    layer.weight.grad = None
    layer.nuclear_weight = 0.0
    model(x).square().sum().backward()
    torch.testing.assert_close(with_reg - layer.weight.grad, 0.1 * nuclear_subgradient(layer.weight))
    assert trp.ranks["0"] == layer.last_rank


def test_trp_energy_criterion_sets_the_rank():
    u, v = orthogonal_pair(8, 0)
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.01])
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.copy_(u @ torch.diag(sigma) @ v.T)
    model = rw.sparsify(nn.Sequential(lin), "trp", targets=["0"])
    energy = sigma.square().cumsum(0) / sigma.square().sum()
    for e in (0.7, 0.9, 0.99):
        expected = int((energy < e).sum()) + 1  # smallest k with Σ_{i≤k} σ_i² ≥ e·Σ σ_i²
        layer = copy.deepcopy(model[0])
        assert layer.low_rank_approx_(e) == expected
        kept = torch.linalg.svdvals(layer.weight.detach())
        torch.testing.assert_close(kept[:expected], sigma[:expected], atol=1e-5, rtol=1e-5)
        assert float(kept[expected:].abs().max()) < 1e-5


def test_trp_trained_network_truncates_with_negligible_loss():
    u, v = orthogonal_pair(16, 1)
    teacher = u @ torch.diag(3 * 0.7 ** torch.arange(16.0)) @ v.T
    g = torch.Generator().manual_seed(0)
    x, x_test = torch.randn(512, 16, generator=g), torch.randn(512, 16, generator=g)
    y, y_test = x @ teacher.T, x_test @ teacher.T

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))

    def fit(model, controller=None, steps=405):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, 512, (64,), generator=gen)
            (model(x[idx]) - y[idx]).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if controller is not None:
                controller.step()
        return model

    def test_loss(model):
        with torch.no_grad():
            return float((model(x_test) - y_test).square().mean())

    model = rw.sparsify(make(), "trp", targets=["0", "2"])
    trp = TRP(model, energy=0.9, period=10, nuclear_weight=1e-3)
    fit(model, trp)  # 405 steps: the last 5 after the last truncation are unconstrained
    trained = test_loss(model)
    ranks = decompose(model, threshold=1e-2)  # σ_i < 1% σ_1 dropped, as the reference code does
    assert isinstance(model[0], FactorizedLinear) and max(ranks.values()) <= 6  # low rank "in nature"
    assert abs(test_loss(model) - trained) / trained < 1e-2  # negligible change, no fine-tuning

    dense = fit(make())  # the same net trained without TRP loses a lot at the same ranks
    before = test_loss(dense)
    dense[0] = FactorizedLinear.from_linear(dense[0], ranks["0"])
    dense[2] = FactorizedLinear.from_linear(dense[2], ranks["2"])
    assert (test_loss(dense) - before) / before > 1.0


def test_trp_bad_input():
    model = rw.sparsify(nn.Sequential(nn.Linear(4, 4)), "trp", targets=["0"])
    for kwargs, message in (
        ({"energy": 0.0}, "energy=0.0 must be a number in (0, 1]"),
        ({"period": 0}, "period=0 must be a positive integer"),
        ({"nuclear_weight": -1}, "nuclear_weight=-1 must be a number >= 0"),
    ):
        with pytest.raises(ValueError) as err:
            TRP(model, **kwargs)
        assert message in str(err.value)


# ---------------------------------------------------------------------------- Maestro
def test_maestro_recovers_svd_order_on_linear_regression():
    u, v = orthogonal_pair(16, 2)
    sigma = 4 * 0.8 ** torch.arange(16.0)
    target = u @ torch.diag(sigma) @ v.T
    torch.manual_seed(0)
    model = rw.sparsify(nn.Sequential(nn.Linear(16, 16, bias=False)), "maestro", targets=["0"])
    layer = model[0]
    with torch.no_grad():  # forget the SVD init: the ordering must be learned
        layer.U.normal_(0, 0.3)
        layer.V.normal_(0, 0.3)
    maestro = Maestro(model, full_pass=False, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.eye(16)  # isotropic inputs
    for _ in range(3000):
        loss = maestro.loss(lambda: (model(x) - x @ target.T).square().sum())
        loss.backward()
        opt.step()
        opt.zero_grad()
        maestro.step()
    with torch.no_grad():
        importance = layer.importance()
        torch.testing.assert_close(importance[:8], sigma[:8], rtol=5e-2, atol=0)  # ‖u_j‖‖v_j‖ → σ_j ...
        assert bool((importance[:9] > importance[1:10]).all())  # ... in decreasing order
        u_l, v_l = layer.factors()
        for k in (2, 4, 8):
            first = torch.linalg.matrix_norm(u_l[:, :k] @ v_l[:k] - target) ** 2
            best = sigma[k:].square().sum()  # Eckart–Young optimum
            assert float(first) <= float(best) * 1.05 + 1e-3
            others = [s for s in itertools.combinations(range(16), k) if s != tuple(range(k))]
            g = torch.Generator().manual_seed(k)
            for j in torch.randperm(len(others), generator=g)[:300].tolist():
                idx = list(others[j])
                err = torch.linalg.matrix_norm(u_l[:, idx] @ v_l[idx] - target) ** 2
                assert float(first) < float(err)  # any other k components lose more


def test_maestro_group_lasso_and_shrinking_find_the_rank():
    u, v = orthogonal_pair(12, 3)
    target = u[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ v[:, :3].T  # rank 3
    torch.manual_seed(0)
    model = rw.sparsify(nn.Sequential(nn.Linear(12, 12, bias=False)), "maestro", targets=["0"])
    maestro = Maestro(model, lasso=2e-2, shrink_threshold=5e-2, shrink_every=200, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    x = torch.eye(12)
    for _ in range(1000):
        maestro.loss(lambda: (model(x) - x @ target.T).square().sum()).backward()
        opt.step()
        opt.zero_grad()
        maestro.step()
    assert maestro.ranks() == {"0": 3}
    ranks = truncate(model, 3)
    assert ranks == {"0": 3} and isinstance(model[0], FactorizedLinear) and model[0].rank == 3
    with torch.no_grad():
        assert float(torch.linalg.matrix_norm(model[0].dense_weight() - target)) < 0.2


def test_maestro_sampler_is_uniform_over_layer_width_pairs():
    model = rw.sparsify(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), "maestro", targets=["0", "1"])
    maestro = Maestro(model, seed=0)
    counts = {}
    for _ in range(5000):
        layer, width = maestro.sample()
        key = (0 if layer is model[0] else 1, width)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == {(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)}
    assert all(abs(c / 5000 - 0.2) < 0.03 for c in counts.values())
    assert isinstance(model[0], MaestroLinear)
