"""Targets that would adapt the classification head (and train its base weight) are errors naming the
modules; 'all-linear' selects transformers Conv1D layers (GPT-2) for adapters, and is an error naming
them for the callers that handle nn.Linear only (sparse, compress, projected optimizers)."""

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


def _tiny_gpt2(cls):
    torch.manual_seed(0)
    return cls(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, pad_token_id=0))


CONV1D = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2ForSequenceClassification])
def test_all_linear_includes_conv1d_layers_but_not_the_head(cls):
    model = _tiny_gpt2(cls)
    assert [n for n, _ in find_targets(model, "all-linear")] == CONV1D  # lm_head / score left out
    rw.adapt(model, "lora", r=2)
    assert rw.adapter_state(model).layers == CONV1D
    assert [n for n, _ in find_targets(_tiny_gpt2(cls), ["c_attn"])] == CONV1D[0::4]
    assert [n for n, _ in find_targets(_tiny_gpt2(cls), r".*\.mlp\.c_.*")] == [n for n in CONV1D if ".mlp." in n]


def test_gpt2_classifier_head_is_still_refused():
    with pytest.raises(ValueError, match="matched 'score', part of the classification head"):
        rw.adapt(_tiny_gpt2(GPT2ForSequenceClassification), "lora", r=2, targets=["c_attn", "score"])


@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2ForSequenceClassification])
def test_linear_only_callers_name_the_conv1d_layers(cls):
    """find_targets(conv1d=False) (sparse, compress, projected optimizers) refuses Conv1D, naming them."""
    model = _tiny_gpt2(cls)
    with pytest.raises(ValueError, match=r"Conv1D layers \(\['transformer.h.0.attn.c_attn'.*not supported here"):
        find_targets(model, "all-linear", conv1d=False)
    with pytest.raises(ValueError, match="of type Conv1D; only nn.Linear modules can be adapted"):
        find_targets(model, ["c_attn"], conv1d=False)
    with pytest.raises(ValueError, match="Conv1D layers"):
        rw.optim.param_groups(model, rank=2)
