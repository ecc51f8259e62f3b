"""BAdam, LISA, OwLore and transformer layer discovery: the faithful test of each method, resume."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import itertools
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from rankwise import catalogue
from rankwise.optim import LISA, BAdam, OwLore, outlier_ratios, transformer_blocks

from ..conftest import make_tiny_bert, make_tiny_llama
from .ddp_worker import N_LAYERS, make_batches, make_model, make_optimizer, params_of, train

K = 2


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def layer_of(name: str) -> str:
    """'model.layers.2.mlp.up_proj.weight' -> 'model.layers.2'; other names -> 'embedding' / 'head'."""
    if name.startswith("model.layers."):
        return ".".join(name.split(".")[:3])
    return "embedding" if name.startswith("model.embed_tokens") else "head"


def names_of(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def one_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict) -> None:
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()


# ---------------------------------------------------------------------------------- discovery


def test_transformer_blocks_partition_llama_bert_gpt2():
    llama = make_tiny_llama()
    blocks = transformer_blocks(llama)
    assert [n for n, _ in blocks] == ["embedding", "model.layers.0", "model.layers.1", "head"]
    assert blocks[1][1] is llama.model.layers[0]
    bert = make_tiny_bert()
    expected = ["embedding", "bert.encoder.layer.0", "bert.encoder.layer.1", "head"]
    assert [n for n, _ in transformer_blocks(bert)] == expected
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=3, n_head=2))
    names = [n for n, _ in transformer_blocks(gpt2)]
    assert names == ["embedding", "transformer.h.0", "transformer.h.1", "transformer.h.2", "head"]
    for model in (llama, bert, gpt2):  # the blocks partition the parameters: each exactly once
        ids = [id(p) for _, m in transformer_blocks(model) for p in m.parameters()]
        assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    # GPT-2 ties lm_head to wte: the tied weight is in the embedding only, the head keeps ln_f
    head = dict(transformer_blocks(gpt2))["head"]
    assert {p.shape for p in head.parameters()} == {torch.Size([16])}


def test_transformer_blocks_explicit_layers_and_errors():
    llama = make_tiny_llama()
    assert [n for n, _ in transformer_blocks(llama, layers="model.layers")][1] == "model.layers.0"
    with pytest.raises(ValueError, match="layers='model.nope' is not a submodule"):
        transformer_blocks(llama, layers="model.nope")
    with pytest.raises(ValueError, match="must name a non-empty nn.ModuleList"):
        transformer_blocks(llama, layers="model.norm")
    with pytest.raises(ValueError, match="found no repeated transformer layers"):
        transformer_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------- BAdam


def expected_badam_blocks(order: str, steps: int, n_blocks: int) -> list[int]:
    if order == "ascending":
        return [(s // K) % n_blocks for s in range(steps)]
    return [(n_blocks - 1 - s // K) % n_blocks for s in range(steps)]


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
def test_badam_one_block_at_a_time_in_order(order):
    """Faithful test: only the active block changes, it alone has requires_grad and Adam state, and
    the active block switches exactly every K steps in the configured order."""
    model = make_model()
    opt = BAdam(model, lr=1e-2, switch_every=K, order=order, seed=5)
    assert opt.block_names == [f"model.layers.{i}" for i in range(N_LAYERS)]
    steps = 3 * N_LAYERS * K
    active = []
    for step, batch in enumerate(make_batches(steps)):
        block = opt.block_names[opt.active_block]
        active.append(opt.active_block)
        assert {layer_of(n) for n, p in model.named_parameters() if p.requires_grad} == {block}
        before = snapshot(model)
        model(**batch).loss.backward()
        assert {layer_of(n) for n, p in model.named_parameters() if p.grad is not None} == {block}
        opt.step()
        moved = changed(before, model)
        assert {layer_of(n) for n in moved} == {block}  # everything else is bit-identical
        assert moved == {n for n in before if layer_of(n) == block}  # ... and the whole block moves
        if (step + 1) % K:  # mid-block: state for exactly this block, fresh at its first step
            assert names_of(model, list(opt.state)) == moved
            assert {int(s["step"]) for s in opt.state.values()} == {step % K + 1}
        else:  # a switch just dropped all state
            assert len(opt.state) == 0
        opt.zero_grad()
    if order == "random":  # random reshuffling: every block-epoch is a permutation, K steps each
        per_block = active[::K]
        assert all(a == b for a, b in zip(active[::K], active[1::K], strict=True))
        epochs = [per_block[i : i + N_LAYERS] for i in range(0, len(per_block), N_LAYERS)]
        assert all(sorted(e) == list(range(N_LAYERS)) for e in epochs)
        assert len({tuple(e) for e in epochs}) > 1  # reshuffled, not one fixed order
    else:
        assert active == expected_badam_blocks(order, steps, N_LAYERS)


def test_badam_block_is_plain_adamw_with_fresh_state():
    """K steps of BAdam on block 0 == K steps of torch AdamW on block 0's parameters alone."""
    a, b = make_model(), make_model()
    opt_a = BAdam(a, lr=1e-2, switch_every=3, order="ascending", weight_decay=0.1)
    block0 = list(b.model.layers[0].parameters())
    for p in b.parameters():
        p.requires_grad_(False)
    for p in block0:
        p.requires_grad_(True)
    decay = [p for p in block0 if p.ndim >= 2]
    no_decay = [p for p in block0 if p.ndim < 2]
    opt_b = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
    )
    for batch in make_batches(3):
        one_step(a, opt_a, batch)
        one_step(b, opt_b, batch)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_badam_embedding_head_and_always_active():
    model = make_model()
    frozen = BAdam(model, lr=1e-2, switch_every=1, order="ascending")
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    assert len(frozen.block_names) == N_LAYERS
    model = make_model()
    opt = BAdam(model, lr=1e-2, switch_every=1, order="ascending", include_embedding=True, include_head=True)
    assert opt.block_names == ["embedding", *[f"model.layers.{i}" for i in range(N_LAYERS)], "head"]
    seen = []
    for batch in make_batches(N_LAYERS + 2):
        before = snapshot(model)
        one_step(model, opt, batch)
        seen.append({layer_of(n) for n in changed(before, model)})
    assert seen == [{"embedding"}, *[{f"model.layers.{i}"} for i in range(N_LAYERS)], {"head"}]
    model = make_model()
    opt = BAdam(model, lr=1e-2, switch_every=1, order="ascending", always_active=["lm_head"])
    for i, batch in enumerate(make_batches(3)):
        before = snapshot(model)
        one_step(model, opt, batch)
        assert {layer_of(n) for n in changed(before, model)} == {f"model.layers.{i}", "head"}
        assert "model.norm.weight" not in changed(before, model)


