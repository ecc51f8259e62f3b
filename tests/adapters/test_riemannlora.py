"""RiemannLoRA: the update X = s·B·A moves on the rank-r manifold, so its trajectory does not depend on how
(B, A) represent X (plain LoRA's does); each step is the truncated SVD of X − η·P_T(G); the init's tangent
space holds the best rank-2r part of the gradient."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.adapters.init import InitContext, riemannlora_init
from rankwise.adapters.riemannlora import RiemannLoRAConfig, riemannlora_optimizer
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert

R = 2


def _model():
    model = make_tiny_bert(0)
    data = cls_batches(n=3)
    rw.adapt(model, "riemannlora", r=R, init_data=data, init_scale=0.05)
    return model, data


def _reparametrize(model, seed: int = 3) -> None:
    """(B, A) → (B·S, S⁻¹·A) with a random well-conditioned S per layer: the same ΔW."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            s = torch.eye(R) + 0.5 * torch.randn(R, R, generator=g)
            layer.lora_B.copy_(layer.lora_B @ s)
            layer.lora_A.copy_(torch.linalg.solve(s, layer.lora_A))


def _trajectory(model, data, opt, steps: int = 4) -> list[list[torch.Tensor]]:
    out = []
    for i in range(steps):
        model(**data[i % len(data)]).loss.backward()
        opt.step()
        opt.zero_grad()
        out.append([layer.delta_weight().detach().clone() for _, layer in rw.adapter_layers(model)])
    return out


def _max_gap(t1, t2) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for s1, s2 in zip(t1, t2, strict=True)
               for a, b in zip(s1, s2, strict=True))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_trajectory_is_invariant_to_the_factorization_and_lora_sgd_is_not(momentum):
    model, data = _model()
    other = copy.deepcopy(model)
    _reparametrize(other)
    for (_, a), (_, b) in zip(rw.adapter_layers(model), rw.adapter_layers(other), strict=True):
        assert torch.allclose(a.delta_weight(), b.delta_weight(), atol=1e-6)
    riem = [_trajectory(m, data, riemannlora_optimizer(m, lr=0.5, momentum=momentum)) for m in
            (copy.deepcopy(model), copy.deepcopy(other))]
    assert _max_gap(*riem) < 1e-4
    assert _max_gap(riem[0][:1], [[0 * d for d in riem[0][0]]]) > 0  # it moved
    plain = [_trajectory(m, data, torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5))
             for m in (copy.deepcopy(model), copy.deepcopy(other))]
    assert _max_gap(*plain) > 1e-2


def test_rank_is_exactly_r_after_every_retraction():
    model, data = _model()
    for step in _trajectory(model, data, riemannlora_optimizer(model, lr=0.5), steps=3):
        for dw in step:
            s = torch.linalg.svdvals(dw.double())
            assert s[R - 1] > 1e-4 * s[0] and s[R] < 1e-5 * s[0]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_steps_are_the_truncated_svd_of_the_projected_momentum_step(momentum):
    """Dense reference: G = ∂L/∂W (autograd on the base), P_T(Z) = UUᵀZ + ZVVᵀ − UUᵀZVVᵀ at the current point,
    d = β·P_T(d_prev) + P_T(G), X' = SVD_r(X − η·d)."""
    model, _ = _model()
    layer = dict(rw.adapter_layers(model))["bert.pooler.dense"]  # the largest gradient: η‖G‖ ≈ ‖X‖
    layer.base_layer.weight.requires_grad_(True)
    opt = riemannlora_optimizer(model, lr=0.3, momentum=momentum)
    x, d = layer.delta_weight().detach().clone(), None
    for batch in cls_batches(n=3, seed=7):  # not init batches: UᵀGV ≠ 0
        model(**batch).loss.backward()
        g = layer.base_layer.weight.grad.clone()
        u, _ = torch.linalg.qr(layer.lora_B.detach())
        v, _ = torch.linalg.qr(layer.lora_A.detach().T)

        def proj(z, u=u, v=v):
            return u @ (u.T @ z) + (z @ v) @ v.T - u @ (u.T @ z @ v) @ v.T

        d = proj(g) if d is None else proj(g) + momentum * proj(d)
        uu, ss, vh = torch.linalg.svd(x - 0.3 * d)
        expected = uu[:, :R] @ torch.diag(ss[:R]) @ vh[:R]
        layer.base_layer.weight.grad = None
        opt.step()
        opt.zero_grad()
        assert float((x - expected).abs().max()) > 1e-2 * float(expected.abs().max())  # a real step
        assert torch.allclose(layer.delta_weight().detach(), expected, atol=1e-4 * float(expected.abs().max()))
        x = expected


def test_init_tangent_space_holds_the_best_rank_2r_part_of_the_gradient():
    g = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    cfg = RiemannLoRAConfig(r=R)
    f = riemannlora_init(torch.zeros(12, 10), InitContext(name="w", grad=g, config=cfg, r=R, scale=1.0))
    x = f.left @ f.right
    assert torch.allclose(torch.linalg.svdvals(x)[:R], torch.full((R,), cfg.init_scale), rtol=1e-4)
    u, _ = torch.linalg.qr(f.left)
    v, _ = torch.linalg.qr(f.right.T)
    pu, pv = u @ u.T, v @ v.T
    proj = pu @ g + g @ pv - pu @ g @ pv
    s = torch.linalg.svdvals(g)
    assert torch.allclose(proj.norm() ** 2, (s[: 2 * R] ** 2).sum(), rtol=1e-4)


def test_trains_through_the_loop_and_refuses_bad_options():
    model, data = _model()
    hist = train(model, data, config=TrainConfig(max_steps=3, lr=0.2, progress=False, measure_memory=False))
    assert hist
    for _, layer in rw.adapter_layers(model):
        assert int(torch.linalg.matrix_rank(layer.delta_weight().detach(), rtol=1e-4)) == R
    with pytest.raises(ValueError, match="momentum"):
        rw.adapt(make_tiny_bert(0), "riemannlora", r=R, init_data=data, momentum=1.0)
    with pytest.raises(ValueError, match="init"):
        rw.adapt(make_tiny_bert(0), "riemannlora", r=R, init="default")


def test_trains_in_the_transformers_trainer(tmp_path):
    from rankwise.hf_trainer import RankwiseTrainer

    from ..test_hf_trainer import _args, _base, _dataset

    model = rw.adapt(_base(tmp_path), "riemannlora", r=R, init_data=cls_batches(n=2))
    before = {n: layer.delta_weight().detach().clone() for n, layer in rw.adapter_layers(model)}
    RankwiseTrainer(model=model, args=_args(tmp_path / "run", steps=3, save_steps=100), train_dataset=_dataset(),
                    optimizers=(riemannlora_optimizer(model, lr=0.2), None)).train()
    for n, layer in rw.adapter_layers(model):
        dw = layer.delta_weight().detach()
        assert not torch.equal(dw, before[n])
        assert int(torch.linalg.matrix_rank(dw, rtol=1e-4)) == R
