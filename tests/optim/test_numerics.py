"""Numerical robustness of every catalogued optimizer and sampler: huge finite gradients, degenerate and
failing SVDs, non-finite gradients (``skip_nonfinite``) and bf16 full-parameter training
(``master_weights`` / ``bf16_rounding``)."""

from __future__ import annotations

import pytest
import torch

from rankwise import catalogue
from rankwise.optim.projected import ProjectedOptimizer

from ..conftest import lm_batches, make_tiny_llama

DONE = [r.name for r in catalogue.records(api="optim", status="done")]
#: strategy variants the catalogue names do not reach with their defaults
VARIANTS: list[tuple[str, dict]] = [
    ("galore", {"projector": "rsvd", "reproject_moments": True}),
    ("galore", {"projector": "dct"}),
    ("galore_adafactor", {"beta1": 0.9}),
    ("frugal", {"selector": "randk"}),
    ("frugal", {"selector": "block", "density": 0.5}),
    ("osd", {"inner": "lion"}),
    ("osd", {"osd_init": "svd"}),
    ("q_galore", {"weight_quant": True}),
]
CASES = [(name, {}) for name in DONE] + VARIANTS
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in CASES]


def is_projected(name: str) -> bool:
    config = catalogue.get(name).config
    return isinstance(config, type) and issubclass(config, ProjectedOptimizer)


def build(name: str, model: torch.nn.Module, lr: float = 1e-2, **kwargs) -> torch.optim.Optimizer:
    """The catalogued optimizer ``name`` on the tiny Llama: rank 4, a refresh every 2 steps, 8-bit moments
    even for its small matrices, samplers switching every 2 steps."""
    options: dict = {}
    if is_projected(name):
        options = {"rank": 4, "update_gap": 2}
        if name in ("galore_8bit", "q_galore"):
            options["min_8bit_size"] = 64
    elif name in ("badam", "lisa", "owlore"):
        options = {"switch_every": 2}
        if name == "owlore":  # a tiny random model has no outliers: give the layers equal sampling weight
            options.update(rank=4, ratios=[1.0, 1.0], n_layers=1, update_gap=2)
    return catalogue.get(name).build(model, lr=lr, **{**options, **kwargs})


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, grad_scale: float = 1.0, seed: int = 0):
    for batch in lm_batches(steps, seed=seed):
        opt.zero_grad()
        model(**batch).loss.backward()
        if grad_scale != 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(grad_scale)
        opt.step()


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------------- huge finite gradients


@pytest.mark.parametrize("scale", [1e30, 1e36])
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_huge_finite_gradients_keep_the_weights_finite_as_adamw_does(name, kwargs, scale):
    """Gradients ×1e30 (and ×1e36, near float32's max) for 4 steps, then 2 ordinary steps: AdamW keeps the
    weights finite (its overflowing second moments just stop those coordinates); every optimizer must too."""
    reference = make_tiny_llama()
    adamw = build("adamw", reference)
    train(reference, adamw, 4, scale)
    train(reference, adamw, 2, seed=1)
    assert all_finite(reference)  # the bar
    model = make_tiny_llama()
    opt = build(name, model, **kwargs)
    train(model, opt, 4, scale)
    train(model, opt, 2, seed=1)
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    assert not bad, f"{name} {kwargs}: non-finite weights {bad[:4]}"


# ---------------------------------------------------------------------------------- SVD failures and degenerate spectra

PROJECTED = [name for name in DONE if is_projected(name)]
#: the optimizers whose default projector computes an SVD (the others use seeds, DCT columns or online PCA)
SVD_BASED = {"galore", "galore_adafactor", "galore_8bit", "q_galore", "fira", "frugal", "gradnormlorp"}


