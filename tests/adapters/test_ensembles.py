"""LoRA ensembles (Wang et al. 2023): k LoRA members on one shared frozen base, differing only by seed;
the prediction is the mean of the members' probabilities, from one batched forward."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise import catalogue

from ..conftest import lm_batches, make_tiny_llama
from .test_named import _randomize

K = 3
OPTIONS = {"r": 2, "alpha": 4, "targets": ["q_proj", "v_proj", "up_proj"]}
BATCH = lm_batches(n=1, batch=2, seq=7, seed=5)[0]


def _ensemble(seed: int = 0):
    model = rw.lora_ensemble(make_tiny_llama(0), K, seed=seed, **OPTIONS)
    for i, name in enumerate(model.rankwise_ensemble):
        _randomize(model, name, 20 + i)
    return model


def _alone(model, name):
    """The member run by itself: a copy holding only that adapter."""
    alone = copy.deepcopy(model)
    for other in rw.adapter_names(model):
        if other != name:
            rw.delete_adapter(alone, other)
    return alone


def test_members_share_one_base_tensor():
    model = _ensemble()
    assert rw.adapter_names(model) == ["member0", "member1", "member2"]
    by_target: dict[str, set[int]] = {}
    for target, layer in rw.adapter_layers(model):
        by_target.setdefault(target, set()).add(layer.base_layer.weight.data_ptr())
    assert len(by_target) == 2 * 3 and all(len(ptrs) == 1 for ptrs in by_target.values())
    assert sum(p.requires_grad for p in model.parameters()) == K * 2 * len(by_target)  # only A, B of the members


def test_ensemble_probs_are_the_mean_of_the_members_probs_alone():
    model = _ensemble()
    with torch.no_grad():
        got = rw.ensemble_probs(model, BATCH)
        members = [_alone(model, n)(input_ids=BATCH["input_ids"]).logits.softmax(-1) for n in model.rankwise_ensemble]
    torch.testing.assert_close(got, torch.stack(members).mean(0), atol=1e-6, rtol=1e-5)
    # not a single member, and not the softmax of the mean logits
    assert float((got - members[0]).abs().max()) > 1e-4
    with torch.no_grad():
        two = rw.ensemble_probs(model, BATCH, names=["member2", "member0"])
    torch.testing.assert_close(two, (members[0] + members[2]) / 2, atol=1e-6, rtol=1e-5)


def test_members_differ_only_by_seed():
    model = rw.lora_ensemble(make_tiny_llama(0), K, seed=7, **OPTIONS)
    states = [rw.adapter_state(model, n) for n in model.rankwise_ensemble]
    assert [s.config.seed for s in states] == [7, 8, 9]
    configs = [{**vars(s.config), "seed": None} for s in states]
    assert all(c == configs[0] for c in configs)
    for i, name in enumerate(model.rankwise_ensemble):
        single = rw.adapt(make_tiny_llama(0), "lora", seed=7 + i, **OPTIONS)  # the same init, alone
        ref = dict(rw.adapter_layers(single))
        for target, layer in rw.adapter_layers(model, name):
            torch.testing.assert_close(layer.lora_A, ref[target].lora_A, atol=0, rtol=0)
            assert not layer.lora_B.any()
    a0 = dict(rw.adapter_layers(model, "member0"))
    for target, layer in rw.adapter_layers(model, "member1"):
        assert not torch.equal(layer.lora_A, a0[target].lora_A)


def test_one_step_on_the_repeated_batch_is_k_single_member_steps():
    """k · mean loss over the repeated batch = Σ members' losses; each member's gradient comes from its
    own copy only, so one SGD step trains every member as its own step would."""
    together = _ensemble()
    apart = copy.deepcopy(together)
    together.train()
    apart.train()
    params = [p for p in together.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    batch = rw.ensemble_batch(together, BATCH)
    assert batch["input_ids"].shape[0] == K * BATCH["input_ids"].shape[0]
    (K * together(**batch).loss).backward()
    opt.step()
    for name in apart.rankwise_ensemble:
        rw.set_active(apart, name)
        member = [p for p in apart.parameters() if p.requires_grad]
        step = torch.optim.SGD(member, lr=0.5)
        apart(**BATCH).loss.backward()
        step.step()
        step.zero_grad()
    for (n1, p1), (n2, p2) in zip(together.named_parameters(), apart.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5, msg=n1)
    moved = [n for n, p in together.named_parameters() if p.requires_grad]
    assert moved  # the members did train


def test_catalogue_record_builds_the_ensemble():
    record = catalogue.get("lora_ensembles")
    assert record.status == "done" and record.api == "adapt" and record.family == "multi-adapter"
    model = record.build(make_tiny_llama(0), members=2, r=2, targets=["q_proj"])
    assert rw.adapter_names(model) == ["member0", "member1"]


def test_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="members=0"):
        rw.lora_ensemble(make_tiny_llama(0), 0)
    with pytest.raises(ValueError, match="'trainable' are not allowed"):
        rw.lora_ensemble(make_tiny_llama(0), 2, trainable="auto")
    model = rw.lora_ensemble(make_tiny_llama(0), 2, r=2, targets=["q_proj"])
    with pytest.raises(ValueError, match="already has an adapter named 'member0'"):
        rw.lora_ensemble(model, 2)
    with pytest.raises(ValueError, match=r"names=\['nope'\]"):
        rw.ensemble_probs(model, BATCH, names=["nope"])
    with pytest.raises(ValueError, match="one batch size"):
        rw.ensemble_batch(model, {"input_ids": BATCH["input_ids"], "attention_mask": torch.ones(5, 7)})
