"""The LoRA+ optimizer recipe (``loraplus_groups``): the exact lr ratio on B, ratio 1 is plain LoRA, only the B
step changes, bad input."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.optim import loraplus_groups

from ..conftest import cls_batches, make_tiny_bert


def test_loraplus_groups_ratio_is_exact():
    model = rw.adapt(make_tiny_bert(), "loraplus", r=4)
    groups = loraplus_groups(model, lr=3e-4, ratio=16.0, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert by_name["lora_B"]["lr"] / by_name["lora_A+other"]["lr"] == 16.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("lora_B") for p in by_name["lora_B"]["params"])
    others = {names[id(p)] for p in by_name["lora_A+other"]["params"]}
    assert any(n.endswith("lora_A") for n in others) and any(n.startswith("classifier.") for n in others)
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(groups)
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 3e-4 * 16.0]


def test_loraplus_ratio_one_is_bit_identical_to_plain_lora():
    data = cls_batches(n=3)
    a = rw.adapt(make_tiny_bert(), "loraplus", r=4)
    b = rw.adapt(make_tiny_bert(), "lora", r=4)
    with torch.no_grad():  # B ≠ 0 so both factors move from the first step
        for (_, la), (_, lb) in zip(rw.adapter_layers(a), rw.adapter_layers(b), strict=True):
            noise = torch.randn(la.lora_B.shape, generator=torch.Generator().manual_seed(0)) * 0.1
            la.lora_B.copy_(noise)
            lb.lora_B.copy_(noise)
    opt_a = torch.optim.AdamW(loraplus_groups(a, lr=1e-2, ratio=1.0, weight_decay=0.01))
    opt_b = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    for model, opt in ((a, opt_a), (b, opt_b)):
        torch.manual_seed(0)  # same dropout masks for both runs
        model.train()
        for batch in data:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa["classifier.weight"], make_tiny_bert().classifier.weight)


def test_loraplus_ratio_changes_the_b_step_only():
    data = cls_batches(n=1)
    models = [rw.adapt(make_tiny_bert(), "loraplus", r=4, trainable=None) for _ in range(2)]
    for model, ratio in zip(models, (1.0, 16.0), strict=True):
        opt = torch.optim.SGD(loraplus_groups(model, lr=1e-2, ratio=ratio))
        torch.manual_seed(0)  # same dropout masks for both runs
        model.train()
        with torch.no_grad():
            for _, layer in rw.adapter_layers(model):
                layer.lora_B.fill_(0.01)
        model(**data[0]).loss.backward()
        opt.step()
    for (_, l1), (_, l16) in zip(rw.adapter_layers(models[0]), rw.adapter_layers(models[1]), strict=True):
        assert torch.equal(l1.lora_B.grad, l16.lora_B.grad) and torch.equal(l1.lora_A, l16.lora_A)
        assert torch.allclose(l1.lora_B, 0.01 - 1e-2 * l1.lora_B.grad, rtol=0, atol=1e-9)  # B ← B − η_B·g_B
        assert torch.allclose(l16.lora_B, 0.01 - (1e-2 * 16.0) * l16.lora_B.grad, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0}, "lr=0 must be > 0"), ({"lr": 1e-3, "ratio": -2}, "ratio=-2 must be > 0"),
     ({"lr": 1e-3, "weight_decay": -1}, "weight_decay=-1 must be >= 0")],
)
def test_loraplus_bad_input(kwargs, message):
    model = rw.adapt(make_tiny_bert(), "loraplus", r=2)
    with pytest.raises(ValueError) as err:
        loraplus_groups(model, **kwargs)
    assert message in str(err.value)
    with pytest.raises(ValueError, match="no trainable parameter named"):
        loraplus_groups(rw.adapt(make_tiny_bert(), "lora_xs", r=2), lr=1e-3)


def test_the_training_loop_trains_loraplus_with_its_ratio():
    """`rw.adapt(model, "loraplus")` is trained by the one loop with lr_B = ratio·lr_A (not plain AdamW)."""
    from rankwise.train import TrainConfig, build_optimizer

    from ..conftest import make_tiny_llama

    model = rw.adapt(make_tiny_llama(0), "loraplus", r=2, ratio=8.0)
    opt = build_optimizer(model, TrainConfig(lr=1e-3, device=None, progress=False))
    lrs = {g.get("name"): g["lr"] for g in opt.param_groups}
    assert lrs["lora_B"] == pytest.approx(8e-3) and lrs["lora_A+other"] == pytest.approx(1e-3)