def spectrum_gradient(kind: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """A gradient U·diag(s)·Vᵀ with the named degenerate spectrum."""
    m, n = shape
    k = min(m, n)
    if kind == "zero":
        return torch.zeros(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    s = {
        "ill_conditioned": torch.logspace(0, -30, k),  # condition number 1e30
        "rank_1": torch.cat([torch.ones(1), torch.zeros(k - 1)]),
        "repeated": torch.ones(k),  # every singular value equal: no unique top-r subspace
    }[kind]
    return (U * s) @ V.t() * 1e-2


@pytest.mark.parametrize("kind", ["ill_conditioned", "rank_1", "zero", "repeated"])
@pytest.mark.parametrize("name", PROJECTED)
def test_degenerate_spectra_never_crash_or_stop_the_update(name, kind):
    model = make_tiny_llama()
    opt = build(name, model)
    gen = torch.Generator().manual_seed(0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):  # refreshes at steps 0 and 2
        for p in model.parameters():
            p.grad = spectrum_gradient(kind, p.shape, gen) if p.dim() == 2 else torch.full_like(p, 1e-2)
        opt.step()
    assert all_finite(model)
    assert torch.isfinite(model(**lm_batches(1)[0]).loss)
    if kind != "zero":  # a degenerate basis must not make the projected update vanish
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(dict(model.named_parameters())[q], start[q])


@pytest.fixture
def failing_svd(monkeypatch):
    """torch.linalg.svd raises LinAlgError; returns the call counter."""
    calls = {"svd": 0}

    def svd(*args, **kwargs):
        calls["svd"] += 1
        raise torch.linalg.LinAlgError("linalg.svd: forced failure")

    monkeypatch.setattr(torch.linalg, "svd", svd)
    return calls


@pytest.mark.parametrize("name", PROJECTED)
def test_a_failing_svd_falls_back_and_is_counted(name, failing_svd):
    """Every SVD failure falls back (exact → randomized → previous / first-r basis) instead of raising;
    each refresh that fell back is counted in ``svd_fallbacks``, which the state_dict keeps."""
    model = make_tiny_llama()
    opt = build(name, model)
    start = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 3)
    assert all_finite(model)
    assert any(not torch.equal(p, s) for p, s in zip(model.parameters(), start, strict=True))
    assert opt.svd_fallbacks == failing_svd["svd"]
    if name in SVD_BASED:
        assert failing_svd["svd"] > 0
        other = build(name, make_tiny_llama())
        other.load_state_dict(opt.state_dict())
        assert other.svd_fallbacks == opt.svd_fallbacks


def test_owlore_counts_svd_fallbacks(failing_svd):
    model = make_tiny_llama()
    opt = build("owlore", model)
    train(model, opt, 1)
    assert failing_svd["svd"] > 0 and opt.svd_fallbacks == failing_svd["svd"]


def _galore_on(G: torch.Tensor, **kwargs):
    W = torch.nn.Parameter(torch.zeros_like(G))
    opt = catalogue.get("galore").config([{"params": [W], "rank": 4}], lr=1e-2, update_gap=1, **kwargs)
    return W, opt


def test_the_randomized_fallback_finds_the_top_subspace(failing_svd):
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(48, 4, generator=gen) @ torch.randn(4, 32, generator=gen)
    G = G + 1e-3 * torch.randn(48, 32, generator=gen)
    W, opt = _galore_on(G)
    W.grad = G
    opt.step()
    P = opt.state[W]["P"]  # right side, 4×32
    # reference: the eigenvectors of GᵀG (no SVD involved)
    exact = torch.linalg.eigh(G.t().double() @ G.double()).eigenvectors[:, -4:].t().float()
    torch.testing.assert_close(P.t() @ P, exact.t() @ exact, atol=1e-4, rtol=0)
    assert opt.svd_fallbacks == 1


def test_when_every_method_fails_the_previous_basis_is_kept(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(48, 32, generator=gen)
    W, opt = _galore_on(G)
    W.grad = G
    opt.step()  # a normal refresh
    P = opt.state[W]["P"].clone()

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("forced failure")

    for fn in ("svd", "qr", "eigh"):
        monkeypatch.setattr(torch.linalg, fn, fail)
    before = W.detach().clone()
    W.grad = torch.randn(48, 32, generator=gen)
    opt.step()
    assert torch.equal(opt.state[W]["P"], P)
    assert opt.svd_fallbacks == 1
    assert not torch.equal(W.detach(), before)


def test_without_any_basis_the_first_r_coordinates_are_used(monkeypatch):
    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("forced failure")

    for fn in ("svd", "qr", "eigh"):
        monkeypatch.setattr(torch.linalg, fn, fail)
    gen = torch.Generator().manual_seed(0)
    W, opt = _galore_on(torch.zeros(48, 32))
    W.grad = torch.randn(48, 32, generator=gen)
    opt.step()
    assert torch.equal(opt.state[W]["P"], torch.eye(32)[:4])
    assert opt.svd_fallbacks == 1
    assert bool((W.detach()[:, :4] != 0).all())  # the update is not zero


@pytest.mark.parametrize("name", PROJECTED)
def test_a_non_finite_gradient_never_raises_from_the_projector(name):
    """A NaN gradient (without skip_nonfinite) poisons the weights as it does in AdamW, but no projector
    raises (GradNormLoRP's SVD used to raise torch's LinAlgError)."""
    model = make_tiny_llama()
    opt = build(name, model)
    for batch in lm_batches(3):
        opt.zero_grad()
        model(**batch).loss.backward()
        model.model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("nan")
        opt.step()
