"""rw.merge_adapters: the merged update equals the dense formula of the sources' exact updates.

The reference ΔWᵢ of each source is measured independently of ``delta_from_original``: a copy of
the model holding only adapter i is merged and unloaded, and W₀ is subtracted. Sources: rsLoRA
(scale α/√r, which PEFT's add_weighted_adapter ignores), DoRA on q/v (full-rank update through its
magnitudes) and PiSSA (an init that moves part of W₀ out of the base).
"""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.adapters.merging import combine_deltas, truncate_delta

from ..conftest import lm_batches, make_tiny_llama
from .test_named import _randomize

RANK = 4
IDS = lm_batches(n=1, batch=3, seq=10, seed=4)[0]["input_ids"]
WEIGHTS = {"a": 0.7, "b": -0.4, "c": 1.3}


def _sources(dora: bool = True):
    model = make_tiny_llama(0)
    rw.adapt(model, "rslora", r=RANK, alpha=8, name="a")
    _randomize(model, "a", 1)
    rw.adapt(model, "dora" if dora else "lora", r=RANK, name="b", targets=["q_proj", "v_proj"])
    _randomize(model, "b", 2)
    rw.adapt(model, "pissa", r=RANK, name="c", targets=["q_proj", "o_proj", "down_proj"])
    _randomize(model, "c", 3)
    return model


def _linear_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


W0 = _linear_weights(make_tiny_llama(0))


def _reference_deltas(model) -> dict[str, dict[str, torch.Tensor]]:
    """{adapter: {layer: ΔW}} measured by merge_and_unload of a copy holding only that adapter."""
    out = {}
    for name in rw.adapter_names(model):
        alone = copy.deepcopy(model)
        for other in rw.adapter_names(model):
            if other != name:
                rw.delete_adapter(alone, other)
        on = [target for target, _ in rw.adapter_layers(alone)]
        merged = _linear_weights(rw.merge_and_unload(alone))
        out[name] = {n: merged[n] - W0[n] for n in on}
    return out


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def sources():
    model = _sources()
    return model, _reference_deltas(model)


def _expected(refs, how, weights=WEIGHTS, **options):
    """The dense formula per layer; DARE's drops from one generator (seed 0), layers in model order."""
    layers = list(dict.fromkeys(name for name, _ in make_tiny_llama(0).named_modules() if name in W0))
    generator = torch.Generator().manual_seed(0)
    out = {}
    for layer in layers:
        names = [n for n in weights if layer in refs[n]]
        if not names:
            continue
        deltas = [refs[n][layer] for n in names]
        out[layer] = combine_deltas(deltas, [weights[n] for n in names], "linear" if how in ("cat", "svd") else how,
                                    generator=generator, **options)
    return out


