"""INT2.1's LREC (Chai et al. 2023): a LoRA adapter on the compressed layers trained on the forward KL
to the full-precision original's logits. Faithful properties: the loss is the forward KL (its gradient
is T·(p_student − p_teacher)/n), only the adapter trains (the 4-bit codes stay bit-identical), and the
corrected model moves toward the *original's* distribution, which training the same adapter on the
data's labels does not do."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.compress.finetune import finetune
from rankwise.compress.lrec import distill_kl, model_kl

from ..conftest import require_bnb_narrow_rows
from .anisotropic import pattern_batches, trained_anisotropic_llama

pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def _bnb_narrow_rows_quantize_correctly():
    require_bnb_narrow_rows()


CALIBRATION = pattern_batches(4, seed=1)
HELD_OUT = pattern_batches(4, seed=2)


@pytest.fixture(scope="module")
def trained():
    return trained_anisotropic_llama(epochs=6)[0]


def _quantized(original):
    return rw.quantize(copy.deepcopy(original), "nf4")


def _codes(model) -> dict[str, torch.Tensor]:
    """The 4-bit codes by layer (an adapter wraps its layer as ``.base_layer``)."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
            if p.dtype == torch.uint8}


def test_distill_kl_is_the_forward_kl_with_its_gradient():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, 7, generator=g)
    for t in (1.0, 2.0):
        loss = distill_kl(student, teacher, temperature=t)
        p_t, p_s = (teacher / t).softmax(-1), (student / t).softmax(-1)
        expected = t * t * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
        torch.testing.assert_close(loss, expected)
        (grad,) = torch.autograd.grad(loss, student)
        torch.testing.assert_close(grad, t * (p_s - p_t).detach() / 10)  # forward KL: p_student − p_teacher
    assert float(distill_kl(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0  # padding does not count
    other = teacher.clone()
    other[1, 3:] += 5.0
    torch.testing.assert_close(distill_kl(other, teacher, mask), distill_kl(teacher, teacher, mask))


def test_lrec_trains_only_the_adapter_and_closes_the_gap_to_the_original(trained):
    model = _quantized(trained)
    codes = _codes(model)
    frozen_original = {k: v.clone() for k, v in trained.state_dict().items()}
    before = model_kl(model, trained, HELD_OUT)
    rw.compression.lrec(model, trained, CALIBRATION, r=4, steps=40, lr=3e-3)
    after = model_kl(model, trained, HELD_OUT)
    assert after < 0.5 * before, (before, after)
    now = _codes(model)
    assert codes.keys() == now.keys() and codes
    assert all(torch.equal(codes[k], now[k]) for k in codes)  # the 4-bit base never moved
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in frozen_original.items())
    state = model.rankwise_lrec["lrec"]
    assert rw.adapter_names(model) == ["lrec"] and len(state.history) == 40
    assert state.history[-1]["loss"] < state.history[0]["loss"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_the_target_is_the_original_not_the_data(trained):
    """Labels the original does not predict (shuffled tokens): the same adapter trained on them moves
    away from the original, LREC toward it."""
    g = torch.Generator().manual_seed(3)
    noisy = [{**b, "labels": b["input_ids"][:, torch.randperm(16, generator=g)]} for b in CALIBRATION]
    lrec = rw.compression.lrec(_quantized(trained), trained, noisy, r=4, steps=30, lr=3e-3)
    task = _quantized(trained)
    rw.adapt(task, "lora", r=4, targets=[n for n, _ in rw.adapter_layers(lrec)], trainable=None, name="lrec")
    finetune(task, [p for p in task.parameters() if p.requires_grad], noisy, 30, 3e-3)
    assert model_kl(lrec, trained, HELD_OUT) < 0.5 * model_kl(task, trained, HELD_OUT)


def test_eora_init_starts_closer_than_zero_init(trained):
    zero = rw.compression.lrec(_quantized(trained), trained, CALIBRATION, r=4, steps=1, lr=1e-12)
    eora = rw.compression.lrec(_quantized(trained), trained, CALIBRATION, r=4, steps=1, lr=1e-12, init="eora")
    assert eora.rankwise_lrec["lrec"].history[0]["loss"] < zero.rankwise_lrec["lrec"].history[0]["loss"]


def test_lrec_bad_input(trained):
    with pytest.raises(ValueError, match="init='svd'.*zero.*eora"):
        rw.compression.lrec(_quantized(trained), trained, CALIBRATION, init="svd")
    with pytest.raises(ValueError, match="original is model"):
        model = _quantized(trained)
        rw.compression.lrec(model, model, CALIBRATION)
    with pytest.raises(ValueError, match="nothing to correct"):
        rw.compression.lrec(copy.deepcopy(trained), trained, CALIBRATION)
    with pytest.raises(ValueError, match="steps"):
        rw.compression.lrec(_quantized(trained), trained, CALIBRATION, steps=0)


def test_int21_is_catalogued_as_a_compensation():
    record = rw.catalogue.get("int21")
    assert record.status == "done" and record.api == "compensate" and record.exports == "peft-lora"