def test_badam_follows_lr_scheduler():
    model = make_model()
    opt = BAdam(model, lr=1e-2, switch_every=10, order="ascending")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s == 0 else 0.0)
    batches = make_batches(2)
    one_step(model, opt, batches[0])
    sched.step()
    before = snapshot(model)
    one_step(model, opt, batches[1])
    assert not changed(before, model)  # lr 0 reached the inner AdamW


# ---------------------------------------------------------------------------------- LISA


def test_lisa_gamma_layers_plus_embedding_and_head():
    """Faithful test: between redraws exactly γ middle layers plus embedding and head change; the set
    is redrawn exactly every K steps (by the seeded generator); layer state is dropped at a redraw,
    embedding/head state kept."""
    gamma, k, steps = 2, 3, 12
    model = make_model()
    opt = LISA(model, lr=1e-2, n_layers=gamma, switch_every=k, seed=7)
    g = torch.Generator().manual_seed(7)
    uniform = torch.ones(N_LAYERS, dtype=torch.float64)
    draws = [sorted(torch.multinomial(uniform, gamma, generator=g).tolist()) for _ in range(steps // k)]
    assert len({tuple(d) for d in draws}) > 1
    for step, batch in enumerate(make_batches(steps)):
        assert opt.active_layers == draws[step // k]
        expected = {f"model.layers.{i}" for i in draws[step // k]} | {"embedding", "head"}
        before = snapshot(model)
        one_step(model, opt, batch)
        moved = changed(before, model)
        assert {layer_of(n) for n in moved} == expected
        assert moved == {n for n in before if layer_of(n) in expected}
        steps_by_name = {n: int(opt.state[p]["step"]) for n, p in model.named_parameters() if p in opt.state}
        if (step + 1) % k:
            assert {layer_of(n) for n in steps_by_name} == expected
            assert {v for n, v in steps_by_name.items() if "layers" in n} == {step % k + 1}
        else:
            assert {layer_of(n) for n in steps_by_name} == {"embedding", "head"}
        assert {v for n, v in steps_by_name.items() if "layers" not in n} == {step + 1}


def test_lisa_on_bert_trains_embeddings_and_classifier_every_step():
    model = make_tiny_bert()
    opt = LISA(model, lr=1e-2, n_layers=1, switch_every=1, seed=0)
    batch = {"input_ids": torch.randint(1, 100, (4, 8)), "labels": torch.tensor([0, 1, 2, 0])}
    for _ in range(3):
        layer = f"bert.encoder.layer.{opt.active_layers[0]}."
        before = snapshot(model)
        one_step(model, opt, batch)
        moved = changed(before, model)
        assert {"classifier.weight", "bert.pooler.dense.weight", "bert.embeddings.word_embeddings.weight"} <= moved
        assert {n for n in moved if ".layer." in n} == {n for n in before if n.startswith(layer)}


def inclusion_probabilities(p: list[float], gamma: int) -> list[float]:
    """Exact P(layer in sample) for γ draws without replacement, each ∝ p among the remaining."""
    out = [0.0] * len(p)
    for seq in itertools.permutations(range(len(p)), gamma):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        for i in seq:
            out[i] += prob
    return out


def sampling_frequencies(opt: LISA, model: nn.Module, draws: int) -> torch.Tensor:
    counts = torch.zeros(N_LAYERS)
    for _ in range(draws):
        counts[opt.active_layers] += 1
        opt.step()  # no gradients: nothing moves, but K=1 redraws
    return counts / draws


@pytest.mark.parametrize("probs", [None, [0.1, 0.2, 0.3, 0.4]])
def test_lisa_sampling_frequencies_match_distribution(probs):
    model = make_model()
    opt = LISA(model, lr=1e-2, n_layers=2, switch_every=1, probs=probs, seed=0)
    p = [0.25] * N_LAYERS if probs is None else probs
    target = torch.tensor(inclusion_probabilities(p, 2), dtype=torch.float32)
    draws = 3000
    freq = sampling_frequencies(opt, model, draws)
    tol = 4 * (target * (1 - target) / draws).sqrt()
    assert (freq - target).abs().le(tol).all(), (freq, target)


# ---------------------------------------------------------------------------------- OwLore


def planted_outlier_model(counts: list[int]) -> LlamaForCausalLM:
    """Every linear weight of layer ℓ is ±0.01 except ``counts[ℓ]`` entries set to 1.0."""
    model = make_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer, count in zip(model.model.layers, counts, strict=True):
            linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
            for m in linears:
                m.weight.copy_(0.01 * torch.sign(torch.randn(m.weight.shape, generator=g)))
            flat = linears[0].weight.view(-1)
            flat[torch.randperm(flat.numel(), generator=g)[:count]] = 1.0
    return model


def test_outlier_ratio_weight_only_counts_planted_outliers():
    counts = [10, 20, 40, 80]
    model = planted_outlier_model(counts)
    per_layer = sum(m.weight.numel() for m in model.model.layers[0].modules() if isinstance(m, nn.Linear))
    ratios = outlier_ratios(model, threshold=13.0)
    assert torch.equal(ratios, torch.tensor(counts, dtype=torch.float64) / per_layer)


def test_outlier_ratio_uses_input_norms_with_calibration():
    """A_ij = |W_ij|·‖X_j‖ with the mean over all linears of a layer (checked on a 2-layer toy)."""

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(
                nn.ModuleDict({"a": nn.Linear(4, 3, bias=False), "b": nn.Linear(3, 4, bias=False)}) for _ in range(2)
            )

        def forward(self, x):
            for layer in self.layers:
                x = layer["b"](layer["a"](x))
            return x

    torch.manual_seed(0)
    toy = Toy()
    x = torch.randn(5, 4) * torch.tensor([1.0, 30.0, 1.0, 1.0])
    expected, h = [], x
    for layer in toy.layers:
        a_in = h
        b_in = layer["a"](a_in).detach()
        h = layer["b"](b_in).detach()
        scores = torch.cat([
            (layer["a"].weight.abs() * a_in.norm(dim=0)).flatten(),
            (layer["b"].weight.abs() * b_in.norm(dim=0)).flatten(),
        ]).double()
        expected.append((scores > 2.0 * scores.mean()).double().mean())
    got = outlier_ratios(toy, threshold=2.0, calibration=[x[:2], x[2:]])
    assert torch.allclose(got, torch.stack(expected))
    assert not torch.equal(got, outlier_ratios(toy, threshold=2.0))  # the norms matter here
    # scaling the calibration data does not change the ratios
    assert torch.allclose(got, outlier_ratios(toy, threshold=2.0, calibration=[3 * x]))


@pytest.mark.parametrize("gamma", [1, 2])
def test_owlore_sampling_frequencies_follow_outlier_ratios(gamma):
    """Faithful test: layers are drawn with p_ℓ = D_ℓ / Σ D from the computed outlier ratios."""
    model = planted_outlier_model([10, 20, 40, 80])
    opt = OwLore(model, lr=1e-2, rank=4, n_layers=gamma, switch_every=1, seed=1)
    ratios = outlier_ratios(model)
    assert torch.equal(opt.ratios, ratios)
    p = (ratios / ratios.sum()).tolist()
    target = torch.tensor(inclusion_probabilities(p, gamma), dtype=torch.float32)
    draws = 3000
    freq = sampling_frequencies(opt, model, draws)
    tol = 4 * (target * (1 - target) / draws).sqrt()
    assert (freq - target).abs().le(tol).all(), (freq, target)


def test_owlore_updates_sampled_layers_in_low_rank():
    """Faithful test: unsampled layers stay bit-identical; a sampled layer's matrices carry
    r×n (m < n) or m×r (m ≥ n) Adam state; its update has rank ≤ r."""
    rank = 3
    model = make_model()
    opt = OwLore(model, lr=1e-2, rank=rank, n_layers=1, switch_every=4, ratios=[1, 1, 1, 1], seed=2)
    for _step, batch in enumerate(make_batches(8)):
        layer = f"model.layers.{opt.active_layers[0]}"
        before = snapshot(model)
        one_step(model, opt, batch)
        moved = changed(before, model)
        assert {layer_of(n) for n in moved} == {layer, "embedding", "head"}
        for n, p in model.named_parameters():
            if layer_of(n) != layer or p.ndim != 2 or "exp_avg" not in opt.state.get(p, {}):
                continue
            m, k = p.shape
            assert opt.state[p]["exp_avg"].shape == ((rank, k) if m < k else (m, rank))
            delta = (p.detach() - before[n]).double()
            assert torch.linalg.matrix_rank(delta, rtol=1e-3).item() <= rank  # up to fp32 rounding of p
    emb = model.model.embed_tokens.weight
    assert opt.state[emb]["exp_avg"].shape == emb.shape  # embedding/head: full Adam


def galore_reference_adamw() -> type:
    """``galore_torch.GaLoreAdamW`` (``galore_torch.adamw.AdamW``) loaded without the package ``__init__``
    (which imports bitsandbytes, ~9 s)."""
    spec = importlib.util.find_spec("galore_torch")
    # a parity test fails (never skips) without the dev extras: `make test` installs them
    assert spec is not None and spec.submodule_search_locations, "galore-torch is not installed (pip install -e .[dev])"
    if "_galore_reference" not in sys.modules:
        package = types.ModuleType("_galore_reference")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["_galore_reference"] = package
    return importlib.import_module("_galore_reference.adamw").AdamW


def test_owlore_inner_update_matches_galore_torch():
    """With every layer sampled, OwLore's update == galore_torch's GaLoreAdamW (the official code's
    optimizer) on the same param groups, projector refresh included. Not bit for bit: the shared
    engine folds lr·√(1−β₂ᵗ)/(1−β₁ᵗ) in another order (1-ulp differences, which Adam grows to ~1e-6
    in 5 steps on near-zero gradients); a wrong scale, side, bias correction or refresh step is
    off by > 1e-3."""
    reference = galore_reference_adamw()
    a, b = make_model(), make_model()
    opt_a = OwLore(
        a, lr=1e-2, rank=4, n_layers=N_LAYERS, switch_every=100, update_gap=2, scale=0.5, ratios=[1] * N_LAYERS,
        projector="svd",  # the exact SVD of the official code (the default is the fast randomized one)
    )
    matrices = [m.weight for layer in b.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    ids = {id(p) for p in matrices}
    regular = [p for p in b.parameters() if id(p) not in ids]
    projected = {"params": matrices, "rank": 4, "update_proj_gap": 2, "scale": 0.5, "proj_type": "std"}
    groups = [{"params": regular}, projected]
    opt_b = reference(groups, lr=1e-2, no_deprecation_warning=True)
    for batch in make_batches(5):
        one_step(a, opt_a, batch)
        one_step(b, opt_b, batch)
    for (n, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(x, y, atol=1e-5, rtol=0), n
    untrained = make_model().model.layers[0].mlp.up_proj.weight
    assert not torch.allclose(a.model.layers[0].mlp.up_proj.weight, untrained, atol=1e-3)


def test_owlore_refuses_layers_without_outliers():
    with pytest.raises(ValueError, match="no layer has outliers at outlier_threshold=13.0"):
        OwLore(make_model(), lr=1e-2, rank=4)  # a random init has no entry above 13x the mean


# ---------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("method", [r.name for r in catalogue.records(family="sampler", status="done")])
def test_state_dict_round_trip_in_process(method, tmp_path):
    model = make_model()
    opt = make_optimizer(method, model)
    train(model, opt, make_batches(3))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert set(sd["sampler"]) >= {"global_step", "current", "rng"}
    other = make_optimizer(method, make_model(seed=1))
    other.load_state_dict(sd)
    assert other.global_step == 3 and other._current == opt._current
    assert len(other.state) == len(opt.state)


def test_resume_in_fresh_process_is_bit_identical(tmp_path):
    """N steps straight == k steps, save, load in a new process, N-k steps (bit-exact on CPU)."""
    total, k = 9, 3  # K=2: the active blocks switch both before and after the checkpoint
    methods = ["badam", "lisa", "owlore"]
    straight = {}
    for method in methods:
        model = make_model()
        opt = make_optimizer(method, model)
        train(model, opt, make_batches(total))
        straight[method] = params_of(model)
        model = make_model()
        opt = make_optimizer(method, model)
        train(model, opt, make_batches(total)[:k])
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / f"{method}.pt")
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, str(worker), "resume", "--dir", str(tmp_path), "--methods", ",".join(methods),
           "--steps", str(total - k), "--total", str(total), "--threads", str(torch.get_num_threads())]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    for method in methods:
        resumed = torch.load(tmp_path / f"{method}_final.pt", weights_only=True)
        assert all(torch.equal(resumed[n], straight[method][n]) for n in straight[method]), method


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda m: BAdam(m, lr=1e-2, order="sideways"), "order='sideways' is not allowed; choose one of"),
        (lambda m: BAdam(m, lr=0.0), "lr=0.0 must be a finite number > 0"),
        (lambda m: BAdam(m, lr=1e-2, switch_every=0), "switch_every=0 must be an integer >= 1"),
        (lambda m: BAdam(m, lr=1e-2, betas=(0.9, 1.0)), "betas[1]=1.0 must be a finite number >= 0.0 and < 1.0"),
        (lambda m: BAdam(m, lr=1e-2, order="random", start_block=1), "start_block is only allowed"),
        (lambda m: BAdam(m, lr=1e-2, order="ascending", start_block=9), "start_block=9 must be <"),
        (lambda m: BAdam(m, lr=1e-2, always_active=["nope"]), "prefix 'nope' matches no parameter"),
        (lambda m: LISA(m, lr=1e-2, n_layers=5), "n_layers=5 must be <= the number of layers"),
        (lambda m: LISA(m, lr=1e-2, probs=[1, 2]), "probs must hold 4 finite non-negative numbers"),
        (lambda m: LISA(m, lr=1e-2, n_layers=2, probs=[1, 0, 0, 0]), "n_layers=2 must be <="),
        (lambda m: OwLore(m, lr=1e-2, rank=0, ratios=[1] * 4), "rank=0 must be an integer >= 1"),
        (lambda m: OwLore(m, lr=1e-2, ratios=[1] * 4),
         "rank=256 is larger than the smallest layer matrix dimension (16)"),
        (lambda m: outlier_ratios(m, threshold=-1), "threshold=-1 must be a finite number > 0"),
    ],
)
def test_bad_arguments(build, message):
    with pytest.raises(ValueError) as err:
        build(make_model())
    assert message in str(err.value)


def test_load_state_dict_requires_sampler():
    opt = BAdam(make_model(), lr=1e-2)
    sd = opt.state_dict()
    del sd["sampler"]
    with pytest.raises(ValueError, match="no 'sampler' entry"):
        opt.load_state_dict(sd)


# ---------------------------------------------------------------------------------- add_param_group

SAMPLER_NAMES = [r.name for r in catalogue.records(api="optim", family="sampler", status="done")]


def _sampler(name: str, model: nn.Module) -> torch.optim.Optimizer:
    options: dict = {"switch_every": 2}
    if name == "lisa":
        options["n_layers"] = 1
    if name == "owlore":
        options.update(rank=4, ratios=[1.0, 1.0], n_layers=1)
    return catalogue.get(name).build(model, lr=1e-2, **options)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_add_param_group_trains_the_new_group_at_every_step(name):
    """torch.optim convention: a group added after construction is updated by step(), with its own
    options, across block switches, and its state survives a state_dict round trip."""
    from ..conftest import lm_batches

    model = make_tiny_llama()
    opt = _sampler(name, model)
    extra = nn.Parameter(torch.ones(8, 8))
    opt.add_param_group({"params": [extra], "lr": 0.1})
    assert any(p is extra for p in opt.awake_parameters)
    for step, batch in enumerate(lm_batches(5)):
        before = extra.detach().clone()
        model(**batch).loss.backward()
        extra.grad = torch.ones_like(extra)
        opt.step()
        opt.zero_grad()
        if step == 0:  # Adam's first step moves every coordinate by its group's lr
            torch.testing.assert_close(before - extra.detach(), torch.full_like(extra, 0.1))
        assert not torch.equal(extra.detach(), before), f"step {step}: the added group was not updated"
    assert "exp_avg" in opt.state[extra]
    # resume: the same optimizer with the same group added loads the state and steps alike
    other_model = make_tiny_llama()
    other_model.load_state_dict(model.state_dict())
    other_extra = nn.Parameter(extra.detach().clone())
    other = _sampler(name, other_model)
    other.add_param_group({"params": [other_extra], "lr": 0.1})
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares the tensors otherwise
    for o, e in ((opt, extra), (other, other_extra)):
        e.grad = torch.full_like(e, 0.5)
        o.step()
    assert torch.equal(extra, other_extra)


def test_badam_add_param_group_wakes_a_parameter_it_froze():
    """BAdam freezes the head by default; adding it as a group makes it train at every step."""
    from ..conftest import lm_batches

    model = make_tiny_llama()
    opt = BAdam(model, lr=1e-2, switch_every=2, order="ascending")
    head = model.lm_head.weight
    assert not head.requires_grad
    opt.add_param_group({"params": [head]})
    assert head.requires_grad
    for batch in lm_batches(3):
        before = head.detach().clone()
        one_step(model, opt, batch)
        assert not torch.equal(head.detach(), before)
