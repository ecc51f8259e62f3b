"""``TrainConfig.gradient_checkpointing``: the same update with less kept for backward."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.train import TrainConfig, train

from .test_grad_accum import fixed_loader
from .test_train import dropout_bert


def saved_bytes_loss(record: list[int]):
    """A loss_fn that adds up the bytes the forward saves for backward (saved-tensor hooks)."""
    def loss_fn(model, batch):
        def pack(t: torch.Tensor) -> torch.Tensor:
            record.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return model(**batch).loss
    return loss_fn


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_gives_the_same_update_and_keeps_less(method):
    """BERT with dropout (the recompute must redraw the same masks): 3 steps with and without activation
    checkpointing end at the same weights, and the forward saves less than half as much for backward."""
    runs = {}
    for on in (False, True):
        model = dropout_bert()
        if method == "lora":
            rw.adapt(model, "lora", r=4, dropout=0.1)
        saved: list[int] = []
        cfg = TrainConfig(lr=1e-2, max_steps=3, progress=False, measure_memory=False, gradient_checkpointing=on)
        train(model, fixed_loader(12, 4), config=cfg, loss_fn=saved_bytes_loss(saved))
        runs[on] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, sum(saved) / 3)
    (plain, plain_bytes), (ckpt, ckpt_bytes) = runs[False], runs[True]
    for k, v in plain.items():
        torch.testing.assert_close(ckpt[k], v, rtol=0, atol=1e-6, msg=k)
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_a_model_without_checkpointing_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="gradient_checkpointing=True needs a Hugging Face model"):
        train(model, [{"input": torch.ones(2, 4)}], config=TrainConfig(max_steps=1, progress=False,
                                                                        gradient_checkpointing=True))
