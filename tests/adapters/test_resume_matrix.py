"""Resuming a run is bit-identical for every adapter method: 4 steps straight equal a run that checkpoints at step
2, crashes after step 3 and resumes from the checkpoint, in every tensor of the model's state (adapters, their
buffers, masks and the base). The methods with a rank or index schedule get one that fits the 4 steps."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, init_data_for, make_tiny_bert
from ..test_train import Crash, CrashAt
from .test_matrix import METHODS

#: schedules that re-allocate within 4 steps (their own defaults start at step 10 or later)
OPTIONS = {"adalora": {"target_r": 1, "tinit": 1, "tfinal": 1, "deltaT": 1},
           "elalora": {"warmup": 2, "adjust_interval": 2, "adjust_k": 1},
           "increlora": {"incre_interval": 1, "top_h": 13, "incre_rank_num": 3, "init_warmup": 0},
           "spiel": {"regrow_every": 4, "regrow_steps": 3}}  # the step-2 checkpoint lies inside its window


def _run(method: str, out, callbacks=(), resume=None):
    model = make_tiny_bert()
    init_data = init_data_for(method, cls_batches(n=2, seed=9), 2)
    rw.adapt(model, method, r=2, init_data=init_data, **OPTIONS.get(method, {}))
    cfg = TrainConfig(max_steps=4, lr=1e-2, progress=False, measure_memory=False, output_dir=str(out),
                      checkpoint_every=2)
    train(model, cls_batches(n=4), cls_batches(n=3, seed=5), config=cfg, callbacks=callbacks, resume_from=resume)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_resume_is_bit_identical_for_every_method(method, tmp_path):
    straight = _run(method, tmp_path / "a")
    with pytest.raises(Crash):
        _run(method, tmp_path / "b", callbacks=[CrashAt(3)])
    resumed = _run(method, tmp_path / "b", resume=tmp_path / "b")
    want, got = straight.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for key, value in want.items():
        if torch.is_tensor(value):
            assert value.shape == got[key].shape and torch.equal(value, got[key]), key
