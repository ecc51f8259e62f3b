"""AutoLoRA: the selection variables α learn from the validation loss only and the factors from the training
loss only; at the end the components with softmax(α)ᵢ < λ are removed physically and the kept ones keep their
contribution."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.adapters.autolora import AutoLoRAController, rank_pattern
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert

R = 4


def _model(**options):
    model = make_tiny_bert(0)
    for m in model.modules():  # deterministic forwards: the reference gradients are recomputed
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rw.adapt(model, "autolora", r=R, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
            layer.gate.copy_(0.3 * torch.randn(layer.gate.shape, generator=g))
    return model


class Probe:
    """Keeps the gradients the optimizer is about to use (runs after the method's controller)."""

    def on_after_backward(self, state):
        self.grads = {n: p.grad.clone() for n, p in state.model.named_parameters() if p.grad is not None}


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm().clamp(min=1e-30))


def _cfg(steps: int, **kw) -> TrainConfig:
    return TrainConfig(max_steps=steps, lr=1e-2, progress=False, measure_memory=False, max_grad_norm=None, **kw)


def test_selection_variables_learn_from_validation_and_factors_from_training():
    model = _model()
    ref = copy.deepcopy(model)
    train_data, val_data, test_data = cls_batches(n=1), cls_batches(n=1, seed=5), cls_batches(n=1, seed=9)
    probe = Probe()
    # α reads the run's val_loader, never its eval_loader (the split a runner reports on)
    train(model, train_data, test_data, config=_cfg(1), callbacks=[probe], val_loader=val_data)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    params = [p for p in ref.parameters() if p.requires_grad]
    ref.train()
    g_train = dict(zip(names, torch.autograd.grad(ref(**train_data[0]).loss, params), strict=True))
    g_val = dict(zip(names, torch.autograd.grad(ref(**val_data[0]).loss, params), strict=True))
    checked = 0
    for n in names:
        source = g_val if n.endswith("gate") else g_train
        other = g_train if n.endswith("gate") else g_val
        assert _rel(probe.grads[n], source[n]) < 1e-4, n
        if "lora_" in n or n.endswith("gate"):
            assert _rel(probe.grads[n], other[n]) > 1e-2, n
            checked += 1
    assert checked == 3 * len(rw.adapter_layers(model))


def test_rank_is_the_count_above_threshold_and_the_rest_is_removed_physically(tmp_path):
    model = _model(threshold=0.26)
    layers = dict(rw.adapter_layers(model))
    before = {n: (m.weights().detach().clone(), m.lora_B.detach().clone(), m.lora_A.detach().clone(), m.scale)
              for n, m in layers.items()}
    expected = {n: int((w >= 0.26).sum().clamp(min=1)) for n, (w, _, _, _) in before.items()}
    assert rank_pattern(model) == expected and len(set(expected.values())) > 1
    ctl = AutoLoRAController(model)
    ctl.prune()
    for n, m in layers.items():
        w, b, a, s = before[n]
        keep = w >= 0.26
        if not keep.any():
            keep = w == w.max()
        assert m.lora_A.shape[0] == m.lora_B.shape[1] == m.gate.numel() == expected[n]
        assert torch.allclose(m.delta_weight(), s * (b[:, keep] * w[keep]) @ a[keep], atol=1e-6)
    inputs = cls_batches(n=1, seed=8)[0]
    logits = model(**inputs).logits
    rw.save_adapter(model, tmp_path / "a")
    loaded = rw.load_adapter(make_tiny_bert(0), tmp_path / "a")
    assert torch.allclose(loaded(**inputs).logits, logits, atol=1e-5)
    assert rank_pattern(loaded) == expected


def test_training_prunes_at_the_end_and_needs_validation_data():
    model = _model(threshold=0.3)
    train(model, cls_batches(n=2), cls_batches(n=2, seed=5), config=_cfg(3))
    assert all(m.gate.numel() == rank_pattern(model)[n] for n, m in rw.adapter_layers(model))
    assert sum(rank_pattern(model).values()) < R * len(rw.adapter_layers(model))
    with pytest.raises(ValueError, match="val_loader"):
        train(_model(), cls_batches(n=2), config=_cfg(1))


def test_the_transformers_trainer_fits_selection_variables_on_its_eval_dataset(tmp_path):
    """Without an explicit controller the Trainer's eval_dataset (its validation split) is the upper level's data."""
    from rankwise.hf_trainer import RankwiseTrainer

    from ..test_hf_trainer import _args, _base, _dataset

    model = rw.adapt(_base(tmp_path), "autolora", r=R, threshold=0.3)
    trainer = RankwiseTrainer(model=model, args=_args(tmp_path / "run", steps=3, save_steps=100),
                              train_dataset=_dataset(), eval_dataset=_dataset(8))
    trainer.train()
    ctl = trainer.loop_callbacks.callbacks[0].controllers[0]
    assert isinstance(ctl, AutoLoRAController) and ctl.val_seen == 3
    with pytest.raises(ValueError, match="val_loader"):
        RankwiseTrainer(model=rw.adapt(_base(tmp_path), "autolora", r=R), train_dataset=_dataset(),
                        args=_args(tmp_path / "run2", steps=1, save_steps=100)).train()


def test_trains_in_the_transformers_trainer(tmp_path):
    from rankwise.hf_trainer import RankwiseTrainer

    from ..test_hf_trainer import _args, _base, _dataset

    model = rw.adapt(_base(tmp_path), "autolora", r=R, threshold=0.3)
    ctl = AutoLoRAController(model, val_data=cls_batches(n=2, seed=5))
    RankwiseTrainer(model=model, args=_args(tmp_path / "run", steps=3, save_steps=100), train_dataset=_dataset(),
                    loop_callbacks=[ctl]).train()
    assert ctl.val_seen == 3 and ctl.allocations == 1
    assert all(m.gate.numel() < R for _, m in rw.adapter_layers(model))
