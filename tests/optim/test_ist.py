"""IST (Yao et al. 2024): layers wake with weights sigmoid(−s); the scores move by the response-suppression
rule; only the awake layers' PEFT modules change; the scores survive a checkpoint."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import rankwise as rw
from rankwise.optim import IST

from .ddp_worker import make_batches, make_model


def adapted(seed: int = 0, b_scale: float = 0.5) -> torch.nn.Module:
    """A 4-layer Llama with LoRA (r = 4) on every linear layer and random B, so every adapter matters."""
    model = rw.adapt(make_model(seed), "lora", r=4)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * b_scale)
    return model


def layer_of(name: str) -> int:
    return int(name.split(".")[2])


def test_layers_wake_with_frequencies_sigmoid_of_minus_the_score():
    """With γ = 1 the probability that layer ℓ wakes is σ(−s_ℓ)/Σσ(−s); 3000 draws match it within 4σ."""
    model = make_model()
    opt = IST(model, lr=1e-2, n_layers=1, importance_every=10_000, seed=0)
    opt.scores.copy_(torch.tensor([2.0, 0.0, -1.0, -3.0], dtype=torch.float64))
    draws = 3000
    counts = torch.zeros(4)
    for _ in range(draws):
        opt.step()  # no gradients: only the draw
        counts[opt.active_layers[0]] += 1
    weights = torch.tensor([2.0, 0.0, -1.0, -3.0]).neg().sigmoid()
    expected = weights / weights.sum()
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert ((counts / draws - expected).abs() <= 4 * sigma).all(), (counts / draws, expected)
    assert counts.argmax() == 3 and counts.argmin() == 0  # the lowest score wakes most


def test_layers_are_suppressed_with_frequencies_sigmoid_of_the_score():
    """The scoring side draws the other way: with one suppressed layer per round, layer ℓ is suppressed
    with probability σ(s_ℓ)/Σσ(s) (B = 0: every loss equal, so the scores stay put)."""
    model = rw.adapt(make_model(), "lora", r=4)
    scores = torch.tensor([2.0, 0.0, -1.0, -3.0], dtype=torch.float64)
    opt = IST(model, lr=1e-2, n_layers=1, n_suppressed=1, rl_steps=1, data=make_batches(1, batch=1, seq=4), seed=0)
    opt.scores.copy_(scores)
    draws = 400
    counts = torch.zeros(4)
    for _ in range(draws):
        opt.update_importance()
        counts[opt.last_scoring[0][0][0]] += 1
    torch.testing.assert_close(opt.scores, scores, rtol=0, atol=0)
    expected = scores.float().sigmoid() / scores.float().sigmoid().sum()
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert ((counts / draws - expected).abs() <= 4 * sigma).all(), (counts / draws, expected)


def _suppressed_loss(model, batch, layers, factor=0.25):
    """The loss with the LoRA output of ``layers`` scaled by ``factor`` (Δ = s·B·A is linear in B)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") and layer_of(name) in layers:
                p.mul_(factor)
        return float(model(**batch).loss)


def test_a_scoring_round_applies_the_reward_rule_to_suppressed_losses():
    """K = 3 distinct sets of 2 suppressed layers; the recorded losses are those of the model with the sets'
    LoRA outputs ×0.25, computed here; s_ℓ = η·Σ_k (exp(−L_k) − mean)·σ(0)(1 − σ(0))·[ℓ ∈ S_k]."""
    model = adapted()
    batch = make_batches(1)[0]
    opt = IST(model, lr=1e-2, n_layers=1, n_suppressed=2, data=[batch], seed=3)
    opt.update_importance()
    selections, losses = opt.last_scoring
    assert len(selections) == 3 and len({tuple(s) for s in selections}) == 3
    independent = [_suppressed_loss(model, batch, set(s)) for s in selections]
    assert losses == pytest.approx(independent, rel=1e-6)
    assert len(set(round(x, 6) for x in independent)) == 3  # the suppressions really differ
    rewards = [math.exp(-x) for x in losses]  # the recorded losses (checked above): r − mean cancels digits
    mean = sum(rewards) / 3
    expected = torch.zeros(4, dtype=torch.float64)
    for s, r in zip(selections, rewards, strict=True):
        for i in s:
            expected[i] += 10.0 * (r - mean) * 0.25
    torch.testing.assert_close(opt.scores, expected, rtol=1e-5, atol=1e-9)
    assert float(opt.scores.abs().sum()) > 0


def test_a_layer_whose_suppression_helps_gains_score_and_wakes_least():
    """Only layer 2 has a (large, harmful) adapter: suppressing it lowers the loss, so the sets holding it
    earn positive rewards, s_2 becomes the largest score and layer 2 is the one trained least."""
    model = rw.adapt(make_model(), "lora", r=4)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") and layer_of(name) == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 3.0)
    batch = make_batches(1)[0]
    opt = IST(model, lr=1e-2, n_layers=1, n_suppressed=2, data=[batch], seed=0)
    for _ in range(10):
        opt.update_importance()
    assert int(opt.scores.argmax()) == 2, opt.scores
    counts = torch.zeros(4)
    for _ in range(400):
        opt.step()
        counts[opt.active_layers[0]] += 1
    assert int(counts.argmin()) == 2, counts


def test_each_step_updates_exactly_the_awake_layers_adapters_and_scores_resume():
    """Without ``data`` the last training batch is scored. Per step only the γ awake layers' LoRA
    parameters change; a state_dict round trip restores the scores and the following draws."""
    model = adapted(b_scale=0.05)
    opt = IST(model, lr=1e-2, n_layers=2, importance_every=2, seed=1)
    names = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    for step, batch in enumerate(make_batches(6)):
        awake = set(opt.active_layers)
        before = {n: p.detach().clone() for n, p in names.items()}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        moved = {layer_of(n) for n, p in names.items() if not torch.equal(before[n], p.detach())}
        assert moved == awake, (step, moved, awake)
    assert opt.last_scoring[0]  # scoring rounds ran on the training batches (steps 2, 4, 6)
    saved = copy.deepcopy(opt.state_dict())
    other_model = adapted(b_scale=0.05)
    other_model.load_state_dict(model.state_dict())
    other = IST(other_model, lr=1e-2, n_layers=2, importance_every=2, seed=7)
    other.load_state_dict(saved)
    torch.testing.assert_close(other.scores, opt.scores, rtol=0, atol=0)
    for batch in make_batches(5, seed=1):  # both runs go on alike, scoring rounds included
        for m, o in ((model, opt), (other_model, other)):
            m(**batch).loss.backward()
            o.step()
            o.zero_grad()
        assert other.active_layers == opt.active_layers
    torch.testing.assert_close(other.scores, opt.scores, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other_model.parameters(), strict=True))


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_suppressed=9 must be <= the number of layers"):
        IST(make_model(), lr=1e-2, n_suppressed=9)
    with pytest.raises(ValueError, match="importance_every=3 must be a multiple of switch_every=2"):
        IST(make_model(), lr=1e-2, switch_every=2, importance_every=3)
    with pytest.raises(ValueError, match="suppression"):
        IST(make_model(), lr=1e-2, suppression=1.5)
