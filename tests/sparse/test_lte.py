"""LTE (LoRA-the-Explorer): each head sees only its chunk, merges add the mean of the heads' updates,
and the reset-less forward makes one head follow plain LoRA exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.sparse import LTE, LTELinear

from ..conftest import lm_batches, make_tiny_llama


def layer(heads: int = 3, rank: int = 2, seed: int = 0) -> LTELinear:
    torch.manual_seed(seed)
    lin = nn.Linear(6, 5)
    lte = LTELinear(lin, heads, rank, alpha=4.0, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        lte.lora_B.normal_()
    return lte


def test_each_head_sees_only_its_chunk_of_the_batch():
    lte = layer()
    x = torch.randn(6, 4, 6)  # 3 heads × 2 rows
    lte(x).pow(2).sum().backward()
    grads = lte.lora_A.grad.clone(), lte.lora_B.grad.clone()
    lte.zero_grad()
    x2 = x.clone()
    x2[2:4] += torch.randn(2, 4, 6)  # change head 1's chunk only
    y1, y2 = lte(x), lte(x2)
    torch.testing.assert_close(y1[[0, 1, 4, 5]], y2[[0, 1, 4, 5]])
    y2.pow(2).sum().backward()
    for g_before, g_after in zip(grads, (lte.lora_A.grad, lte.lora_B.grad), strict=True):
        torch.testing.assert_close(g_after[[0, 2]], g_before[[0, 2]])  # heads 0 and 2: untouched
        assert not torch.allclose(g_after[1], g_before[1])
    # head h's rows: W x + s·B_h A_h x (nothing merged yet)
    with torch.no_grad():
        h1 = x[2:4] @ (lte.weight + lte.scale * lte.lora_B[1] @ lte.lora_A[1]).T + lte.bias
    torch.testing.assert_close(y1[2:4], h1)
    with pytest.raises(ValueError, match="heads=3"):
        lte(torch.randn(4, 6))


def test_merge_adds_the_mean_of_the_heads_updates_since_the_last_merge():
    lte = layer()
    w0 = lte.weight.detach().clone()
    b_first, a_first = lte.lora_B.detach().clone(), lte.lora_A.detach().clone()
    lte.merge_()
    s = lte.scale
    torch.testing.assert_close(lte.weight, w0 + s * torch.stack([b_first[h] @ a_first[h] for h in range(3)]).mean(0))
    with torch.no_grad():  # the heads train on (not reset); the next merge adds only what changed
        lte.lora_B.add_(torch.randn_like(lte.lora_B))
        lte.lora_A.add_(torch.randn_like(lte.lora_A))
    w1 = lte.weight.detach().clone()
    lte.merge_()
    change = torch.stack([lte.lora_B[h] @ lte.lora_A[h] - b_first[h] @ a_first[h] for h in range(3)]).mean(0)
    torch.testing.assert_close(lte.weight, w1 + s * change)
    # right after a merge every head's training output is the shared layer's: W' x
    x = torch.randn(6, 6)
    torch.testing.assert_close(lte(x), nn.functional.linear(x, lte.weight, lte.bias))
    with torch.no_grad():  # outside training the layer is the last merge only, whatever the heads hold
        lte.lora_B.add_(1.0)
    lte.eval()
    assert lte.pending_delta().abs().max() > 0.1
    torch.testing.assert_close(lte(x), nn.functional.linear(x, lte.weight, lte.bias))


def test_one_head_reset_less_follows_plain_lora_at_any_merge_interval():
    """With H = 1 the shared weight plus the unmerged part is always W₀ + s·B A: LTE trains exactly
    what LoRA trains, whatever the merge interval (the subtraction of the merged factors is what makes
    this hold)."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    lte = LTELinear(copy.deepcopy(lin), 1, 2, alpha=4.0, generator=torch.Generator().manual_seed(1))
    a, b = nn.Parameter(lte.lora_A[0].detach().clone()), nn.Parameter(lte.lora_B[0].detach().clone())
    opt_lte = torch.optim.SGD([lte.lora_A, lte.lora_B], lr=0.05)
    opt_lora = torch.optim.SGD([a, b], lr=0.05)
    ctl = LTE(nn.Sequential(lte), merge_every=3)
    g = torch.Generator().manual_seed(2)
    for _ in range(8):
        x, t = torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)
        (lte(x) - t).pow(2).mean().backward()
        (nn.functional.linear(x, lin.weight + lte.scale * b @ a, lin.bias) - t).pow(2).mean().backward()
        opt_lte.step(), opt_lora.step(), opt_lte.zero_grad(), opt_lora.zero_grad()
        ctl.step()
    ctl.merge()
    torch.testing.assert_close(lte.weight, lin.weight + lte.scale * b @ a, atol=1e-6, rtol=1e-6)


def test_controller_merges_every_t_steps_and_at_the_end_and_resumes(tmp_path):
    model = rw.sparsify(make_tiny_llama(), "lte", heads=2, rank=2)
    layers = [m for m in model.modules() if isinstance(m, LTELinear)]
    assert len(layers) == 14 and all(not m.weight.requires_grad for m in layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ctl = LTE(model, merge_every=2)
    w0 = layers[0].weight.detach().clone()
    for i, batch in enumerate(lm_batches(n=3, batch=2, seq=8)):
        model(**batch).loss.backward()
        opt.step(), opt.zero_grad()
        w_before = layers[0].weight.detach().clone()
        merged = ctl.step()
        assert merged == (i == 1)
        assert torch.equal(layers[0].weight, w_before) != merged
    assert not torch.equal(layers[0].weight, w0)
    assert layers[0].pending_delta().abs().max() > 0
    ctl.on_train_end(None)
    assert layers[0].pending_delta().abs().max() < 1e-6
    state = ctl.state_dict()
    other = LTE(model, merge_every=2)
    other.load_state_dict(state)
    assert other.steps == 3


def test_bad_input():
    with pytest.raises(ValueError, match="heads"):
        rw.sparsify(make_tiny_llama(), "lte", heads=0)
    with pytest.raises(ValueError, match="merge_every"):
        LTE(rw.sparsify(make_tiny_llama(), "lte", heads=2, rank=2), merge_every=0)
    with pytest.raises(ValueError, match="no LTE layers"):
        LTE(make_tiny_llama())
