"""Targets that would adapt the classification head (and train its base weight), and 'all-linear' on a
model whose projections are transformers Conv1D layers (GPT-2), are errors naming the modules."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

import rankwise as rw
from rankwise.targets import find_targets

from .conftest import make_tiny_bert, make_tiny_llama


@pytest.mark.parametrize("targets", [r".*(query|classifier)", ["query", "classifier"], r"classifier"])
def test_targets_matching_the_classifier_head_name_it(targets):
    model = make_tiny_bert()
    with pytest.raises(ValueError, match="matched 'classifier', part of the classification head"):
        rw.adapt(model, "lora", r=2, targets=targets)
    assert not any(p.requires_grad is False for p in model.parameters())  # untouched


def test_targets_that_leave_the_head_out_still_work():
    model = make_tiny_bert()
    rw.adapt(model, "lora", r=2, targets=r".*\.(query|value)")
    assert len(rw.adapter_layers(model)) == 4
    assert model.classifier.weight.requires_grad  # trained in full, not adapted


def test_lm_head_may_still_be_targeted_by_name():
    assert [n for n, _ in find_targets(make_tiny_llama(), ["lm_head"])] == ["lm_head"]


@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2ForSequenceClassification])
def test_all_linear_on_conv1d_layers_names_them(cls):
    torch.manual_seed(0)
    model = cls(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match=r"Conv1D layers \(\['transformer.h.0.attn.c_attn'.*not supported yet"):
        rw.adapt(model, "lora", r=2)
    with pytest.raises(ValueError, match="of type Conv1D"):
        rw.adapt(model, "lora", r=2, targets=["c_attn"])
