"""Adapter core: target selection, config errors, and the faithful tests of LoRA and rsLoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.targets import find_targets

from ..conftest import cls_batches, lm_batches, make_tiny_bert, make_tiny_llama


def test_all_linear_excludes_output_heads():
    bert = make_tiny_bert()
    names = [n for n, _ in find_targets(bert, "all-linear")]
    assert "classifier" not in names and len(names) == 13  # 6 per layer x 2 + pooler
    llama = make_tiny_llama()
    names = [n for n, _ in find_targets(llama, "all-linear")]
    assert "lm_head" not in names and len(names) == 14  # q,k,v,o,gate,up,down x 2


def test_suffix_and_regex_targets():
    bert = make_tiny_bert()
    by_suffix = [n for n, _ in find_targets(bert, ["query", "value"])]
    by_regex = [n for n, _ in find_targets(bert, r".*\.(query|value)")]
    assert by_suffix == by_regex and len(by_suffix) == 4


def test_adapt_freezes_all_but_adapters_and_head(tiny_bert):
    rw.adapt(tiny_bert, "lora", r=4, targets=["query", "value"])
    trainable = {n for n, p in tiny_bert.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or n.startswith("classifier.") for n in trainable)
    assert any(n.startswith("classifier.") for n in trainable)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "nope"}, "unknown method 'nope'; known methods: ["),
        ({"method": "lora", "r": 0}, "r=0 must be a positive integer"),
        ({"method": "lora", "r": 33}, "r=33 is larger than min(in_features, out_features)=32"),
        ({"method": "lora", "targets": ["nothing_here"]}, "matched no module"),
        ({"method": "lora", "targets": ["embeddings"]}, "only nn.Linear modules can be adapted"),
        ({"method": "lora", "rank": 4}, "unknown option(s) ['rank'] for method 'lora'; allowed options: ["),
        ({"method": "lora", "init": "magic"}, "init='magic' is not allowed; choose one of ["),
        ({"method": "lora", "dropout": 1.5}, "dropout=1.5 must be in [0, 1)"),
        ({"method": "lora", "alpha": -1}, "alpha=-1 must be a positive number"),
    ],
)
def test_bad_config_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        rw.adapt(make_tiny_bert(), **kwargs)
    assert message in str(err.value)


def test_adapting_twice_is_refused(tiny_bert):
    rw.adapt(tiny_bert, "lora", r=2)
    with pytest.raises(ValueError, match="already has rankwise adapters"):
        rw.adapt(tiny_bert, "lora", r=2)


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


def test_summary_counts(tiny_llama):
    rw.adapt(tiny_llama, "lora", r=4)
    s = rw.summary(tiny_llama)
    expected = sum(layer.trainable_count() for _, layer in rw.adapter_layers(tiny_llama))
    assert s.per_method["lora"] == expected == s.trainable
    assert s.total == sum(p.numel() for p in tiny_llama.parameters())
    assert "trainable" in str(s)


def test_unload_restores_plain_model(tiny_llama):
    ref = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    rw.adapt(tiny_llama, "lora", r=4)
    base = rw.unload(tiny_llama)
    assert not rw.adapter_layers(base)
    assert all(torch.equal(v, ref[k]) for k, v in base.state_dict().items())


def test_save_is_atomic(tmp_path, monkeypatch):
    model = rw.adapt(make_tiny_bert(), "lora", r=2)
    rw.save_adapter(model, tmp_path / "a")
    before = sorted(p.name for p in (tmp_path / "a").iterdir())

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("rankwise.io.save_tensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        rw.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary left behind


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
