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
#: the optimizers whose projector computes singular vectors (the others use seeds, DCT columns or online PCA):
#: by the randomized range finder by default, by the exact SVD with ``projector="svd"``
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
    each refresh that fell back is counted in ``svd_fallbacks``, which the state_dict keeps. The exact
    projector (``projector="svd"``) tries the LAPACK SVD first."""
    exact = {"projector": "svd"} if name in SVD_BASED else {}
    model = make_tiny_llama()
    opt = build(name, model, **exact)
    start = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 3)
    assert all_finite(model)
    assert any(not torch.equal(p, s) for p, s in zip(model.parameters(), start, strict=True))
    assert opt.svd_fallbacks == failing_svd["svd"]
    if name in SVD_BASED:
        assert failing_svd["svd"] > 0
        other = build(name, make_tiny_llama(), **exact)
        other.load_state_dict(opt.state_dict())
        assert other.svd_fallbacks == opt.svd_fallbacks


@pytest.mark.parametrize("name", sorted(SVD_BASED))
def test_a_failing_randomized_finder_falls_back_to_the_exact_svd(name, monkeypatch):
    """The default (randomized) projector whose range finder raises (its ``eigh``) falls back to the exact
    SVD at every refresh and counts it; the basis is then the exact one."""
    calls = {"eigh": 0}

    def eigh(*args, **kwargs):
        calls["eigh"] += 1
        raise torch.linalg.LinAlgError("linalg.eigh: forced failure")

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    model = make_tiny_llama()
    opt = build(name, model)
    train(model, opt, 3)
    assert all_finite(model)
    assert calls["eigh"] > 0 and opt.svd_fallbacks == calls["eigh"]


def test_owlore_counts_svd_fallbacks(failing_svd):
    model = make_tiny_llama()
    opt = build("owlore", model, projector="svd")
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
    W, opt = _galore_on(G, projector="svd")  # the exact SVD first, which fails
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


# ---------------------------------------------------------------------------------- skip_nonfinite


def assert_identical(a, b, where: str = "state_dict") -> None:
    """Recursively bit-identical: tensors by torch.equal (NaN-free here), containers by their items."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def poison(model: torch.nn.Module) -> None:
    """One NaN and one inf in two gradients (of the layers every sampler trains at this point)."""
    model.model.layers[0].mlp.up_proj.weight.grad = None
    for p in model.parameters():
        if p.grad is not None:
            p.grad[0].fill_(float("nan"))
            break
    model.lm_head.weight.grad = torch.full_like(model.lm_head.weight, float("inf"))


@pytest.mark.parametrize("name", DONE)
def test_skip_nonfinite_skips_the_step_and_leaves_weights_and_state_bit_identical(name):
    import copy

    model = make_tiny_llama()
    opt = build(name, model, skip_nonfinite=True)
    train(model, opt, 3)  # moments, projectors and a sampler's clock exist
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    model(**lm_batches(1, seed=7)[0]).loss.backward()
    poison(model)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), f"{name}: {n} changed on a skipped step"
    after = opt.state_dict()
    assert opt.skipped_steps == 1 and after["guard"]["skipped_steps"] == 1
    assert_identical({k: v for k, v in after.items() if k != "guard"},
                     {k: v for k, v in saved.items() if k != "guard"})
    train(model, opt, 1, seed=3)  # the next finite step trains again
    assert opt.skipped_steps == 1 and all_finite(model)
    assert any(not torch.equal(p.detach(), weights[n]) for n, p in model.named_parameters())
    # resume keeps the count
    other = build(name, make_tiny_llama(), skip_nonfinite=True)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.skipped_steps == 1


def test_without_skip_nonfinite_a_nan_gradient_poisons_the_weights():
    """The default is unchanged (as torch's AdamW): the option is opt-in."""
    for name in ("adamw", "galore"):
        model = make_tiny_llama()
        opt = build(name, model)
        assert not hasattr(opt, "skipped_steps")
        model(**lm_batches(1)[0]).loss.backward()
        poison(model)
        opt.step()
        assert not all_finite(model)


def test_skip_nonfinite_does_not_skip_huge_finite_gradients():
    model = make_tiny_llama()
    opt = build("adamw", model, skip_nonfinite=True)
    train(model, opt, 2, grad_scale=1e36)
    assert opt.skipped_steps == 0


def test_a_guarded_optimizer_is_a_torch_optimizer_for_schedulers_and_copies():
    import copy
    import pickle

    model = make_tiny_llama()
    opt = build("galore", model, skip_nonfinite=True)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is opt.optimizer.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert all(g["lr"] == 0.5e-2 for g in opt.optimizer.param_groups)
    train(model, opt, 2)
    sched.step()
    assert opt.state_bytes() == opt.optimizer.state_bytes() > 0
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other.skip_nonfinite and len(other.state) == len(opt.state)


