"""COLA, Chain of LoRA (Xia et al. 2024): merge the link into the base, restart a fresh LoRA, clear its optimizer
state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.cola import ChainOfLoRA
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    rw.adapt(model, "cola", targets=["0", "2"], r=1, alpha=2, chain_every=3, trainable=None)
    return model


def _step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_restart_merges_resets_and_keeps_the_function():
    model = _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    chain = ChainOfLoRA(model, opt, every=3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    w0 = {n: l.base_weight.clone() for n, l in rw.adapter_layers(model)}
    for _ in range(2):
        _step(model, opt, x, y)
        assert not chain.step()
    _step(model, opt, x, y)
    before_out = model(x).detach()
    before = {n: (l.base_weight.clone(), l.delta_weight().detach().clone(), l.lora_A.detach().clone())
              for n, l in rw.adapter_layers(model)}
    assert all(opt.state[p] for _, l in rw.adapter_layers(model) for p in (l.lora_A, l.lora_B))
    assert chain.step()  # the 3rd step ends link 1
    for name, layer in rw.adapter_layers(model):
        base, delta, a = before[name]
        torch.testing.assert_close(layer.base_weight, base + delta)  # W ← W + s·B·A
        assert bool((layer.lora_B == 0).all())  # the new link starts at B = 0
        assert not torch.allclose(layer.lora_A, a)  # with a fresh A
        assert not opt.state[layer.lora_A] and not opt.state[layer.lora_B]  # moments cleared
    torch.testing.assert_close(model(x).detach(), before_out, rtol=1e-5, atol=1e-6)  # function unchanged
    # three more links: the total update exceeds the adapter's rank r = 1
    for _ in range(9):
        _step(model, opt, x, y)
        chain.step()
    assert chain.links == 4
    for name, layer in rw.adapter_layers(model):
        total = layer.base_weight - w0[name]
        assert int(torch.linalg.matrix_rank(total, rtol=1e-4)) > 1


def test_the_loop_attaches_the_chain_and_checkpoints_it(tmp_path):
    model = make_tiny_bert()
    rw.adapt(model, "cola", r=2, chain_every=2)
    base0 = {n: l.base_weight.clone() for n, l in rw.adapter_layers(model)}
    cfg = TrainConfig(max_steps=4, progress=False, measure_memory=False, output_dir=str(tmp_path), checkpoint_every=4)
    train(model, cls_batches(n=4), config=cfg)
    for name, layer in rw.adapter_layers(model):
        assert not torch.equal(layer.base_weight, base0[name])  # two links merged
        assert bool((layer.lora_B == 0).all())  # a restart at step 4
    with pytest.raises(ValueError, match="chain_every"):
        rw.adapt(make_tiny_bert(), "cola", r=2, chain_every=0)
    with pytest.raises(ValueError, match="init"):
        rw.adapt(make_tiny_bert(), "cola", r=2, init="pissa")




def test_optimizer_from_the_loop_state():
    """ChainOfLoRA(model, None, every) takes the loop's optimizer (the Trainer path); a bare step() refuses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    rw.adapt(model, "lora", targets=["0", "2"], r=1, trainable=None)  # no controller of its own
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    seen = []

    class Spy:
        def on_step_end(self, state):
            seen.append({id(p): bool(state.optimizer.state[p]) for p in state.optimizer.param_groups[0]["params"]})

    chain = ChainOfLoRA(model, None, every=2)
    train(model, [{"x": x, "y": y}] * 2, config=TrainConfig.plain(2), callbacks=[chain, Spy()],
          loss_fn=lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"]))
    lora = {id(p) for _, layer in rw.adapter_layers(model) for p in (layer.lora_A, layer.lora_B)}
    # moments after step 1, cleared by the restart at step 2
    assert chain.links == 1 and all(seen[0][i] for i in lora) and not any(seen[1][i] for i in lora)
    with pytest.raises(ValueError, match="optimizer"):
        ChainOfLoRA(model, None, every=1).step()
