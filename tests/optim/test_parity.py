"""Parity with the reference implementations galore-torch and apollo-torch (same inputs, same numbers)."""

from __future__ import annotations

import warnings

import apollo_torch
import galore_torch
import pytest
import torch
from torch import nn

import rankwise as rw

STEPS = 20


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # weights 48×32 (right projection under std), 24×48 and 10×24 (left projection)
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 24), nn.Tanh(), nn.Linear(24, 10))


def _groups(model: nn.Module, **proj_keys) -> list[dict]:
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    biases = [m.bias for m in model if isinstance(m, nn.Linear)]
    return [{"params": weights, **proj_keys}, {"params": biases}]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = STEPS) -> None:
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g)
        y = torch.randn(16, 10, generator=g)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()


def _assert_close(ours: nn.Module, ref: nn.Module, start: nn.Module, tol: float = 1e-5) -> None:
    moved = False
    for (name, a), b, s in zip(ours.named_parameters(), ref.parameters(), start.parameters(), strict=True):
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel <= tol, f"{name}: relative difference {rel:.2e}"
        moved |= not torch.equal(b, s)
    assert moved  # the reference actually trained


@pytest.mark.parametrize("proj_side", ["std", "reverse_std", "right", "left"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_galore_adamw_matches_galore_torch(proj_side, weight_decay):
    start, ours, ref = _mlp(), _mlp(), _mlp()
    keys = {"rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": proj_side}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref_opt = galore_torch.GaLoreAdamW(_groups(ref, **keys), lr=1e-2, weight_decay=weight_decay)
    # the exact SVD (galore-torch's numerics); the default is the fast randomized projector
    our_opt = rw.optim.GaLoreAdamW(_groups(ours, **keys), lr=1e-2, weight_decay=weight_decay, projector="svd")
    _train(ref, ref_opt)
    _train(ours, our_opt)
    _assert_close(ours, ref, start)


def test_galore_adafactor_matches_galore_torch():
    start, ours, ref = _mlp(), _mlp(), _mlp()
    keys = {"rank": 4, "update_proj_gap": 5, "scale": 0.25, "proj_type": "std"}
    ref_opt = galore_torch.GaLoreAdafactor(
        _groups(ref, **keys), lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False
    )
    our_opt = rw.optim.GaLoreAdafactor(_groups(ours, **keys), lr=1e-2, projector="svd")
    _train(ref, ref_opt)
    _train(ours, our_opt)
    _assert_close(ours, ref, start)


@pytest.mark.parametrize("scale_type,rank,scale", [("channel", 4, 1.0), ("tensor", 1, 128.0)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_apollo_matches_apollo_torch(scale_type, rank, scale, weight_decay):
    start, ours, ref = _mlp(), _mlp(), _mlp()
    keys = {"rank": rank, "update_proj_gap": 5, "scale": scale, "proj_type": "std"}
    ref_opt = apollo_torch.APOLLOAdamW(
        _groups(ref, **keys, proj="random", scale_type=scale_type), lr=1e-2, weight_decay=weight_decay
    )
    cls = rw.optim.APOLLO if scale_type == "channel" else rw.optim.APOLLOMini
    our_opt = cls(_groups(ours, **keys), lr=1e-2, weight_decay=weight_decay)
    _train(ref, ref_opt)
    _train(ours, our_opt)
    _assert_close(ours, ref, start)


def test_apollo_accepts_apollo_torch_group_keys():
    start, ours, ref = _mlp(), _mlp(), _mlp()
    keys = {"rank": 4, "update_proj_gap": 5, "scale": 1.0, "proj_type": "std", "proj": "random", "scale_type": "tensor"}
    ref_opt = apollo_torch.APOLLOAdamW(_groups(ref, **keys), lr=1e-2)
    our_opt = rw.optim.APOLLO(_groups(ours, **keys), lr=1e-2)  # group keys override the class defaults
    _train(ref, ref_opt, 8)
    _train(ours, our_opt, 8)
    _assert_close(ours, ref, start)
