"""PELA: the student starts at the truncated SVD, the teacher is frozen, the distillation term, and distillation
through rw.compress."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.compress import factorized_layers, pela_distill, pela_losses, weight_perturbation

from ..conftest import lm_batches, make_tiny_llama
from .factor_checks import _assert_factor_pairs_are_truncated_svd, _linears


def test_pela_student_init_teacher_frozen_and_distillation_term():
    teacher = make_tiny_llama(0)
    originals = {n: m.weight.detach().clone() for n, m in _linears(teacher).items()}
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = rw.compress(copy.deepcopy(teacher), "pela", ratio=0.5)
    _assert_factor_pairs_are_truncated_svd(student, originals)  # student init = SVD truncation of teacher
    for name, r in student.rankwise_compress.ranks.items():
        out_f, in_f = originals[name].shape
        assert r == out_f * in_f // (2 * (out_f + in_f))  # PELA's rank rule with c = 1/ratio = 2

    batch = lm_batches(1, seed=5)[0]
    parts = pela_losses(student, teacher, batch, kd_alpha=2.0, kd_beta=3.0, wpr_weight=0.5)
    assert parts["feature"].item() > 0 and parts["logits"].item() > 0
    expected = parts["task"] + 2.0 * parts["feature"] + 3.0 * parts["logits"] + 0.5 * parts["wpr"]
    torch.testing.assert_close(parts["total"], expected)
    # feature term: mean over blocks of MSE(student hidden, teacher hidden)
    hs = student(**batch, output_hidden_states=True).hidden_states[1:]
    ht = teacher(**batch, output_hidden_states=True).hidden_states[1:]
    manual = torch.stack([torch.mean((a - b) ** 2) for a, b in zip(hs, ht, strict=True)]).mean()
    torch.testing.assert_close(parts["feature"], manual)
    # weight-perturbation regularizer: mean (max|UV − W_t| − ε)²
    gaps = [((l.U @ l.V - originals[n]).abs().max() - 1e-3) ** 2 for n, l in factorized_layers(student)]
    torch.testing.assert_close(weight_perturbation(student, teacher, 1e-3), torch.stack(gaps).mean())

    history = pela_distill(student, teacher, lm_batches(2), steps=3, lr=1e-3, kd_alpha=1.0, kd_beta=1.0, wpr_weight=1.0)
    assert len(history) == 3
    for rec in history:
        assert rec["feature"] > 0
        assert rec["total"] == pytest.approx(rec["task"] + rec["feature"] + rec["logits"] + rec["wpr"], rel=1e-5)
    for k, v in teacher.state_dict().items():  # teacher bit-identical
        assert torch.equal(v, teacher_state[k]), k
    assert all(p.grad is None for p in teacher.parameters())


def test_pela_through_compress_runs_distillation():
    model = make_tiny_llama(0)
    rw.compress(model, "pela", ratio=0.5, data=lm_batches(2), steps=2, lr=1e-3)
    hist = model.rankwise_compress.details["distill"]
    assert len(hist) == 2 and all(h["feature"] > 0 for h in hist)
