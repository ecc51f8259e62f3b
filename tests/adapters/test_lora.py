"""LoRA and rsLoRA: the faithful tests (rank ≤ r, frozen base, exact merge; rsLoRA's α/√r scale), and LoRA-shaped
adapters training under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw

from ..conftest import cls_batches, lm_batches, make_tiny_bert, make_tiny_llama


def _train(model, batches, steps, opt_cls=torch.optim.AdamW, lr=1e-2):
    model.train()
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_lora_faithful():
    """Step 0 equals the base; after training rank(ΔW) <= r, base bit-identical, merge/unmerge exact."""
    base = make_tiny_bert()
    batches = cls_batches()
    ref = base(**batches[0]).logits
    model = make_tiny_bert()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "classifier" not in n}
    rw.adapt(model, "lora", r=2)
    assert torch.equal(model(**batches[0]).logits, ref)
    _train(model, batches, 10)
    for name, layer in rw.adapter_layers(model):
        assert torch.linalg.matrix_rank(layer.delta_weight()) <= 2
        assert layer.delta_weight().abs().max() > 0
        assert torch.equal(layer.base_layer.weight, frozen_before[name + ".weight"])
    out = model(**batches[1]).logits
    rw.merge(model)
    assert torch.allclose(model(**batches[1]).logits, out, atol=1e-5)
    rw.unmerge(model)
    for name, layer in rw.adapter_layers(model):
        assert torch.allclose(layer.base_layer.weight, frozen_before[name + ".weight"], atol=1e-6)


def _delta_norm_after_sgd(r: int, use_rslora: bool) -> float:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256))
    rw.adapt(net, "lora", r=r, alpha=8, use_rslora=use_rslora, targets=["0"])
    x, y = torch.randn(64, 256), torch.randn(64, 256)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(5):
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    layer = net[0]
    return (x @ layer.delta_weight().T).norm().item()


def test_rslora_faithful():
    """Scale is α/√r; ‖ΔW x‖ after a fixed number of steps stays put as r grows (α/r shrinks it)."""
    model = rw.adapt(make_tiny_bert(), "rslora", r=4, alpha=8)
    assert all(layer.scale == pytest.approx(8 / 2.0) for _, layer in rw.adapter_layers(model))
    rs = _delta_norm_after_sgd(256, True) / _delta_norm_after_sgd(4, True)
    plain = _delta_norm_after_sgd(256, False) / _delta_norm_after_sgd(4, False)
    assert 0.2 < rs < 5.0  # measured 0.35: same order of magnitude across a 64x rank change
    assert plain < 0.02  # measured 0.005: α/r shrinks the update roughly like 1/r


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_train_under_bf16_autocast(method):
    """Mixed precision: under CPU bf16 autocast the fused kernels step aside, the forward runs and the
    adapter gradients stay close to the fp32 ones."""
    batch = lm_batches(1)[0]

    def grads(autocast: bool) -> list[torch.Tensor]:
        model = make_tiny_llama(0)
        rw.adapt(model, method, targets="all-linear", r=4, seed=0)
        with torch.no_grad():  # non-zero B so every factor gets a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for got, want in zip(grads(True), grads(False), strict=True):
        assert got.dtype == torch.float32
        assert (got - want).norm() <= 0.1 * want.norm() + 1e-6
