"""LaMDA: PMA never trains, S always does, PMB's columns freeze one by one every η·T steps from the
first (exactly: AdamW's momentum cannot move a frozen column), and PMB leaves training at the end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.init import InitContext
from rankwise.adapters.lamda import LaMDAConfig, LaMDALayer, frozen_columns
from rankwise.callbacks import Callback
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama


def test_delta_is_b_times_core_times_frozen_a():
    layer = LaMDALayer(nn.Linear(12, 20, bias=False), LaMDAConfig(r=3, alpha=6.0), InitContext(name="q"))
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["lamda_B", "lamda_S"]
    assert layer.trainable_count() == 9 + 60 and not layer.lamda_A.requires_grad
    assert torch.all(layer.lamda_B == 0) and layer.lamda_A.abs().max() <= 1 / 12**0.5
    with torch.no_grad():
        layer.lamda_B.normal_()
    expected = layer.lamda_B @ layer.lamda_S @ layer.lamda_A * 2.0
    torch.testing.assert_close(layer.delta_weight(), expected)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), x @ (layer.base_weight + expected).t(), atol=1e-5, rtol=1e-5)


def test_schedule_is_the_authors():
    assert [frozen_columns(k, 20, 0.25) for k in (0, 4, 5, 9, 10, 19)] == [0, 0, 1, 1, 2, 3]


class _Record(Callback):
    def __init__(self, layer):
        self.layer, self.seen = layer, []

    def on_step_end(self, state):
        layer = self.layer
        self.seen.append((layer.lamda_A.clone(), layer.lamda_S.detach().clone(), layer.lamda_B.detach().clone(),
                          layer.lamda_B.requires_grad, layer.trainable_count()))


def test_pmb_freezes_column_by_column_while_s_trains():
    model = make_tiny_llama()
    rw.adapt(model, "lamda", r=2, freeze_eta=0.25, trainable=None)
    layer = rw.adapter_layers(model)[0][1]
    a0 = layer.lamda_A.clone()
    rec = _Record(layer)
    # T = 12, η·T = 3: steps 0-2 all of PMB trains, 3-5 column 0 frozen, from 6 on PMB frozen
    opt_cfg = TrainConfig(max_steps=12, lr=5e-2, schedule="constant", max_grad_norm=None, seed=None,
                          device=None, measure_memory=False, weight_decay=0.1)
    train(model, lm_batches(n=12), config=opt_cfg, callbacks=[rec])
    a, s, b, trains, count = zip(*rec.seen, strict=True)
    assert all(torch.equal(x, a0) for x in a)  # PMA never changes
    assert all(not torch.equal(s[k], s[k + 1]) for k in range(11))  # S trains throughout
    assert all(not torch.equal(b[k][:, 0], b[k - 1][:, 0]) for k in (1, 2))  # column 0 trains first
    assert all(torch.equal(b[k][:, 0], b[2][:, 0]) for k in range(3, 12))  # then is frozen at step 3
    assert all(not torch.equal(b[k][:, 1], b[k - 1][:, 1]) for k in (3, 4, 5))  # while column 1 trains
    assert all(torch.equal(b[k], b[5]) for k in range(6, 12))  # all of PMB frozen from step 6
    assert trains == (True,) * 6 + (False,) * 6
    out = layer.out_features
    assert count == (4 + 2 * out,) * 6 + (4,) * 6  # the trainable count drops at the freeze step


@pytest.mark.parametrize("bad", [{"freeze_eta": 0}, {"freeze_eta": 1.5}, {"alpha": -1}])
def test_bad_options_name_the_parameter(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LaMDAConfig(**bad)


def test_resume_across_the_freeze_is_bit_identical(tmp_path):
    """6 steps straight == checkpoint at 2, crash after 4, resume (PMB fully frozen from step 4: η·T = 2)."""
    from ..test_train import Crash, CrashAt

    def run(out, callbacks=(), resume=None):
        model = make_tiny_llama()
        rw.adapt(model, "lamda", r=2, freeze_eta=1 / 3)
        cfg = TrainConfig(max_steps=6, lr=1e-2, progress=False, measure_memory=False, output_dir=str(out),
                          checkpoint_every=2)
        train(model, lm_batches(n=6), config=cfg, callbacks=callbacks, resume_from=resume)
        return model

    straight = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", callbacks=[CrashAt(4)])
    resumed = run(tmp_path / "b", resume=tmp_path / "b")
    for (name, a), (_, b) in zip(rw.adapter_layers(straight), rw.adapter_layers(resumed), strict=True):
        assert torch.equal(a.lamda_S, b.lamda_S) and torch.equal(a.lamda_B, b.lamda_B), name
        assert not a.lamda_B.requires_grad and not b.lamda_B.requires_grad
