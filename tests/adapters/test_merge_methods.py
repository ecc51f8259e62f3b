"""rw.merge_adapters(how="seq_merge") (OPCM, Tang et al. 2025) and how="lora_lego" (LoRA-LEGO, Zhao et
al. 2024): the properties only these merges have, on exact per-layer updates of tiny Llama adapters."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import rankwise as rw
from rankwise.adapters.lego import kmeans, lego_factors, rank_units
from rankwise.adapters.seq_merge import SequentialMerge, orthogonal_update, split_rank

from ..conftest import make_tiny_llama
from .test_named import _randomize

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _loras(ranks=(2, 2, 2), seed=0):
    model = make_tiny_llama(0)
    for i, r in enumerate(ranks):
        rw.adapt(model, "lora", r=r, alpha=2 * r, name=f"m{i}", targets=TARGETS, seed=seed + i)
        _randomize(model, f"m{i}", 10 + i)
    return model


def _deltas(model, name):
    return {t: layer.delta_from_original().detach().clone() for t, layer in rw.adapter_layers(model, name)}


def _norm(tensors):
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors.values()))


def _inner(a, b):
    return float((a.double() * b.double()).sum())


# --------------------------------------------------------------------------------------------- seq_merge
def test_split_rank_is_the_first_index_past_the_share():
    assert split_rank(torch.tensor([3.0, 1.0]), 0.5) == 0  # 0.75 > 0.5 at index 0
    assert split_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5) == 2  # 0.25, 0.5, 0.75 > 0.5
    assert split_rank(torch.zeros(3), 0.5) == 0


def test_projected_update_is_orthogonal_to_the_merged_update_and_its_leading_block():
    g = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(9, 4, generator=g, dtype=torch.float64))
    merged = left @ torch.diag(torch.tensor([1.0, 0.9, 0.8, 0.7], dtype=torch.float64)) @ right.T
    tau = torch.randn(12, 9, generator=g, dtype=torch.float64)
    p = orthogonal_update(tau, merged, alpha=0.7)
    assert abs(_inner(p, merged)) < 1e-10 * p.norm() * merged.norm()
    u, s, vh = torch.linalg.svd(merged)
    k = split_rank(s, 0.7)
    assert k == 2  # shares 0.29, 0.56, 0.79: the block holds the off-diagonal pairs (0, 1), (1, 0)
    coords = u.T @ p @ vh.T
    assert float(coords[:k, :k].abs().max()) < 1e-10
    # nothing else is removed: outside the diagonal and the block, the coordinates are τ's own
    mask = torch.ones_like(coords, dtype=torch.bool)
    mask[:k, :k] = False
    mask[range(4), range(4)] = False
    torch.testing.assert_close(coords[mask], (u.T @ tau @ vh.T)[mask])


def test_each_added_update_is_orthogonal_to_the_merged_one_and_the_length_is_the_mean():
    model = _loras((2, 3, 2, 4))
    merger = SequentialMerge(alpha=0.5)
    taus = [_deltas(model, f"m{i}") for i in range(4)]
    for t, tau in enumerate(taus):
        before = {k: v.clone() for k, v in merger.delta.items()}
        scale_before = merger.scale
        merger.add(tau)
        # the adaptive scale: ‖Δ⁽ᵗ⁾‖ = mean ‖τᵢ‖ over the models merged so far
        assert _norm(merger.delta) == pytest.approx(sum(_norm(x) for x in taus[: t + 1]) / (t + 1), rel=1e-5)
        if t == 0:
            continue
        for layer, previous in before.items():
            added = merger.scale * merger.delta[layer] - scale_before * previous
            assert abs(_inner(added, previous)) < 1e-5 * float(added.norm() * previous.norm()), layer
            assert float((added - tau[layer]).norm()) > 1e-3 * float(tau[layer].norm())  # something was removed


def test_the_merge_is_the_sum_of_projected_updates_so_order_matters():
    model = _loras()
    a, b = _deltas(model, "m0"), _deltas(model, "m1")
    mean = (_norm(a) + _norm(b)) / 2
    expected = {k: a[k] + orthogonal_update(b[k], a[k]) for k in a}
    length = _norm(expected)
    for first, second, exp in ((a, b, expected), (b, a, {k: b[k] + orthogonal_update(a[k], b[k]) for k in a})):
        merger = SequentialMerge()
        merger.add(first)
        merger.add(second)
        for k in a:
            torch.testing.assert_close(merger.delta[k], exp[k] * mean / _norm(exp), atol=1e-6, rtol=1e-5)
    ab, ba = SequentialMerge(), SequentialMerge()
    for m, order in ((ab, (a, b)), (ba, (b, a))):
        for x in order:
            m.add(x)
    gap = sum(float((ab.delta[k] - ba.delta[k]).norm()) for k in a)
    assert gap > 1e-2 * length * mean / length  # the first model enters whole, the later one projected


def _state_numel(obj) -> int:
    total = 0
    for value in vars(obj).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else [value]
        total += sum(t.numel() for t in items if torch.is_tensor(t))
        total += sum(1 for t in items if not torch.is_tensor(t))
    return total


def test_the_state_does_not_grow_with_the_number_of_merged_models():
    model = _loras((2,) * 6)
    merger = SequentialMerge()
    sizes = []
    for i in range(6):
        merger.add(_deltas(model, f"m{i}"))
        sizes.append(_state_numel(merger))
    assert len(set(sizes)) == 1 and merger.count == 6
    assert merger.state_tensors() == len(_deltas(model, "m0"))


def test_merge_adapters_seq_merge_is_the_sequential_merge_of_the_weighted_updates():
    model = _loras()
    weights = {"m2": 0.5, "m0": 1.0, "m1": -0.7}  # the dict order is the merge order
    merger = SequentialMerge(alpha=0.3)
    for name, w in weights.items():
        merger.add({k: w * v for k, v in _deltas(model, name).items()})
    into_base = copy.deepcopy(model)
    w0 = {t: layer.base_weight.detach().clone() for t, layer in rw.adapter_layers(model, "m0")}
    rw.merge_adapters(model, weights, "seq_merge", alpha=0.3)
    for target, layer in rw.adapter_layers(model, "merged"):
        assert layer.lora_A.shape[0] == 6  # default rank Σ rᵢ: exact
        torch.testing.assert_close(layer.delta_weight(), merger.delta[target], atol=1e-6, rtol=1e-5)
    rw.merge_adapters(into_base, weights, "seq_merge", alpha=0.3, into_base=True)
    for target, module in into_base.named_modules():
        if target in w0:
            torch.testing.assert_close(module.weight - w0[target], merger.delta[target], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- lora_lego
def test_units_sum_to_the_weighted_updates():
    model = _loras((2, 3))
    layers = dict(rw.adapter_layers(model, "m0")), dict(rw.adapter_layers(model, "m1"))
    target = next(iter(layers[0]))
    factors = [layer[target].factors_from_original() for layer in layers]
    b, a = rank_units(factors, [0.8, -1.5])
    assert b.shape[0] == 5
    expected = 0.8 * layers[0][target].delta_weight() - 1.5 * layers[1][target].delta_weight()
    torch.testing.assert_close(b.T @ a, expected, atol=1e-6, rtol=1e-5)


def test_lego_merge_has_exactly_rank_k():
    model = _loras((2, 3, 4))
    rw.merge_adapters(model, {"m0": 1.0, "m1": 1.0, "m2": 1.0}, "lora_lego", rank=3, seed=1)
    for target, layer in rw.adapter_layers(model, "merged"):
        assert layer.lora_A.shape[0] == 3
        assert int(torch.linalg.matrix_rank(layer.delta_weight().double(), rtol=1e-5)) == 3, target


def _permute_ranks(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model, name):
            perm = torch.randperm(layer.lora_A.shape[0], generator=g)
            layer.lora_A.copy_(layer.lora_A[perm])
            layer.lora_B.copy_(layer.lora_B[:, perm])


def test_permuting_ranks_inside_a_lora_leaves_the_merge_unchanged():
    model = _loras((4, 4, 4))
    weights = {"m0": 1.0, "m1": 0.6, "m2": 1.0}
    reference = copy.deepcopy(model)
    rw.merge_adapters(reference, weights, "lora_lego", rank=5, seed=3)
    before = {t: layer.delta_weight() for t, layer in rw.adapter_layers(reference, "merged")}
    for perm_seed in (1, 2):
        permuted = copy.deepcopy(model)
        _permute_ranks(permuted, "m1", perm_seed)
        _permute_ranks(permuted, "m2", perm_seed + 10)
        rw.merge_adapters(permuted, weights, "lora_lego", rank=5, seed=3)
        for t, layer in rw.adapter_layers(permuted, "merged"):
            torch.testing.assert_close(layer.delta_weight(), before[t], atol=1e-6, rtol=1e-5, msg=t)


def test_one_cluster_per_unit_is_the_sum_scaled_by_the_output_reweighting():
    """k = all units (distinct): every centroid is its unit, parameter reweighting changes nothing, and
    the output reweighting √(r̄/k) leaves Σ wᵢΔWᵢ · √(r̄/Σrᵢ); for N LoRAs of one rank, Σ wᵢΔWᵢ / √N."""
    for ranks in ((2, 2, 2), (2, 3, 1)):
        model = _loras(ranks)
        weights = {"m0": 1.0, "m1": -0.5, "m2": 2.0}
        expected = {t: sum(w * _deltas(model, n)[t] for n, w in weights.items()) for t in _deltas(model, "m0")}
        k = sum(ranks)
        scale = math.sqrt((k / len(ranks)) / k)
        rw.merge_adapters(model, weights, "lora_lego", rank=k)
        for t, layer in rw.adapter_layers(model, "merged"):
            torch.testing.assert_close(layer.delta_weight(), scale * expected[t], atol=1e-6, rtol=1e-5, msg=t)


def test_one_cluster_keeps_the_mean_norm_of_its_members():
    """k = 1: the centroid's B part and A part each have the mean norm of the units (not the smaller
    norm of their average), and the output is scaled by √r̄."""
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), 1.0),
               (torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), 1.0)]
    b_units, a_units = rank_units(factors, [1.0, 1.0])
    b, a = lego_factors(factors, [1.0, 1.0], 1, torch.Generator().manual_seed(0))
    assert b.shape == (6, 1) and a.shape == (1, 5)
    assert float(a.norm()) == pytest.approx(float(a_units.norm(dim=1).mean()), rel=1e-5)
    assert float(b.norm()) == pytest.approx(math.sqrt(2.0) * float(b_units.norm(dim=1).mean()), rel=1e-5)
    assert float(a_units.mean(0).norm()) < 0.9 * float(a_units.norm(dim=1).mean())  # the decay it undoes


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(5, 2, generator=g) for c in centres])
    labels = kmeans(points, 3, torch.Generator().manual_seed(1))
    groups = [set(labels[i * 5:(i + 1) * 5].tolist()) for i in range(3)]
    assert all(len(grp) == 1 for grp in groups) and len(set.union(*groups)) == 3


def test_bad_input_names_the_parameter():
    model = _loras((2, 2))
    rw.adapt(model, "dora", r=2, name="d", targets=["q_proj"])
    with pytest.raises(ValueError, match="alpha=1.5"):
        rw.merge_adapters(copy.deepcopy(model), {"m0": 1.0}, "seq_merge", alpha=1.5)
    with pytest.raises(ValueError, match="how='lora_lego' needs low-rank adapters; adapter 'd' \\(dora\\)"):
        rw.merge_adapters(copy.deepcopy(model), {"m0": 1.0, "d": 1.0}, "lora_lego")
    with pytest.raises(ValueError, match="rank=0"):
        rw.merge_adapters(copy.deepcopy(model), {"m0": 1.0}, "lora_lego", rank=0)
    with pytest.raises(ValueError, match="update must be a non-empty dict"):
        SequentialMerge().add({})
