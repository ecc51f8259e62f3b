"""LoRD: the faithful test (one rank fraction, fully trainable exact factors) and the data-aware
(output-covariance) decomposition."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.compress import FactorizedLinear, factorized_layers
from rankwise.compress.lord import lord_compress, output_grams

from ..conftest import lm_batches, make_tiny_llama
from .anisotropic import trained_anisotropic_llama
from .factor_checks import _assert_factor_pairs_are_truncated_svd, _linears


def test_lord_same_rank_fraction_trainable_and_exact_factors():
    model = make_tiny_llama(0)
    for p in model.parameters():
        p.requires_grad_(False)
    original = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    rw.compress(model, "lord", ratio=0.6)
    state = model.rankwise_compress
    _assert_factor_pairs_are_truncated_svd(model, original)
    assert 0.5 < state.kept_fraction <= 0.6
    # one rank fraction κ for all factorized matrices: r = floor(κ·min(out, in))
    fractions = {name: (r, min(original[name].shape)) for name, r in state.ranks.items() if r is not None}
    kappa_lo = max(r / m for r, m in fractions.values())
    kappa_hi = min((r + 1) / m for r, m in fractions.values())
    assert kappa_lo < kappa_hi
    # fully trainable factors: one backward gives every factor a gradient
    for _, layer in factorized_layers(model):
        assert layer.U.requires_grad and layer.V.requires_grad
    batch = lm_batches(1)[0]
    model(**batch).loss.backward()
    assert all(layer.U.grad is not None and layer.V.grad is not None for _, layer in factorized_layers(model))


# ---------------------------------------------------------------------------------------- data-aware
class Proj(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.proj.weight.copy_(weight)
            self.proj.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _proj_case(x: torch.Tensor, rank: int = 4) -> dict:
    """Compress one 24×16 linear at ``rank`` data-free and data-aware on inputs ``x`` (n×16)."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    calibration = list(x.view(4, -1, 16).split(1))  # 4 batches of shape [1, n/4, 16]
    free, aware = Proj(weight, bias), Proj(weight, bias)
    grams = output_grams(aware, {"proj": aware.proj}, calibration)
    lord_compress(free, 0.5, ["proj"], rank=rank)
    lord_compress(aware, 0.5, ["proj"], rank=rank, calibration=calibration)
    y = x.double() @ weight.double().T

    def error(model: Proj) -> float:
        layer = model.proj
        assert isinstance(layer, FactorizedLinear) and layer.U.shape == (24, rank)
        torch.testing.assert_close(layer.bias, bias)  # the bias stays
        product = (layer.U @ layer.V).detach().double()
        return float(torch.linalg.norm(y - x.double() @ product.T))

    return {"free": free, "aware": aware, "weight": weight, "y": y, "gram": grams["proj"],
            "err_free": error(free), "err_aware": error(aware)}


def test_lord_data_aware_factors_minimize_output_error_on_anisotropic_inputs():
    g = torch.Generator().manual_seed(1)
    scales = torch.logspace(1, -2, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    x = (torch.randn(200, 16, generator=g) * scales) @ rotation  # strongly anisotropic inputs
    case = _proj_case(x, rank=4)
    y = case["y"]
    # the hook saw exactly the outputs W x (bias removed), summed over all calibration tokens
    torch.testing.assert_close(case["gram"], y.T @ y, rtol=1e-4, atol=1e-3)  # fp32 forward
    layer = case["aware"].proj
    assert torch.linalg.matrix_rank(layer.U.double() @ layer.V.double()) == 4
    # Eckart–Young on Y: the error is exactly the energy of Y outside its top-4 principal directions
    tail = torch.linalg.eigvalsh(y.T @ y)[:-4].sum().sqrt()
    assert case["err_aware"] == pytest.approx(float(tail), rel=1e-4)
    assert case["err_aware"] < 0.5 * case["err_free"]  # strictly better than the weight SVD here


def test_lord_data_aware_equals_svd_on_isotropic_inputs():
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(200, 16, generator=g))
    x = q * 200**0.5  # XᵀX = n·I exactly (whitened)
    case = _proj_case(x, rank=4)
    assert case["err_aware"] == pytest.approx(case["err_free"], rel=1e-4)
    aware, free = case["aware"].proj, case["free"].proj
    torch.testing.assert_close(aware.U @ aware.V, free.U @ free.V, atol=1e-4, rtol=1e-4)


def _loss(model: nn.Module, batches: list[dict]) -> float:
    return sum(model(**b).loss.item() for b in batches) / len(batches)


def test_lord_data_aware_whole_model_beats_data_free_in_one_pass():
    base, data = trained_anisotropic_llama(epochs=5)
    calibration = data[:4]
    free, aware = copy.deepcopy(base), copy.deepcopy(base)
    calls = []
    aware.register_forward_hook(lambda *args: calls.append(1))
    ranks_free = lord_compress(free, 0.5)
    ranks_aware = lord_compress(aware, 0.5, calibration=calibration)
    assert ranks_free == ranks_aware and any(r is not None for r in ranks_aware.values())
    assert len(calls) == len(calibration)  # one forward pass over the calibration batches
    assert not any(m._forward_hooks for m in aware.model.modules())  # hooks removed
    assert all(p.requires_grad for n, p in aware.named_parameters() if n.endswith((".U", ".V")))
    assert _loss(aware, calibration) < _loss(free, calibration) - 0.05
    # the same through rw.compress: data= makes lord data-aware and the report says so
    via_api = rw.compress(copy.deepcopy(base), "lord", ratio=0.5, data=calibration)
    assert via_api.rankwise_compress.details["decomposition"] == "output-covariance"
    assert _loss(via_api, calibration) == pytest.approx(_loss(aware, calibration), abs=1e-5)
    assert rw.compress(copy.deepcopy(base), "lord", ratio=0.5).rankwise_compress.details["decomposition"] == "svd"


def test_lord_data_aware_bad_calibration():
    with pytest.raises(ValueError, match="calibration yielded no batch"):
        lord_compress(make_tiny_llama(0), 0.5, calibration=[])
