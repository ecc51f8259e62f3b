"""LoRI: frozen per-adapter random A, B trained under a sparse magnitude mask (Zhang et al. 2025)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.lori import LoRILayer

from ..conftest import lm_batches, make_tiny_llama

RANK = 4


def _train(model, steps: int = 3, lr: float = 1e-2, weight_decay: float = 0.1) -> None:
    """A few AdamW steps (momentum and decoupled weight decay) on the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    for batch in lm_batches(n=steps, batch=2, seq=8, seed=5):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()


def _lori(model, name: str):
    return [layer for _, layer in rw.adapter_layers(model, name)]


def test_a_is_frozen_and_bit_identical_after_both_stages():
    model = rw.adapt(make_tiny_llama(0), "lori", r=RANK)
    a0 = {id(layer): layer.lori_A.clone() for layer in _lori(model, "default")}
    b0 = {id(layer): layer.lori_B.detach().clone() for layer in _lori(model, "default")}
    _train(model)  # LoRI-D
    rw.lori_masks(model, 0.2)
    _train(model)  # LoRI-S
    for layer in _lori(model, "default"):
        assert torch.equal(layer.lori_A, a0[id(layer)])
        assert not layer.lori_A.requires_grad
        assert not torch.equal(layer.lori_B.detach(), b0[id(layer)])
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lori_B"}


@pytest.mark.parametrize("scope", ["model", "matrix"])
def test_mask_keeps_exactly_the_largest_entries_and_b_stays_inside_it(scope):
    model = rw.adapt(make_tiny_llama(0), "lori", r=RANK)
    _train(model)  # LoRI-D: dense calibration of B
    layers = _lori(model, "default")
    dense = [layer.lori_B.detach().abs().clone() for layer in layers]
    density = 0.1
    masks = rw.lori_masks(model, density, scope=scope)
    assert len(masks) == len(layers)
    total = sum(d.numel() for d in dense)
    if scope == "model":  # one threshold over the whole adapter: exactly ⌈density·n⌉ kept, all larger than the rest
        assert sum(int(layer.lori_mask.sum()) for layer in layers) == math.ceil(density * total)
        kept = torch.cat([d[layer.lori_mask] for d, layer in zip(dense, layers, strict=True)])
        dropped = torch.cat([d[~layer.lori_mask] for d, layer in zip(dense, layers, strict=True)])
        assert kept.min() >= dropped.max()
    else:
        for d, layer in zip(dense, layers, strict=True):
            assert int(layer.lori_mask.sum()) == math.ceil(density * d.numel())
            assert d[layer.lori_mask].min() >= d[~layer.lori_mask].max()
    assert all(torch.count_nonzero(layer.lori_B) == 0 for layer in layers)  # restarted (LoRI-S)
    _train(model, steps=4)  # AdamW: momentum and weight decay
    for layer in layers:
        nonzero = layer.lori_B.detach() != 0
        assert torch.equal(nonzero, layer.lori_mask)  # every kept entry trained, none outside the mask
        assert layer.mask_count() == int(nonzero.sum())


def test_restart_false_keeps_the_kept_values_and_the_output_follows_the_mask():
    model = rw.adapt(make_tiny_llama(0), "lori", r=RANK)
    _train(model)
    before = {id(layer): layer.lori_B.detach().clone() for layer in _lori(model, "default")}
    rw.lori_masks(model, 0.5, restart=False)
    for layer in _lori(model, "default"):
        torch.testing.assert_close(layer.lori_B.detach(), before[id(layer)] * layer.lori_mask, atol=0, rtol=0)
        b, a, s = layer.factors()
        torch.testing.assert_close(layer.delta_weight(), s * (before[id(layer)] * layer.lori_mask) @ a)
    rw.lori_masks(model, 0.5)  # the paper's restart: B = 0, the model is the base again
    ids = lm_batches(n=1, batch=2, seq=8)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, make_tiny_llama(0)(input_ids=ids).logits)


class _Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4096, 16)

    def forward(self, x):
        return self.proj(x)


def test_two_adapters_have_nearly_orthogonal_random_projections():
    model = _Wide()
    rw.adapt(model, "lori", targets=["proj"], r=8, name="math")
    rw.adapt(model, "lori", targets=["proj"], r=8, name="code")
    (a1,), (a2,) = ([layer.lori_A for layer in _lori(model, n)] for n in ("math", "code"))
    cross = (a1 @ a2.T) / (a1.norm(dim=1, keepdim=True) * a2.norm(dim=1)[None, :])
    assert cross.abs().max() < 0.1  # ~1/√4096 each; identical projections would give 1 on the diagonal
    # deterministic: the same name and seed give the same projection
    again = rw.adapt(_Wide(), "lori", targets=["proj"], r=8, name="math")
    assert torch.equal(_lori(again, "math")[0].lori_A, a1)


def test_save_load_keeps_a_and_the_mask_under_another_name(tmp_path):
    model = rw.adapt(make_tiny_llama(0), "lori", r=RANK, name="math")
    _train(model)
    rw.lori_masks(model, 0.3, restart=False)
    rw.save_adapter(model, tmp_path / "a")
    back = rw.load_adapter(make_tiny_llama(0), tmp_path / "a", name="other")
    for old, new in zip(_lori(model, "math"), _lori(back, "other"), strict=True):
        assert torch.equal(old.lori_A, new.lori_A) and torch.equal(old.lori_mask, new.lori_mask)
    ids = lm_batches(n=1, batch=2, seq=8)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_peft_export_of_a_masked_adapter_reproduces_the_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = rw.adapt(make_tiny_llama(0), "lori", r=RANK, alpha=8)
    _train(model)
    rw.lori_masks(model, 0.25, restart=False)
    rw.export_peft(model, tmp_path / "p")
    loaded = peft.PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / "p").eval()
    ids = lm_batches(n=1, batch=2, seq=8)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_bad_input_names_the_parameter():
    model = rw.adapt(make_tiny_llama(0), "lori", r=RANK)
    with pytest.raises(ValueError, match="density"):
        rw.lori_masks(model, 0.0)
    with pytest.raises(ValueError, match="density"):
        rw.lori_masks(model, 1.5)
    with pytest.raises(ValueError, match="scope"):
        rw.lori_masks(model, 0.5, scope="row")
    rw.merge(model)
    with pytest.raises(ValueError, match="is merged"):
        rw.lori_masks(model, 0.5)
    rw.unmerge(model)
    rw.adapt(model, "lora", r=RANK, name="plain")
    with pytest.raises(ValueError, match="needs a 'lori' adapter"):
        rw.lori_masks(model, 0.5, name="plain")
    with pytest.raises(ValueError, match="alpha"):
        rw.adapt(make_tiny_llama(0), "lori", r=RANK, alpha=-1)
    assert isinstance(_lori(model, "default")[0], LoRILayer)
