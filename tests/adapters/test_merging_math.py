"""The per-layer math of adapter merging: hand-computed TIES / magnitude-prune / DARE examples, parity with
PEFT 0.21.2's ``merge_utils``, the exact ``cat`` merge, Eckart–Young for the SVD truncation, bad inputs."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils as pm

from rankwise.adapters.merging import MERGE_METHODS, combine_deltas, concat_factors, truncate_delta

# Three hand-made task vectors (2x2). With density 0.5 each keeps its 2 largest magnitudes:
#   t1 = [4, 0, 0, 3],  t2 = [-1, 0, -3, 0],  t3 = [-1.5, -2.5, 0, 0]   (flattened)
D1 = torch.tensor([[4.0, -1.0], [0.1, 3.0]])
D2 = torch.tensor([[-1.0, 0.5], [-3.0, 0.2]])
D3 = torch.tensor([[-1.5, -2.5], [0.3, 1.0]])


def _rand(n: int, shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


# ---- linear ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_linear_of_one_adapter_with_weight_one_is_that_adapter_exactly(dtype):
    d = _rand(1, (5, 7), 0, dtype)[0]
    out = combine_deltas([d], [1.0], "linear")
    assert out.dtype == dtype and torch.equal(out, d)


def test_linear_is_the_weighted_sum():
    out = combine_deltas([torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])], [0.5, 2.0], "linear")
    assert torch.equal(out, torch.tensor([6.5, -1.0]))


# ---- TIES, by hand ---------------------------------------------------------------------------------------
# entry 0: trimmed values (4, -1, -1.5). "total": 4 - 1 - 1.5 = 1.5 > 0 elects +, only 4 agrees -> 4 / 1.
#          "frequency": +1 - 1 - 1 = -1 elects -, -1 and -1.5 agree -> (-1 - 1.5) / 2 = -1.25.
# entry 1: (0, 0, -2.5) -> -2.5 (zeros never count);  entry 2: (0, -3, 0) -> -3;  entry 3: (3, 0, 0) -> 3.


@pytest.mark.parametrize(("majority_sign", "expected"), [
    ("total", [[4.0, -2.5], [-3.0, 3.0]]),
    ("frequency", [[-1.25, -2.5], [-3.0, 3.0]]),
])
def test_ties_by_hand(majority_sign, expected):
    out = combine_deltas([D1, D2, D3], [1.0, 1.0, 1.0], "ties", density=0.5, majority_sign=majority_sign)
    assert torch.equal(out, torch.tensor(expected))


@pytest.mark.parametrize(("majority_sign", "expected"), [
    # entry 0, total: the sign is elected on the UNweighted values (+1.5 -> +; weighted it would be 1 - 1 - 1.5 < 0),
    # then the agreeing weighted values are averaged: 0.25 * 4 / 1 = 1.0. Entry 3: 0.25 * 3 / 1 = 0.75.
    ("total", [[1.0, -2.5], [-3.0, 0.75]]),
    ("frequency", [[-1.25, -2.5], [-3.0, 0.75]]),
])
def test_ties_weights_enter_after_the_election_and_before_the_disjoint_mean(majority_sign, expected):
    out = combine_deltas([D1, D2, D3], [0.25, 1.0, 1.0], "ties", density=0.5, majority_sign=majority_sign)
    assert torch.equal(out, torch.tensor(expected))


def test_ties_tied_election_elects_plus():
    # frequency: +1 - 1 = 0 elects + so only the 1 agrees; total: 1 - 2 < 0 elects -
    pair = [torch.tensor([1.0]), torch.tensor([-2.0])]
    assert combine_deltas(pair, [1.0, 1.0], "ties", majority_sign="frequency").item() == 1.0
    assert combine_deltas(pair, [1.0, 1.0], "ties", majority_sign="total").item() == -2.0


def test_ties_entry_that_every_task_trimmed_is_zero_not_nan():
    zeros = torch.zeros(3, 4)
    out = combine_deltas([zeros, zeros.clone()], [1.0, 2.0], "ties", density=0.5)
    assert torch.equal(out, zeros)


# ---- magnitude_prune, by hand ----------------------------------------------------------------------------


def test_magnitude_prune_by_hand():
    # 2 * t1 - t2 = 2 * [4, 0, 0, 3] - [-1, 0, -3, 0] = [9, 0, 3, 6]
    out = combine_deltas([D1, D2], [2.0, -1.0], "magnitude_prune", density=0.5)
    assert torch.equal(out, torch.tensor([[9.0, 0.0], [3.0, 6.0]]))


def test_density_one_keeps_everything():
    for how in ("magnitude_prune", "dare_linear"):
        assert torch.equal(combine_deltas([D1, D2], [1.0, 1.0], how, density=1.0), D1 + D2)


# ---- DARE ------------------------------------------------------------------------------------------------


def test_dare_linear_is_the_mask_from_the_generator_rescaled_by_one_over_density():
    d1, d2 = _rand(2, (6, 5), 1)
    out = combine_deltas([d1, d2], [0.5, 2.0], "dare_linear", density=0.25,
                         generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # one Bernoulli(density) draw per delta, in list order
    m1 = torch.bernoulli(torch.full((6, 5), 0.25), generator=g)
    m2 = torch.bernoulli(torch.full((6, 5), 0.25), generator=g)
    assert 0 < m1.sum() < m1.numel() and not torch.equal(m1, m2)
    torch.testing.assert_close(out, 0.5 * d1 * m1 * 4.0 + 2.0 * d2 * m2 * 4.0, rtol=1e-6, atol=1e-6)


def test_dare_keeps_entries_exactly_as_delta_over_density_or_drops_them():
    d = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0])
    out = combine_deltas([d], [1.0], "dare_linear", density=0.5, generator=torch.Generator().manual_seed(0))
    kept = out != 0
    assert 0 < kept.sum() < d.numel()
    assert torch.equal(out[kept], 2.0 * d[kept])


def test_dare_is_unbiased_and_drops_one_minus_density():
    d = _rand(1, (8, 8), 2)[0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([combine_deltas([d], [1.0], "dare_linear", density=0.3, generator=g) for _ in range(2000)])
    # per-entry std of the mean: |d| * sqrt((1 - p) / p) / sqrt(N) ~ 0.034 |d|; without the rescale the mean is 0.3 d
    assert ((draws.mean(0) - d).abs() <= 0.15 * d.abs() + 1e-6).all()
    assert abs(float((draws == 0).float().mean()) - 0.7) < 0.01


def test_dare_ties_is_ties_without_trim_on_the_dropped_rescaled_deltas():
    deltas = _rand(3, (7, 9), 4)
    weights = [0.8, -0.4, 1.3]
    for majority_sign in ("total", "frequency"):
        out = combine_deltas(deltas, weights, "dare_ties", density=0.4, majority_sign=majority_sign,
                             generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        dropped = [d * torch.bernoulli(torch.full_like(d, 0.4), generator=g) / 0.4 for d in deltas]
        expected = combine_deltas(dropped, weights, "ties", density=1.0, majority_sign=majority_sign)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_same_generator_seed_same_merge():
    deltas = _rand(2, (4, 4), 6)
    a = combine_deltas(deltas, [1.0, 1.0], "dare_ties", density=0.5, generator=torch.Generator().manual_seed(9))
    b = combine_deltas(deltas, [1.0, 1.0], "dare_ties", density=0.5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


# ---- parity with PEFT 0.21.2 merge_utils -----------------------------------------------------------------

WEIGHTS = [0.7, -0.3, 1.2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("how", ["linear", "magnitude_prune", "ties_total", "ties_frequency"])
def test_deterministic_methods_equal_peft(how, dtype):
    deltas = _rand(3, (16, 24), 7, dtype)
    w = torch.tensor(WEIGHTS, dtype=dtype)  # torch.tensor(weights) would round them to fp32; ours keep fp64
    if how == "linear":
        ref = pm.task_arithmetic(deltas, w)
        out = combine_deltas(deltas, WEIGHTS, "linear")
    elif how == "magnitude_prune":
        ref = pm.magnitude_prune(deltas, w, 0.4)
        out = combine_deltas(deltas, WEIGHTS, "magnitude_prune", density=0.4)
    else:
        sign = how.split("_")[1]
        ref = pm.ties(deltas, w, 0.4, majority_sign_method=sign)
        out = combine_deltas(deltas, WEIGHTS, "ties", density=0.4, majority_sign=sign)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["dare_linear", "dare_ties_total", "dare_ties_frequency"])
def test_dare_equals_peft_with_the_same_draws(how):
    """PEFT draws the DARE masks from torch's global RNG: seeded alike, both give the same merge; a
    ``torch.Generator`` seeded with the same number draws the same masks on CPU."""
    deltas = _rand(3, (16, 24), 8)
    w = torch.tensor(WEIGHTS)
    sign = how.split("_")[-1] if "ties" in how else "total"
    torch.manual_seed(11)
    if how == "dare_linear":
        ref = pm.dare_linear(deltas, w, 0.3)
    else:
        ref = pm.dare_ties(deltas, w, 0.3, majority_sign_method=sign)
    name = "dare_ties" if "ties" in how else "dare_linear"
    torch.manual_seed(11)
    global_rng = combine_deltas(deltas, WEIGHTS, name, density=0.3, majority_sign=sign)
    own_rng = combine_deltas(deltas, WEIGHTS, name, density=0.3, majority_sign=sign,
                             generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(global_rng, ref, rtol=0, atol=0)
    torch.testing.assert_close(own_rng, ref, rtol=0, atol=0)


# ---- concat_factors --------------------------------------------------------------------------------------


def test_concat_factors_product_is_the_weighted_sum_of_the_adapters():
    g = torch.Generator().manual_seed(0)
    ranks, scales, weights = [2, 3, 4], [2.0, 0.5, 0.125], [0.6, -1.0, 1.5]
    factors = [(torch.randn(10, r, generator=g), torch.randn(r, 7, generator=g), s)
               for r, s in zip(ranks, scales, strict=True)]
    b, a = concat_factors(factors, weights)
    assert b.shape == (10, 9) and a.shape == (9, 7)
    dense = sum(w * s * (bi.double() @ ai.double()) for (bi, ai, s), w in zip(factors, weights, strict=True))
    torch.testing.assert_close((b @ a).double(), dense, rtol=1e-5, atol=1e-5)
    # the blocks: w s B on the B side, A untouched
    assert torch.equal(b[:, 2:5], factors[1][0] * (-1.0 * 0.5)) and torch.equal(a[2:5], factors[1][1])


# ---- truncate_delta --------------------------------------------------------------------------------------


def test_truncate_rank_k_matrix_at_rank_k_is_exact():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(12, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 9, generator=g, dtype=torch.float64)
    b, a = truncate_delta(delta, 4)
    assert b.shape == (12, 4) and a.shape == (4, 9) and b.dtype == torch.float64
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-10)


@pytest.mark.parametrize("r", [1, 3, 6])
def test_truncate_error_is_the_dropped_singular_values_eckart_young(r):
    delta = torch.randn(12, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = torch.linalg.svdvals(delta)
    b, a = truncate_delta(delta, r)
    err2 = float(((delta - b @ a) ** 2).sum())
    assert err2 == pytest.approx(float((sigma[r:] ** 2).sum()), rel=1e-9)
    torch.testing.assert_close(a @ a.T, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-10)  # A = V_rᵀ
    torch.testing.assert_close(b.norm(dim=0), sigma[:r], rtol=1e-10, atol=0)  # B = U_r Σ_r


def test_truncate_returns_the_delta_dtype():
    delta = torch.randn(8, 6, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    b, a = truncate_delta(delta, 6)
    assert b.dtype == a.dtype == torch.bfloat16
    torch.testing.assert_close((b.float() @ a.float()), delta.float(), rtol=0.05, atol=0.05)


# ---- bad inputs ------------------------------------------------------------------------------------------

_B, _A = torch.ones(4, 2), torch.ones(2, 3)
BAD = [
    ("how", lambda: combine_deltas([D1], [1.0], "mean")),
    ("density", lambda: combine_deltas([D1], [1.0], "ties", density=0.0)),
    ("density", lambda: combine_deltas([D1], [1.0], "ties", density=1.5)),
    ("density", lambda: combine_deltas([D1], [1.0], "dare_linear", density=-0.2)),
    ("density", lambda: combine_deltas([D1], [1.0], "ties", density=True)),
    ("majority_sign", lambda: combine_deltas([D1], [1.0], "ties", majority_sign="max")),
    ("weights", lambda: combine_deltas([D1, D2], [1.0], "linear")),
    ("weights", lambda: combine_deltas([D1], [float("nan")], "linear")),
    ("deltas", lambda: combine_deltas([], [], "linear")),
    ("deltas", lambda: combine_deltas([D1, torch.ones(3, 2)], [1.0, 1.0], "linear")),
    ("deltas", lambda: combine_deltas([D1, D2.double()], [1.0, 1.0], "linear")),
    ("factors", lambda: concat_factors([], [])),
    ("weights", lambda: concat_factors([(_B, _A, 1.0)], [1.0, 2.0])),
    ("factors", lambda: concat_factors([(_B, _A, 1.0), (torch.ones(4, 3), _A, 1.0)], [1.0, 1.0])),
    ("factors", lambda: concat_factors([(_B, _A, 1.0), (torch.ones(5, 2), _A, 1.0)], [1.0, 1.0])),
    ("factors", lambda: concat_factors([(_B, _A, 1.0), (_B, torch.ones(2, 4), 1.0)], [1.0, 1.0])),
    ("scale", lambda: concat_factors([(_B, _A, "x")], [1.0])),
    ("rank", lambda: truncate_delta(torch.ones(4, 3), 4)),
    ("rank", lambda: truncate_delta(torch.ones(4, 3), 0)),
    ("delta", lambda: truncate_delta(torch.ones(4), 1)),
]


@pytest.mark.parametrize(("name", "call"), BAD)
def test_bad_inputs_raise_value_error_naming_the_parameter(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_unknown_how_lists_the_allowed_methods():
    with pytest.raises(ValueError) as info:
        combine_deltas([D1], [1.0], "mean")
    assert "how='mean'" in str(info.value) and all(m in str(info.value) for m in MERGE_METHODS)
    with pytest.raises(ValueError, match="'total', 'frequency'"):
        combine_deltas([D1], [1.0], "ties", majority_sign="max")
