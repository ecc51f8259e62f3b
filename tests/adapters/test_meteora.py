"""MeteoRA: the model's LoRA adapters as frozen experts of a per-token top-k gate (Xu et al. 2024)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.meteora import MeteoRALayer

from ..conftest import lm_batches, make_tiny_llama

IDS = lm_batches(n=1, batch=3, seq=8, seed=3)[0]["input_ids"]
EXPERTS = ["t1", "t2", "t3"]


def _logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


@torch.no_grad()
def _with_experts(model, ranks=(4, 2, 4), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for name, r in zip(EXPERTS, ranks, strict=True):
        rw.adapt(model, "lora", targets=["q_proj", "v_proj", "down_proj"], r=r, alpha=2 * r, name=name)
        for _, layer in rw.adapter_layers(model, name):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    return model


def _meteora_layers(model, name="meteora"):
    return [layer for _, layer in rw.adapter_layers(model, name)]


def test_only_the_gate_trains_and_experts_stay_bit_identical():
    model = rw.meteora(_with_experts(make_tiny_llama(0)), top_k=2)
    layers = _meteora_layers(model)
    assert all(isinstance(layer, MeteoRALayer) for layer in layers) and len(layers) == 6
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"meteora_gate"}
    assert sum(p.numel() for p in trainable.values()) == sum(len(EXPERTS) * layer.in_features for layer in layers)
    frozen = {k: t.clone() for k, t in model.state_dict().items() if "meteora_gate" not in k}
    gates = {k: t.clone() for k, t in model.state_dict().items() if "meteora_gate" in k}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    for batch in lm_batches(n=3, batch=2, seq=8, seed=5):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    state = model.state_dict()
    assert all(torch.equal(state[k], t) for k, t in frozen.items())  # base, sources and the expert copies
    assert all(not torch.equal(state[k], t) for k, t in gates.items())


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("chosen", range(3))
def test_a_one_hot_gate_gives_exactly_the_chosen_adapter(chosen, top_k):
    model = rw.meteora(_with_experts(make_tiny_llama(0)), top_k=top_k)
    alone = copy.deepcopy(model)
    rw.set_active(alone, EXPERTS[chosen])
    for layer in _meteora_layers(model):
        def forced(x, layer=layer):
            logits = torch.full((*x.shape[:-1], len(EXPERTS)), -1e4, dtype=x.dtype)
            logits[..., chosen] = 0.0
            return logits
        layer.gate_logits = forced
    torch.testing.assert_close(_logits(model), _logits(alone), atol=1e-6, rtol=0)


def test_gate_weights_are_a_softmax_over_the_top_k_logits():
    model = rw.meteora(_with_experts(make_tiny_llama(0)), top_k=2)
    layer = _meteora_layers(model)[0]
    x = torch.randn(5, layer.in_features)
    w = layer.gate_weights(x)
    logits = layer.gate_logits(x)
    assert torch.equal((w > 0).sum(-1), torch.full((5,), 2))
    top, index = logits.topk(2, dim=-1)
    torch.testing.assert_close(w.gather(-1, index), torch.softmax(top, dim=-1))
    assert torch.equal(w.argmax(-1), logits.argmax(-1))


class _Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(x)


def test_a_briefly_trained_gate_picks_each_tasks_adapter():
    """Two synthetic tasks (inputs around +μ and −μ, targets from the base plus that task's adapter) and
    a distractor expert: after a short training of the gate alone, each task's tokens route to their own
    adapter first."""
    torch.manual_seed(0)
    model = _Regressor()
    g = torch.Generator().manual_seed(1)
    for name in EXPERTS:
        rw.adapt(model, "lora", targets=["proj"], r=2, name=name)
        with torch.no_grad():
            for _, layer in rw.adapter_layers(model, name):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    mu = torch.randn(16, generator=g)
    mu = 3 * mu / mu.norm()

    def task(i: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 16, generator=g) + (mu if i == 0 else -mu)
        with torch.no_grad():
            rw.set_active(model, EXPERTS[i], trainable=False)
            y = model(x)
        return x, y

    data = [task(0), task(1)]
    rw.meteora(model, top_k=2)
    (layer,) = _meteora_layers(model)
    opt = torch.optim.Adam([layer.meteora_gate], lr=5e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = sum(nn.functional.mse_loss(model(x), y) for x, y in data)
        loss.backward()
        opt.step()
    for i, (x, _) in enumerate(data):
        with torch.no_grad():
            first = layer.gate_logits(layer.adapter_input(x)).argmax(-1)
        assert (first == i).float().mean() > 0.9, (i, first)


def test_merge_and_peft_export_are_refused_but_mixed_batches_and_save_load_work(tmp_path):
    model = rw.meteora(_with_experts(make_tiny_llama(0)))
    with pytest.raises(ValueError, match="no fixed ΔW, so it cannot be merged"):
        rw.merge(model)
    with pytest.raises(ValueError, match="no fixed ΔW"):
        rw.merge_and_unload(copy.deepcopy(model))
    with pytest.raises(ValueError, match="as a PEFT LoRA adapter.*rw.save_adapter .its update depends"):
        rw.export_peft(model, tmp_path / "p", name="meteora")
    assert not (tmp_path / "p").exists()
    names = ["meteora", "t1", None]
    mixed = _logits(model, adapter_names=names)
    alone = {n: _logits(copy.deepcopy(model)) for n in ["meteora"]}
    rw.set_active(model, "t1")
    alone["t1"] = _logits(model)
    alone[None] = _logits(make_tiny_llama(0))
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[n][i], atol=2e-5, rtol=0)
    rw.set_active(model, "meteora")
    rw.save_adapter(model, tmp_path / "m", name="meteora")
    back = rw.load_adapter(make_tiny_llama(0), tmp_path / "m")  # no experts needed: their factors are saved
    torch.testing.assert_close(_logits(back), alone["meteora"], atol=1e-6, rtol=0)


def test_bad_input_is_refused_before_the_model_changes():
    model = _with_experts(make_tiny_llama(0))
    before = rw.adapter_names(model)
    cases = [
        (dict(experts=["t1", "nope"]), "experts: unknown adapter"),
        (dict(experts=["t1", "t2"], top_k=3), "top_k"),
        (dict(experts=["t1", "t2"], top_k=0), "top_k"),
        (dict(experts=["t1", "t1"]), "twice"),
        (dict(experts=[]), "non-empty list"),
        (dict(experts=None), "meteora needs experts"),
        (dict(experts=["t1", "t3"], r=2), "rank 4"),
        (dict(experts=["t1", "t2"], r=4, targets=["o_proj"]), "experts: adapter 't1' is not on layer"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            rw.adapt(model, "meteora", name="m", **{"r": 4, "targets": ["q_proj"], **kwargs})
        assert rw.adapter_names(model) == before
    with pytest.raises(ValueError, match="meteora needs LoRA adapters"):
        rw.meteora(make_tiny_llama(0))
