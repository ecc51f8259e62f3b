"""ConvLoRA + AdaBN (``adapters/convlora.py``) on a small ResNet-shaped CNN.

Faithfulness: after target-domain training only the LoRA conv factors and the AdaBN statistics change
(every conv kernel, BatchNorm affine and source statistic bit-identical); the trainable share is < 1%;
the AdaBN statistics after a pass equal the statistics of the BatchNorm's inputs on the target data as
the momentum rule says (cumulative average, or (1 − m)·source + m·batch), which fails if the BatchNorms
stay in eval mode or the update rule is changed; the self-training loss uses hard argmax pseudo-labels.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.adapters.convlora import AdaBNLayer, adabn_pass, self_training_loss


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A ResNet-shaped classifier: 3×3 stem (32), three residual blocks (64, 128, 256, stride 2), pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.blocks = nn.Sequential(Block(32, 64, 2), Block(64, 128, 2), Block(128, 256, 2))
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.bn(self.stem(x)))).mean((2, 3)))


def source_model() -> TinyResNet:
    """Random weights and source-domain BatchNorm statistics (a few train-mode passes on N(0, 1) images)."""
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        for i in range(3):
            model(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)))
    return model.eval()


def target_batches(n: int = 2) -> list[torch.Tensor]:
    """Target-domain images: shifted and scaled."""
    return [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(100 + i)) * 2.0 + 0.7 for i in range(n)]


def test_only_lora_factors_and_bn_statistics_change():
    base = source_model()
    teacher = copy.deepcopy(base)
    model = rw.adapt(copy.deepcopy(base), "convlora", targets="all-conv", r=1)
    convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
    assert rw.adapter_state(model).layers == convs
    summary = rw.summary(model)
    assert summary.trainable == sum(layer.trainable_count() for _, layer in rw.adapter_layers(model))
    assert 0 < summary.trainable / summary.total < 0.01  # the paper: < 0.9% of the base model
    before = {k: t.clone() for k, t in model.state_dict().items()}
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for x in target_batches(3):
        loss = self_training_loss(model(x), teacher(x))
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    statistics = {"running_mean", "running_var", "num_batches_tracked"}
    owners = {k: model.get_submodule(k.rpartition(".")[0]) for k in after}
    adabn = {k for k in after if isinstance(owners[k], AdaBNLayer) and k.rpartition(".")[2] in statistics}
    lora = {k for k in after if k.rpartition(".")[2] in ("lora_A", "lora_B")}
    assert changed <= adabn | lora, changed - adabn - lora  # kernels, BN affine, source statistics, fc: untouched
    assert adabn <= changed and {k for k in lora if k.endswith("lora_B")} <= changed
    assert len(adabn) == 3 * 10 and len(lora) == 2 * 10  # 10 BatchNorms, 10 convolutions


@pytest.mark.parametrize(("adabn", "momentum"), [("reset", None), ("keep", 0.3)])
def test_adabn_statistics_follow_the_momentum_rule(adabn, momentum):
    base = source_model()
    model = rw.adapt(copy.deepcopy(base), "convlora", targets="all-conv", r=1, adabn=adabn, bn_momentum=momentum)
    batches = target_batches(2)
    name = "blocks.1.bn2"
    layer = model.get_submodule(name)
    seen: list[torch.Tensor] = []  # what the BatchNorm normalizes during the pass
    layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    modes = [m.training for m in model.modules()]
    adabn_pass(model, batches)
    assert [m.training for m in model.modules()] == modes  # modes restored
    assert len(seen) == 2 and int(layer.num_batches_tracked) == (2 if adabn == "reset" else 5)
    source = base.get_submodule(name)
    dims = (0, 2, 3)
    means = [s.mean(dims) for s in seen]
    variances = [s.var(dims, unbiased=True) for s in seen]
    if momentum is None:  # cumulative average over the target batches, from reset statistics
        want_mean, want_var = sum(means) / 2, sum(variances) / 2
    else:
        want_mean, want_var = source.running_mean.clone(), source.running_var.clone()
        for m, v in zip(means, variances, strict=True):
            want_mean, want_var = (1 - momentum) * want_mean + momentum * m, (1 - momentum) * want_var + momentum * v
    torch.testing.assert_close(layer.running_mean, want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var, want_var, rtol=1e-5, atol=1e-6)
    assert torch.equal(source.running_mean, layer.base_layer.running_mean)  # the source statistics kept


def adapted_on_target(base: nn.Module, **options) -> nn.Module:
    """A ConvLoRA copy of ``base`` after an AdaBN pass on target data, with random B (a trained-looking ΔW)."""
    model = rw.adapt(copy.deepcopy(base), "convlora", targets="all-conv", **options)
    adabn_pass(model, target_batches(2))
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            if hasattr(layer, "lora_B"):
                layer.lora_B.normal_(0, 0.1)
    return model


def test_eval_uses_target_statistics_merge_and_disable():
    base = source_model()
    model = adapted_on_target(base, r=1)
    x = target_batches(1)[0]
    out = model(x)
    expected = copy.deepcopy(base)  # the source model with the target statistics and W + s·B·A written in
    with torch.no_grad():
        for name, layer in rw.adapter_layers(model):
            module = expected.get_submodule(name)
            if isinstance(layer, AdaBNLayer):
                module.running_mean.copy_(layer.running_mean)
                module.running_var.copy_(layer.running_var)
            else:
                module.weight += (layer.scale * layer.lora_B @ layer.lora_A).reshape(module.weight.shape)
    torch.testing.assert_close(out, expected(x), rtol=1e-5, atol=1e-5)
    with rw.adapters_disabled(model):
        assert torch.equal(model(x), base(x))  # source statistics and kernels
    merged = rw.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, AdaBNLayer) for m in merged.modules())
    torch.testing.assert_close(merged(x), out, rtol=1e-5, atol=1e-5)
    plain = rw.unload(model)
    assert torch.equal(plain(x), base(x))


def test_save_load_and_peft_export(tmp_path):
    from peft import PeftModel

    base = source_model()
    model = adapted_on_target(base, r=2, alpha=4)
    x = target_batches(1)[0]
    out = model(x)
    rw.save_adapter(model, tmp_path / "a")
    assert torch.equal(rw.load_adapter(copy.deepcopy(base), tmp_path / "a").eval()(x), out)
    rw.export_peft(model, tmp_path / "p")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    torch.testing.assert_close(peft_model(x), out, rtol=0, atol=1e-5)


def test_self_training_loss_uses_hard_pseudo_labels():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 5, 5, generator=g, requires_grad=True)  # a segmentation map, classes on dim 1
    teacher = torch.randn(2, 4, 5, 5, generator=g, requires_grad=True)
    weights = torch.tensor([0.2, 1.0, 1.0, 2.0])
    loss = self_training_loss(student, teacher, weights)
    labels = teacher.argmax(1)
    picked = -F.log_softmax(student, 1).gather(1, labels[:, None])[:, 0]
    torch.testing.assert_close(loss, (weights[labels] * picked).sum() / weights[labels].sum())
    loss.backward()
    assert teacher.grad is None and student.grad is not None  # pseudo-labels are constants
    with pytest.raises(ValueError, match="same shape"):
        self_training_loss(student, teacher[:, :3])


def test_refusals():
    with pytest.raises(ValueError, match="adabn='new' is not allowed|adabn"):
        rw.adapt(source_model(), "convlora", targets="all-conv", adabn="new")
    with pytest.raises(ValueError, match="bn_momentum"):
        rw.adapt(source_model(), "convlora", targets="all-conv", bn_momentum=1.5)
    with pytest.raises(ValueError, match="method 'convlora' does not support target_parameters"):
        rw.adapt(source_model(), "convlora", targets="all-conv", target_parameters=["experts.down_proj"])
    model = rw.adapt(source_model(), "convlora", targets="all-conv", r=1)
    with pytest.raises(ValueError, match="already holds an adapter"):
        rw.adapt(model, "convlora", targets=["fc"], name="second")
    with pytest.raises(ValueError, match="per-example adapters"), rw.batch_adapters(model, ["default", None]):
        model(target_batches(1)[0][:2])
    with pytest.raises(ValueError, match="no AdaBN layers"):
        adabn_pass(source_model(), target_batches(1))


def test_a_checkpointing_recompute_leaves_the_adabn_statistics_alone():
    """Activation checkpointing runs a block's forward again in backward: AdaBN's statistics take one update
    per batch, as without checkpointing (and the same gradients)."""
    from torch.utils.checkpoint import checkpoint

    model = adapted_on_target(source_model(), r=1).train()
    ref = copy.deepcopy(model)
    x = target_batches(1)[0]
    ref(x).square().mean().backward()
    h = F.relu(model.bn(model.stem(x)))
    for block in model.blocks:
        h = checkpoint(block, h, use_reentrant=False)
    model.fc(h.mean((2, 3))).square().mean().backward()
    for (name, layer), (_, want) in zip(rw.adapter_layers(model), rw.adapter_layers(ref), strict=True):
        if isinstance(layer, AdaBNLayer):
            assert int(layer.num_batches_tracked) == int(want.num_batches_tracked), name
            torch.testing.assert_close(layer.running_mean, want.running_mean, msg=name)
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters(), strict=True) if p.requires_grad]
    assert grads and all(torch.allclose(g, w, atol=1e-6) for g, w in grads)
