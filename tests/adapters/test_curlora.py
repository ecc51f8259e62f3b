"""CURLoRA: C and R are actual columns / rows of W₀ drawn with the inverted-probability rule (the plain
rule picks different ones, low-norm columns come up more often), only U trains, ΔW = 0 at init."""

from __future__ import annotations

import torch
from torch import nn

from rankwise.adapters.curlora import CURLoRAConfig, CURLoRALayer
from rankwise.adapters.init import InitContext
from rankwise.rng import layer_generator


def _weight(d: int = 40, k: int = 64) -> torch.Tensor:
    """Columns and rows with norms spread over two orders of magnitude."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(d, k, generator=g) * torch.logspace(-1, 1, k) * torch.logspace(0, 1, d).unsqueeze(1)


def _layer(w: torch.Tensor, **config) -> CURLoRALayer:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return CURLoRALayer(lin, CURLoRAConfig(**config), InitContext(name="layers.3.v"))


def _draw(w: torch.Tensor, r: int, seed: int, invert: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's rule written out: p_j = ‖W[:, j]‖²/‖W‖²_F, p̃ ∝ 1/p (or p itself), columns then rows."""
    g = layer_generator(seed, "layers.3.v")
    total = w.double().pow(2).sum()
    p_col, p_row = w.double().pow(2).sum(0) / total, w.double().pow(2).sum(1) / total
    if invert:
        p_col, p_row = 1 / p_col, 1 / p_row
    cols = torch.multinomial(p_col / p_col.sum(), r, replacement=True, generator=g)
    rows = torch.multinomial(p_row / p_row.sum(), r, replacement=True, generator=g)
    return cols, rows


def test_c_and_r_are_columns_and_rows_of_w0_picked_by_inverted_probabilities():
    w = _weight()
    r = 8
    layer = _layer(w, r=r, seed=2)
    cols, rows = _draw(w, r, seed=2, invert=True)
    assert torch.equal(layer.cur_C, w[:, cols]) and torch.equal(layer.cur_R, w[rows, :])
    plain_cols, plain_rows = _draw(w, r, seed=2, invert=False)
    assert not torch.equal(layer.cur_C, w[:, plain_cols]) and not torch.equal(layer.cur_R, w[plain_rows, :])
    # the inverted rule favours low-norm columns: over many draws, the picked columns' mean norm is low
    picks = torch.cat([_draw(w, r, seed=s, invert=True)[0] for s in range(20)])
    plain = torch.cat([_draw(w, r, seed=s, invert=False)[0] for s in range(20)])
    norms = w.norm(dim=0)
    assert norms[picks].mean() < norms.mean() < norms[plain].mean()


def test_only_u_trains_and_starts_at_zero():
    w = _weight()
    layer = _layer(w, r=4, alpha=2.0)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["cur_U"]
    assert layer.trainable_count() == 16 and torch.count_nonzero(layer.cur_U) == 0
    assert torch.count_nonzero(layer.delta_weight()) == 0
    x = torch.randn(5, 64)
    layer(x).square().sum().backward()
    assert layer.cur_U.grad.abs().max() > 0
    assert all(not t.requires_grad for t in layer.buffers())
    with torch.no_grad():
        layer.cur_U.normal_()
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.cur_C @ layer.cur_U @ layer.cur_R)
    b, a, s = layer.factors()
    torch.testing.assert_close(b @ a * s, layer.delta_weight())


def test_eps_softens_the_inversion():
    w = _weight()
    assert not torch.equal(_layer(w, r=8, eps=1e-3).cur_C, _layer(w, r=8).cur_C)