@pytest.mark.parametrize("how", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_into_base_adds_exactly_the_dense_formula(sources, how):
    model, refs = sources
    model = copy.deepcopy(model)
    rw.merge_adapters(model, WEIGHTS, how, into_base=True, density=0.5)
    assert not rw.adapter_names(model)
    expected = _expected(refs, how, density=0.5)
    got = _linear_weights(model)
    for layer, delta in expected.items():
        torch.testing.assert_close(got[layer] - W0[layer], delta, atol=2e-6, rtol=0, msg=layer)


def test_cat_and_linear_give_the_exact_sum_as_a_new_adapter(sources):
    model, refs = sources
    lora_only = _sources(dora=False)  # cat needs low-rank sources: DoRA's update is full-rank
    lora_refs = _reference_deltas(lora_only)
    for m, r, how in ((lora_only, lora_refs, "cat"), (copy.deepcopy(model), refs, "linear")):
        m = copy.deepcopy(m) if how == "cat" else m
        rw.merge_adapters(m, WEIGHTS, how, name="sum")
        assert rw.active_adapters(m) == ["sum"]
        expected = _expected(r, "linear")
        for layer, new in rw.adapter_layers(m, "sum"):
            torch.testing.assert_close(new.delta_weight(), expected[layer], atol=2e-6, rtol=0, msg=f"{how} {layer}")
        # the new adapter is a plain LoRA: it survives a PEFT-format round trip
        plain = rw.merge_and_unload(copy.deepcopy(m))
        for layer, delta in expected.items():
            torch.testing.assert_close(_linear_weights(plain)[layer] - W0[layer], delta, atol=2e-6, rtol=0)


@pytest.mark.parametrize("how", ["svd", "ties"])
def test_truncated_merges_are_the_best_rank_r_approximation(sources, how):
    model, refs = sources
    model = copy.deepcopy(model)
    rw.merge_adapters(model, WEIGHTS, how, rank=3, density=0.6)
    expected = _expected(refs, how, density=0.6)
    for layer, new in rw.adapter_layers(model, "merged"):
        b, a = truncate_delta(expected[layer], 3)
        torch.testing.assert_close(new.delta_weight(), b @ a, atol=2e-6, rtol=0, msg=layer)
        assert new.lora_A.shape[0] == 3


@pytest.mark.parametrize("source", ["a", "b", "c"])
def test_weight_one_of_one_adapter_reproduces_it(sources, source):
    """rsLoRA's scale, DoRA's magnitudes and PiSSA's offset all carried over exactly."""
    model, _ = sources
    model = copy.deepcopy(model)
    rw.set_active(model, source)
    alone = _logits(model)
    rw.merge_adapters(model, {source: 1.0}, "linear")
    torch.testing.assert_close(_logits(model), alone, atol=2e-5, rtol=0)


def test_peft_add_weighted_adapter_loses_rslora_and_dora_where_rankwise_is_exact(tmp_path):
    """The same adapters through PEFT's add_weighted_adapter(weights=[1.0], "svd"): a measurable
    logit error (rsLoRA scale / DoRA magnitude dropped); rankwise's merge reproduces the adapter."""
    peft = pytest.importorskip("peft")
    for method in ("rslora", "dora"):
        model = rw.adapt(make_tiny_llama(0), method, r=RANK, alpha=8, name="default")
        _randomize(model, "default", 7)
        reference = _logits(model)
        rw.export_peft(model, tmp_path / method)
        pm = peft.PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / method)
        pm.add_weighted_adapter(["default"], [1.0], "merged", combination_type="svd")
        pm.set_adapter("merged")
        peft_error = float((_logits(pm) - reference).norm() / reference.norm())
        rw.merge_adapters(model, {"default": 1.0}, "linear")
        ours = float((_logits(model) - reference).norm() / reference.norm())
        assert ours < 1e-5 < 1e-3 < peft_error, (method, ours, peft_error)  # float32 rounding: 1.1e-6 on AVX-512


def test_bad_input_names_the_parameter(sources):
    model, _ = sources
    model = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
        rw.merge_adapters(model, {"a": 1.0, "zz": 1.0})
    with pytest.raises(ValueError, match="how='nope'"):
        rw.merge_adapters(model, {"a": 1.0}, "nope")
    with pytest.raises(ValueError, match="must be a dict"):
        rw.merge_adapters(model, ["a"])
    with pytest.raises(ValueError, match=r"weights\['a'\]"):
        rw.merge_adapters(model, {"a": float("nan")})
    with pytest.raises(ValueError, match="how='cat' needs low-rank adapters; adapter 'b' \\(dora\\)"):
        rw.merge_adapters(model, {"a": 1.0, "b": 1.0}, "cat")
    with pytest.raises(ValueError, match="rank=0"):
        rw.merge_adapters(model, {"a": 1.0}, "svd", rank=0)
    with pytest.raises(ValueError, match="density"):
        rw.merge_adapters(model, {"a": 1.0}, "ties", density=0)
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        rw.merge_adapters(model, {"a": 1.0}, name="a")
