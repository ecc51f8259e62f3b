"""Helpers of the compression tests (not a test module): the targeted linears of a model, an independent
truncated-SVD reference, and the check that a compressed model's factor pairs are that truncated SVD."""

from __future__ import annotations

import torch
from torch import nn

import rankwise as rw
from rankwise.compress import FactorizedLinear


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in rw.compression.api.find_targets(model, "all-linear")}


def _truncated(weight: torch.Tensor, r: int) -> torch.Tensor:
    """Independent reference: the rank-r truncated SVD via torch.linalg.svd."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).float()


def _assert_factor_pairs_are_truncated_svd(model: nn.Module, original: dict[str, torch.Tensor]) -> None:
    state = model.rankwise_compress
    for name, r in state.ranks.items():
        if r is None:
            continue
        layer = model.get_submodule(name)
        assert isinstance(layer, FactorizedLinear)
        params = dict(layer.named_parameters())
        w = original[name]
        # exactly two dense factors with inner dimension r (plus the kept bias)
        assert set(params) <= {"U", "V", "bias"} and {"U", "V"} <= set(params)
        assert layer.U.shape == (w.shape[0], r) and layer.V.shape == (r, w.shape[1])
        torch.testing.assert_close(layer.U @ layer.V, _truncated(w, r), atol=2e-5, rtol=1e-4)
