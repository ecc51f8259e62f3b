"""PMSS (Wang et al. 2024): ΔW = C·(U − U₀)·R with C, R exact skeleton columns / rows of W₀ chosen by DEIM on
W₀'s singular vectors, only the r×r core U trained (U₀ = C⁺W₀R⁺)."""

from __future__ import annotations

import copy

import torch

import rankwise as rw

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import check_round_trip

LAYER = "model.layers.0.self_attn.q_proj"  # 32 x 32
ROWS, COLS = [3, 17, 25, 8], [30, 2, 11, 19]


def _planted(rows: list[int], cols: list[int], n: int = 32, seed: int = 0) -> torch.Tensor:
    """W = U diag(4, 3, 2, 1) Vᵀ + small noise whose singular vectors U, V are concentrated on ``rows`` /
    ``cols``: the skeletons a selection built on W's singular vectors must find (a random or first-r
    choice does not)."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(n)
    u, _ = torch.linalg.qr(eye[:, rows] + 0.05 * torch.randn(n, len(rows), generator=g))
    v, _ = torch.linalg.qr(eye[:, cols] + 0.05 * torch.randn(n, len(cols), generator=g))
    return u @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ v.T + 1e-3 * torch.randn(n, n, generator=g)


def _model_with(weight: torch.Tensor):
    base = make_tiny_llama()
    with torch.no_grad():
        base.get_submodule(LAYER).weight.copy_(weight)
    return base


def _index_of(column: torch.Tensor, matrix: torch.Tensor) -> int:
    """The one column of ``matrix`` equal to ``column`` (exactly)."""
    hits = [j for j in range(matrix.shape[1]) if torch.equal(matrix[:, j], column)]
    assert len(hits) == 1, hits
    return hits[0]


def test_skeletons_are_exact_rows_and_columns_of_w0_chosen_from_its_singular_vectors():
    w0 = _planted(ROWS, COLS)
    model = rw.adapt(_model_with(w0), "pmss", r=4)
    layer = model.get_submodule(LAYER)
    c, r = layer.frozen_B, layer.frozen_A  # C (out x r), R (r x in)
    cols = [_index_of(c[:, k], w0) for k in range(4)]
    rows = [_index_of(r[k], w0.T) for k in range(4)]
    assert sorted(cols) == sorted(COLS) and sorted(rows) == sorted(ROWS)
    assert cols[0] == int(torch.linalg.svd(w0)[2][0].abs().argmax())  # DEIM starts at the top vector's peak


def test_a_repeated_row_is_not_a_second_skeleton():
    """Rows 5 and 9 are (almost) the same large row, row 20 a small independent one: the skeletons must span
    W₀ (rows 5 or 9, and 20), not follow the row norms (5 and 9)."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, generator=g), torch.randn(32, generator=g)
    w0 = 1e-3 * torch.randn(32, 32, generator=g)
    w0[5] += 5 * x / x.norm()
    w0[9] += 4.9 * x / x.norm()
    w0[20] += y / y.norm()
    r = rw.adapt(_model_with(w0), "pmss", r=2).get_submodule(LAYER).frozen_A
    rows = sorted(_index_of(r[k], w0.T) for k in range(2))
    assert rows in ([5, 20], [9, 20])


def test_only_the_core_trains_and_the_model_starts_at_w0():
    base, data = make_tiny_llama(), lm_batches(n=1)
    w0 = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith("_proj")}
    model = rw.adapt(copy.deepcopy(base), "pmss", r=4)
    model.zero_grad()
    model(**data[0]).loss.backward()
    for name, layer in rw.adapter_layers(model):
        assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["core"]
        assert layer.core.numel() == 16 == layer.trainable_count() and layer.core.grad is not None
        c, u0, r, w = layer.frozen_B, layer.core_init, layer.frozen_A, w0[name]
        # U₀ = C⁺W₀R⁺ is the least-squares core: the normal equations Cᵀ(W₀ − C·U₀·R)Rᵀ = 0 hold
        assert (c.T @ (w - c @ u0 @ r) @ r.T).abs().max() < 1e-5
        torch.testing.assert_close(layer.base_layer.weight, w - c @ u0 @ r, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0]).logits, base(**data[0]).logits, atol=1e-5, rtol=0)


def test_cur_is_exact_on_a_rank_r_weight_and_the_update_reaches_rank_r():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(32, 4, generator=g) @ torch.randn(4, 32, generator=g)
    layer = rw.adapt(_model_with(w0), "pmss", r=4).get_submodule(LAYER)
    torch.testing.assert_close(layer.frozen_B @ layer.core_init @ layer.frozen_A, w0, atol=1e-4, rtol=1e-4)
    assert float(layer.base_layer.weight.abs().max()) < 1e-4  # nothing of W₀ is left outside the skeletons
    with torch.no_grad():
        layer.core.add_(torch.randn(4, 4, generator=g))
    assert int(torch.linalg.matrix_rank(layer.delta_from_original())) == 4  # r² parameters, rank-r update


def test_round_trip_and_peft_export(tmp_path):
    base, data = make_tiny_llama(), lm_batches(n=1)
    model = rw.adapt(copy.deepcopy(base), "pmss", r=4)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.core.mul_(1.5)
    expected = check_round_trip(model, base, data[0], tmp_path)
    assert (expected - base(**data[0]).logits).abs().max() > 1e-3
