"""HRA: W′ = W₀·H with H a chain of Householder reflections (orthogonal), parity with PEFT 0.21.2."""

from __future__ import annotations

import peft
import pytest
import torch

import rankwise as rw

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import TARGETS, _close, _pair, _peft_layer, _train, check_peft_parity


def _chain(u: torch.Tensor, gram_schmidt: bool) -> torch.Tensor:
    """H = Π (I − 2ûᵢûᵢᵀ) applied reflection by reflection (or after classical Gram-Schmidt of the uᵢ)."""
    u = u.double()
    if gram_schmidt:
        basis: list[torch.Tensor] = []
        for i in range(u.shape[1]):
            v = u[:, i] - sum((q @ u[:, i]) * q for q in basis) if basis else u[:, i]
            basis.append(v / v.norm())
        u = torch.stack(basis, dim=1)
    h = torch.eye(u.shape[0], dtype=u.dtype)
    for i in range(u.shape[1]):
        v = (u[:, i] / u[:, i].norm()).unsqueeze(1)
        h = h @ (torch.eye(u.shape[0], dtype=u.dtype) - 2 * v @ v.t())
    return h


@pytest.mark.parametrize("apply_gs", [False, True], ids=["chain", "gram-schmidt"])
def test_hra_is_an_orthogonal_rank_r_change_of_w0(apply_gs):
    r = 4
    model = rw.adapt(make_tiny_llama(0), "hra", r=r, apply_GS=apply_gs)
    _train(model, steps=3)
    for _, layer in rw.adapter_layers(model):
        w0 = layer.base_weight.detach().double()
        h = _chain(layer.hra_u.detach(), apply_gs)
        _close(h.t() @ h, torch.eye(layer.in_features, dtype=h.dtype), atol=1e-10)
        delta = layer.delta_weight().detach().double()
        _close(w0 + delta, w0 @ h, atol=1e-6)  # W′ = W₀H, on the input side
        _close(torch.linalg.svdvals(w0 + delta), torch.linalg.svdvals(w0), atol=1e-5)
        assert torch.linalg.matrix_rank(delta, atol=1e-6) <= r
        assert delta.abs().max() > 1e-3


def test_hra_symmetric_init_starts_at_the_base_and_needs_an_even_r():
    model = rw.adapt(make_tiny_llama(0), "hra", r=4)
    u = rw.adapter_layers(model)[0][1].hra_u
    assert torch.equal(u[:, 0], u[:, 1]) and torch.equal(u[:, 2], u[:, 3]) and not torch.equal(u[:, 0], u[:, 2])
    batch = lm_batches()[0]
    _close(model(**batch).logits, make_tiny_llama(0)(**batch).logits, atol=1e-6)
    with pytest.raises(ValueError, match="r=3 must be even with symmetric_init=True"):
        rw.adapt(make_tiny_llama(0), "hra", r=3)
    assert not rw.adapter_layers(rw.adapt(make_tiny_llama(0), "hra", r=3, symmetric_init=False))[0][1].identity_at_init


@pytest.mark.parametrize("apply_gs", [False, True], ids=["chain", "gram-schmidt"])
def test_hra_matches_peft(apply_gs):
    cfg = peft.HRAConfig(r=4, target_modules=TARGETS, apply_GS=apply_gs, init_weights=False)
    pm, mine = _pair(cfg, "hra", r=4, apply_GS=apply_gs, symmetric_init=False)
    pairs = []
    with torch.no_grad():
        for name, layer in rw.adapter_layers(mine):
            pu = _peft_layer(pm, name).hra_u["default"]
            layer.hra_u.copy_(pu)
            pairs.append((layer.hra_u, pu))
            w0 = layer.base_weight
            _close(w0 + layer.delta_weight(), w0 @ _peft_layer(pm, name).get_delta_weight("default"), atol=1e-6)
    batch = lm_batches()[2]
    check_peft_parity(pm, mine, pairs, batch)
