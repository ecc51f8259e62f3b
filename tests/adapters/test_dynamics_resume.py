"""Resuming a run of each training-dynamics method is bit-identical: the loop checkpoints what the method's
callbacks (COLA's merged base) and optimizer (LoRA-Pro's full-size moments) hold, and every RNG (LoRA Dropout's
masks)."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert
from ..test_train import Crash, CrashAt

# COLA restarts at step 2, before the step-2 checkpoint: only its controller state holds the merged base
METHODS = {"allora": {"eta": 2.0}, "lora_pro": {}, "lora_dropout": {"param_dropout": 0.3}, "cola": {"chain_every": 2},
           "lora_ggpo": {"ggpo_sigma": 0.5, "ggpo_beta": 0.5}, "fast_forward": {"ff_every": 1},
           "bilora": {"upper_every": 2}, "loft": {}, "roselora": {"density": 0.25, "start": 0.0, "end": 0.5},
           "ba_lora": {"lambda1": 0.1, "lambda2": 0.1, "lambda3": 0.1, "svd_k": 1},
           "riemannlora": {"init_data": cls_batches(n=2, seed=9)},
           "autolora": {}}  # (rank allocation, but trained like BiLoRA: α on the eval batches)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_is_bit_identical(method, tmp_path):
    """4 steps straight == checkpoint at 2, crash after 3, resume from the checkpoint."""

    def run(out, callbacks=(), resume=None):
        model = make_tiny_bert()
        rw.adapt(model, method, r=2, **METHODS[method])
        cfg = TrainConfig(max_steps=4, lr=1e-2, progress=False, measure_memory=False, output_dir=str(out),
                          checkpoint_every=2)
        # the eval batches are Fast Forward's tiny validation set
        train(model, cls_batches(n=4), cls_batches(n=3, seed=5), config=cfg, callbacks=callbacks, resume_from=resume)
        return model

    straight = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", callbacks=[CrashAt(3)])
    resumed = run(tmp_path / "b", resume=tmp_path / "b")
    for (name, a), (_, b) in zip(rw.adapter_layers(straight), rw.adapter_layers(resumed), strict=True):
        assert torch.equal(a.base_weight, b.base_weight), name
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name
        if hasattr(a, "lora_E"):
            assert torch.equal(a.lora_E, b.lora_E), name
