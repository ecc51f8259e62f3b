"""DoTA / QDoTA (Hu et al. 2024): trainable MPO cores initialised by the TT-SVD of W₀ at bond dimension r,
frozen residual W_res = W₀ − MPO(W₀) (4-bit for QDoTA)."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.linalg import factor_shape, mpo_bond_dims, mpo_contract, mpo_decompose
from rankwise.quant import dequantize

from ..conftest import lm_batches, make_tiny_llama, require_bnb_narrow_rows
from .peft_pairs import check_round_trip

LAYER = "model.layers.0.mlp.gate_proj"  # 64 x 32


def _w(out: int = 32, inp: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _error(w: torch.Tensor, out_shape, in_shape, bond: int | None) -> float:
    cores, _ = mpo_decompose(w, out_shape, in_shape, bond)
    return float((mpo_contract(cores) - w).norm())


def test_two_cores_truncate_like_the_svd_of_the_reshuffled_matrix():
    """With two cores, MPO(W) at bond D is the best rank-D approximation of W reshuffled to
    (o₁i₁) × (o₂i₂): its error is the Eckart–Young tail of that matrix's singular values."""
    w, (o1, o2), (i1, i2) = _w(), (4, 8), (8, 8)
    reshuffled = w.reshape(o1, o2, i1, i2).permute(0, 2, 1, 3).reshape(o1 * i1, o2 * i2)
    s = torch.linalg.svdvals(reshuffled)
    for bond in (1, 3, 8, 20):
        cores, bound = mpo_decompose(w, (o1, o2), (i1, i2), bond)
        tail = float(s[bond:].square().sum().sqrt())
        assert [c.shape for c in cores] == [(1, o1, i1, bond), (bond, o2, i2, 1)]
        assert _error(w, (o1, o2), (i1, i2), bond) == pytest.approx(tail, rel=1e-4)
        assert bound == pytest.approx(tail, rel=1e-4)


def test_full_bond_is_exact_and_the_error_grows_as_the_bond_shrinks():
    w = _w()
    out_shape, in_shape = factor_shape(32, 3), factor_shape(64, 3)
    full = max(mpo_bond_dims(out_shape, in_shape, None))
    assert _error(w, out_shape, in_shape, None) < 1e-4 * float(w.norm())
    assert _error(w, out_shape, in_shape, full) < 1e-4 * float(w.norm())
    errors = [_error(w, out_shape, in_shape, bond) for bond in range(1, full + 1)]
    assert all(a > b for a, b in zip(errors[:-1], errors[1:], strict=True)), errors
    for bond in (1, 2, 4, 8):  # within the TT-SVD bound √(Σ discarded σ²)
        assert _error(w, out_shape, in_shape, bond) <= mpo_decompose(w, out_shape, in_shape, bond)[1] * (1 + 1e-5)


def test_layer_cores_are_the_mpo_of_w0_and_the_model_starts_at_w0():
    base, data = make_tiny_llama(), lm_batches(n=1)
    w0 = base.get_submodule(LAYER).weight.detach().clone()
    model = rw.adapt(copy.deepcopy(base), "dota", r=4, cores=3)
    layer = model.get_submodule(LAYER)
    out_shape, in_shape = factor_shape(64, 3), factor_shape(32, 3)
    expected, _ = mpo_decompose(w0, out_shape, in_shape, 4)
    for core, init, ref in zip(layer.cores(), layer.init_cores(), expected, strict=True):
        torch.testing.assert_close(core.detach(), ref)
        torch.testing.assert_close(init, ref)
    torch.testing.assert_close(layer.base_layer.weight, w0 - mpo_contract(expected), atol=1e-6, rtol=0)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {f"dota_core_{k}" for k in range(3)}
    assert layer.trainable_count() == sum(c.numel() for c in expected)
    assert layer.factors() is None  # a tensor product, not B·A: no PEFT export
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0]).logits, base(**data[0]).logits, atol=1e-5, rtol=0)


def test_save_load_round_trip_and_no_peft_export(tmp_path):
    base, data = make_tiny_llama(), lm_batches(n=1)
    model = rw.adapt(copy.deepcopy(base), "dota", r=3)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.dota_core_1.mul_(1.5)
    expected = check_round_trip(model, base, data[0], tmp_path, peft_export=False)
    assert (expected - base(**data[0]).logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="dota"):
        rw.export_peft(model, tmp_path / "peft")
    merged = rw.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(**data[0]).logits, expected, atol=1e-5, rtol=0)


def test_qdota_stores_the_residual_in_4_bit_and_reloads_it(tmp_path):
    require_bnb_narrow_rows()
    base, data = make_tiny_llama(), lm_batches(n=1)
    w0 = base.get_submodule(LAYER).weight.detach().clone()
    model = rw.adapt(copy.deepcopy(base), "dota", r=4, quant_type="nf4")
    layer = model.get_submodule(LAYER)
    assert layer.base_quantized and not layer.identity_at_init
    w_res = w0 - mpo_contract(layer.init_cores())
    stored = dequantize(layer.base_layer).float()
    assert float((stored - w_res).norm() / w_res.norm()) < 0.12  # 4-bit NF4 of W_res (not of W₀)
    assert all(c.dtype == torch.float32 and c.requires_grad for c in layer.cores())
    with torch.no_grad():
        drift = (model(**data[0]).logits - base(**data[0]).logits).abs().max()
    assert 0 < drift < 0.1  # W₀ up to the 4-bit error of the residual
    check_round_trip(model, base, data[0], tmp_path, peft_export=False)


def test_dota_over_a_quantized_base_writes_the_residual_back_in_4_bit():
    require_bnb_narrow_rows()
    base = rw.quantize(make_tiny_llama())
    before = dequantize(base.get_submodule(LAYER)).float()
    layer = rw.adapt(base, "dota", r=4).get_submodule(LAYER)
    residual = before - mpo_contract(layer.init_cores())
    after = dequantize(layer.base_layer).float()
    assert float((after - residual).norm() / residual.norm()) < 0.12