# ---------------------------------------------------------------------------------- bf16 full-parameter training

LR_SMALL, N_SMALL = 1e-5, 60


def bf16_run(name: str, dtype: torch.dtype, steps: int = N_SMALL, start: int = 0, model=None, opt=None, **kwargs):
    """The tiny Llama (weights on the bf16 grid, in ``dtype``) trained by ``name`` at lr 1e-5 on a fixed
    sequence of gradients (a constant direction plus noise, the same for every run; rounded to ``dtype``)."""
    if model is None:
        model = make_tiny_llama()
        model.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
        model.to(dtype)
    if opt is None:
        extra = {"update_gap": 10} if is_projected(name) else {}
        opt = build(name, model, lr=LR_SMALL, **{**extra, **kwargs})
    gen = torch.Generator().manual_seed(1)
    base = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    for step in range(steps):
        noise = torch.Generator().manual_seed(100 + start + step)
        for n, p in model.named_parameters():
            g = (base[n] + 0.5 * torch.randn(p.shape, generator=noise)) * 1e-2
            p.grad = g.to(dtype) if p.requires_grad else None
        opt.step()
    return model, opt


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", ["adamw", "galore"])
def test_master_weights_keep_small_bf16_updates_that_plain_bf16_loses(name):
    """lr 1e-5 on bf16 weights of size ~0.02 (bf16 spacing ~1e-4): plain bf16 rounds most updates away
    (error ≈ the whole update); fp32 master weights track the fp32 run."""
    w0 = flat(bf16_run(name, torch.float32, steps=0)[0])
    reference = flat(bf16_run(name, torch.float32)[0])
    update = (reference - w0).norm()
    plain = (flat(bf16_run(name, torch.bfloat16)[0]) - reference).norm() / update
    model, opt = bf16_run(name, torch.bfloat16, master_weights=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    kept = (flat(model) - reference).norm() / update
    masters = torch.cat([opt.state[p]["master_weight"].flatten() for p in model.parameters()])
    assert masters.dtype == torch.float32
    exact = (masters - reference).norm() / update
    assert plain > 0.8, plain
    assert kept < 0.25, kept  # what is left is the final rounding of the weights to bf16
    assert exact < (1e-3 if name == "adamw" else 0.05), exact  # GaLore's subspace comes from bf16-rounded grads
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in model.parameters() if "exp_avg" in opt.state[p])


@pytest.mark.parametrize("name", ["adamw", "galore"])
def test_stochastic_rounding_keeps_small_bf16_updates_in_expectation(name):
    """Without master copies, stochastic rounding to bf16 is unbiased: the bf16 run's update has the fp32
    run's size along it (coefficient ≈ 1), where round-to-nearest loses most of it."""
    w0 = flat(bf16_run(name, torch.float32, steps=0)[0])
    reference = flat(bf16_run(name, torch.float32)[0]) - w0

    def coefficient(**kwargs) -> float:
        moved = flat(bf16_run(name, torch.bfloat16, **kwargs)[0]) - w0
        return float(moved @ reference / (reference @ reference))

    assert coefficient() < 0.3
    assert 0.9 < coefficient(bf16_rounding="stochastic") < 1.1
    model, opt = bf16_run(name, torch.bfloat16, steps=1, bf16_rounding="stochastic")
    assert all("master_weight" not in st for st in opt.state.values())  # no extra copy kept


def test_stochastic_round_bf16_is_unbiased_and_exact_on_the_grid():
    from rankwise.optim.guard import stochastic_round_bf16

    x = torch.full((200_000,), 1.0 + 2.0**-10)  # 1/8 of the way from 1 to the next bf16, 1 + 2^-7
    r = stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert abs(float(r.mean()) - float(x[0])) < 2e-5
    grid = torch.randn(1000).bfloat16().float()
    assert torch.equal(stochastic_round_bf16(grid).float(), grid)
    assert torch.equal(stochastic_round_bf16(-x).float().unique().sort().values, torch.tensor([-1.0 - 2.0**-7, -1.0]))


