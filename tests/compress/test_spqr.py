"""SpQR (Dettmers et al. 2024): the dequantized weight is exactly the group-quantized dense part plus the
sparse fp16 outliers; outliers are chosen by Hessian-aware sensitivity (not magnitude); GPTQ error
feedback beats round-to-nearest on the same grid; the bits-per-parameter formula is the stored size."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.compress.spqr import SpQRConfig, fake_quant, group_stats, spqr_quantize

from .anisotropic import trained_anisotropic_llama


def _problem(seed: int = 0, rows: int = 48, cols: int = 64, tokens: int = 512):
    """Anisotropic correlated inputs and a weight with a few large entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, cols, dtype=torch.float64)
    x = x @ (torch.eye(cols, dtype=torch.float64) + 0.3 * torch.randn(cols, cols, generator=g, dtype=torch.float64))
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    w[torch.rand(rows, cols, generator=g) < 0.02] *= 8
    return w, x


def _rtn(w: torch.Tensor, cfg: SpQRConfig) -> torch.Tensor:
    """Round-to-nearest on SpQR's own grid (same groups, same quantized statistics), no error feedback."""
    out = torch.empty_like(w)
    for j in range(0, w.shape[1], cfg.group_size):
        scale, zero = group_stats(w[:, j:j + cfg.group_size], cfg)
        out[:, j:j + cfg.group_size] = fake_quant(w[:, j:j + cfg.group_size], scale, zero, cfg.bits)[0]
    return out


def _output_error(w, w_hat, x):
    return float((x @ (w - w_hat).T).norm() / (x @ w.T).norm())


def test_dequantized_is_dense_plus_sparse_fp16_outliers():
    w, x = _problem()
    cfg = SpQRConfig()
    res = spqr_quantize(w, x.T @ x, cfg)
    outliers = res.outliers.to_dense()
    assert res.outliers.dtype == torch.float16 and res.outliers.is_sparse
    assert 0 < res.outlier_fraction < 0.05
    torch.testing.assert_close(res.dequantized(), res.dense + outliers.double(), rtol=0, atol=0)
    mask = outliers != 0
    assert torch.all(res.dense[mask] == 0)
    # every (row, group) of the dense part lies on a 2^bits-level grid
    for j in range(0, w.shape[1], cfg.group_size):
        for row in range(w.shape[0]):
            keep = ~mask[row, j:j + cfg.group_size]
            assert res.dense[row, j:j + cfg.group_size][keep].unique().numel() <= 2**cfg.bits
    assert int(res.codes.max()) <= 2**cfg.bits - 1


def test_scales_and_zeros_are_quantized_in_groups_of_rows():
    """The second level: each group of ``stat_group`` rows shares a 2^stat_bits-level grid of scales and of zeros."""
    w, _ = _problem(4, rows=64)
    cfg = SpQRConfig(stat_bits=2, stat_group=16)
    scale, zero = group_stats(w[:, :16], cfg)
    for stat in (scale, zero):
        assert all(len(set(stat[r:r + 16].tolist())) <= 4 for r in range(0, 64, 16))
        assert len(set(stat.tolist())) > 4


def test_outliers_follow_hessian_sensitivity_not_magnitude():
    """Columns 0..15 (one group) see almost no input and hold the largest weights (3x the others): their
    quantization error barely moves the output, so SpQR keeps no outlier there, only in the active columns."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g, dtype=torch.float64)
    x[:, :16] *= 1e-3
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    w[:, :16] *= 3
    res = spqr_quantize(w, x.T @ x, SpQRConfig())
    picked = res.outliers.to_dense() != 0
    assert picked[:, 16:].sum() > 20
    assert picked[:, :16].sum() == 0


def test_error_feedback_and_outliers_beat_round_to_nearest():
    w, x = _problem(2)
    no_outliers = SpQRConfig(threshold=None)
    rtn = _output_error(w, _rtn(w, no_outliers), x)
    gptq = _output_error(w, spqr_quantize(w, x.T @ x, no_outliers).dequantized(), x)
    full = _output_error(w, spqr_quantize(w, x.T @ x, SpQRConfig()).dequantized(), x)
    assert gptq < 0.7 * rtn  # the same grid and statistics: only the error feedback differs
    assert full < 0.8 * gptq  # outliers help further


@pytest.mark.parametrize("bits,group", [(3, 16), (4, 8)])
def test_bits_per_param_is_the_stored_size(bits, group):
    w, x = _problem(3, rows=40)
    cfg = SpQRConfig(bits=bits, group_size=group, stat_group=16)
    res = spqr_quantize(w, x.T @ x, cfg)
    rows, cols = w.shape
    groups = rows * cols // group  # one (scale, zero) pair per row and group
    second = 2 * 2 * 16 * -(-rows // cfg.stat_group) * (cols // group)  # 16-bit scale+zero of scales and zeros
    stored = bits * w.numel() + 2 * cfg.stat_bits * groups + second + 32 * res.outliers._nnz()
    assert rows % cfg.stat_group != 0  # a partial last group of statistics, counted whole
    assert abs(stored / w.numel() - cfg.bits_per_param(res.outlier_fraction)) < 2 * 32 / (group * 16) / rows * 16
    assert cfg.bits_per_param(0.0) == bits + 2 * 3 / group + 64 / (group * 16)


def test_compress_model_beats_rtn_and_reports_bits():
    model, data = trained_anisotropic_llama(epochs=3)
    reference = [model(**b).logits for b in data[:2]]
    quantized = rw.compress(copy.deepcopy(model), "spqr", data=data[:4])
    state = quantized.rankwise_compress
    frac = state.details["outlier_fraction"]
    assert 0 < frac < 0.05
    assert state.details["bits_per_param"] == pytest.approx(SpQRConfig().bits_per_param(frac))
    assert state.kept_fraction == 1.0
    rtn = copy.deepcopy(model)
    with torch.no_grad():
        for name in state.targets:
            lin = rtn.get_submodule(name)
            lin.weight.copy_(_rtn(lin.weight.double(), SpQRConfig()).float())
    with torch.no_grad():
        err = sum(float((quantized(**b).logits - r).norm()) for b, r in zip(data[:2], reference, strict=True))
        err_rtn = sum(float((rtn(**b).logits - r).norm()) for b, r in zip(data[:2], reference, strict=True))
    assert err < 0.7 * err_rtn


def test_bad_config():
    with pytest.raises(ValueError, match="bits=9"):
        SpQRConfig(bits=9)
    with pytest.raises(ValueError, match="threshold=-1"):
        SpQRConfig(threshold=-1)
    with pytest.raises(ValueError, match="spqr needs data"):
        rw.compress(trained_anisotropic_llama(0)[0], "spqr")