@pytest.mark.parametrize(("name", "options"), [
    ("adamw", {"master_weights": True}),
    ("galore", {"master_weights": True}),
    ("galore", {"bf16_rounding": "stochastic"}),
    ("galore", {"master_weights": True, "bf16_rounding": "stochastic", "skip_nonfinite": True}),
    ("badam", {"master_weights": True}),
    ("owlore", {"master_weights": True}),
])
def test_bf16_resume_with_master_weights_is_bit_identical(name, options):
    import io

    k, n = 3, 7
    straight, opt = bf16_run(name, torch.bfloat16, steps=k, **options)
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "opt": opt.state_dict()}, buffer)
    bf16_run(name, torch.bfloat16, steps=n - k, start=k, model=straight, opt=opt)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model = make_tiny_llama().to(torch.bfloat16)
    model.load_state_dict(saved["model"])
    extra = {"update_gap": 10} if is_projected(name) else {}
    resumed = build(name, model, lr=LR_SMALL, **{**extra, **options})
    resumed.load_state_dict(saved["opt"])
    for p in model.parameters():
        if "master_weight" in resumed.state[p]:
            assert resumed.state[p]["master_weight"].dtype == torch.float32
    bf16_run(name, torch.bfloat16, steps=n - k, start=k, model=model, opt=resumed)
    for (key, a), b in zip(straight.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), f"{key} differs after resume"
    for a, b in zip(straight.parameters(), model.parameters(), strict=True):
        for key, value in opt.state[a].items():
            if torch.is_tensor(value):
                assert torch.equal(value, resumed.state[b][key]), key


def test_master_weights_restart_from_weights_changed_outside_the_optimizer():
    model, opt = bf16_run("adamw", torch.bfloat16, steps=2, master_weights=True)
    p = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        p[0].fill_(0.5)  # e.g. a merge or a loaded checkpoint
    bf16_run("adamw", torch.bfloat16, steps=1, start=2, model=model, opt=opt)
    assert bool(((opt.state[p]["master_weight"][0] - 0.5).abs() < 1e-3).all())
    assert not bool(((opt.state[p]["master_weight"][1:] - 0.5).abs() < 1e-3).any())


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_blocks_with_an_overflowed_entry_decode_without_nan(signed):
    """An Adam moment that overflowed to inf: its block decodes to inf (unsigned second moment: Adam's
    step is then 0 there, as float32 AdamW's) or ±inf / 0 (signed), never NaN; other blocks are unaffected."""
    from rankwise.optim import quant

    x = torch.rand(512) + 0.5
    x[3] = float("inf")
    q, absmax = quant.quantize_blockwise(x, signed, block=256)
    back = quant.dequantize_blockwise(q, absmax, signed, x.shape, block=256)
    assert not bool(back.isnan().any())
    assert back[3] == float("inf")
    if not signed:
        assert bool((back[:256] == float("inf")).all())
    torch.testing.assert_close(back[256:], x[256:], rtol=0.1, atol=0)


def test_stochastic_rounding_alone_ignores_master_weights_of_a_loaded_checkpoint():
    """Without ``master_weights`` the step runs on the current weight (exact on the bf16 grid), never on a
    master copy left in the state by a checkpoint (which nothing keeps up to date)."""
    import copy

    model, opt = bf16_run("adamw", torch.bfloat16, steps=2, master_weights=True)
    other = build("adamw", model, lr=LR_SMALL, bf16_rounding="stochastic")
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    p = model.model.layers[0].mlp.up_proj.weight
    stale = p.detach().float() + p.detach().float().abs() * 2.0**-10  # still rounds to p: looks current
    other.state[p]["master_weight"] = stale
    for group in other.param_groups:
        group["lr"] = 0.0  # the step changes nothing, so the weight must stay exactly where it is
    before = p.detach().clone()
    bf16_run("adamw", torch.bfloat16, steps=1, start=2, model=model, opt=other)
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("name", DONE)
def test_master_weights_work_with_every_catalogued_optimizer(name):
    """bf16 weights stay bf16; the optimizer's floating state is fp32 (it ran on the fp32 masters); the
    masters of the updated weights moved by less than the bf16 spacing allows to see."""
    model, opt = bf16_run(name, torch.bfloat16, steps=3, master_weights=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    masters = 0
    for p in model.parameters():
        st = opt.state.get(p) or {}
        for key, value in st.items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert value.dtype == torch.float32, f"{name}: state {key!r} is {value.dtype}"
        if "master_weight" in st:
            masters += 1
            assert torch.equal(st["master_weight"].bfloat16(), p.detach())
    assert masters > 0
    assert torch.isfinite(model(**lm_batches(1)[0]).loss)


def test_bf16_training_on_real_batches_with_every_option():
    model = make_tiny_llama().to(torch.bfloat16)
    opt = build("galore", model, master_weights=True, skip_nonfinite=True, bf16_rounding="stochastic")
    train(model, opt, 3)
    assert opt.skipped_steps == 0 and all_finite(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_master_weights_keep_the_weight_storage():
    """The bf16 weight is written back in place: views, tied weights and references stay valid."""
    model = make_tiny_llama().to(torch.bfloat16)
    opt = build("adamw", model, master_weights=True)
    pointers = [p.data_ptr() for p in model.parameters()]
    train(model, opt, 2)
    assert [p.data_ptr() for p in model.parameters()] == pointers
