"""EVA (Paischer et al. 2024): A from the incremental SVD of each layer's inputs, ranks redistributed by
explained variance, B = 0; parity with PEFT's ``initialize_lora_eva_weights``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.eva import IncrementalSVD, distribute_ranks

from ..conftest import lm_batches, make_tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]


class _Two(nn.Module):
    """Two square layers on their own inputs: ``a`` sees x, ``b`` sees y."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x).sum() + self.b(y).sum()


def _inputs(n: int, d: int, spectrum: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows with a non-zero mean and principal directions Q[:, i] of standard deviation spectrum[i]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    z = torch.randn(n, len(spectrum), generator=g) * torch.tensor(spectrum)
    return z @ q[:, : len(spectrum)].T + 3.0 * torch.randn(d, generator=g), q


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def test_a_rows_are_the_top_principal_directions_of_the_layer_inputs():
    """A = top right-singular vectors of the *centred inputs* (not of W, not of the outputs)."""
    d = 16
    x, _ = _inputs(512, d, [8.0, 6.0, 4.0] + [0.3] * 13, seed=1)  # a gap after the top 3 (truncated at r = 3)
    y, _ = _inputs(512, d, [5.0, 4.0, 3.0] + [0.2] * 13, seed=2)
    model = _Two(d)
    # one batch (cycled): the SVD converges on it, so A must be its exact top-3 principal directions
    rw.adapt(model, "eva", targets=["a", "b"], r=3, rho=1.0, init_data=_batches(x, y, 512), trainable=None)
    for name, data in (("a", x), ("b", y)):
        layer = model.get_submodule(name)
        _, _, vh = torch.linalg.svd(data - data.mean(0), full_matrices=False)
        cos = (layer.lora_A @ vh[:3].T).abs()
        torch.testing.assert_close(cos, torch.eye(3), atol=1e-3, rtol=0)
        assert torch.count_nonzero(layer.lora_B) == 0


def test_rank_redistribution_follows_explained_variance():
    """Layer a's inputs spread over many directions, b's over one: the budget 2·r moves to a."""
    d = 16
    x, _ = _inputs(512, d, [4.0, 3.8, 3.6, 3.4, 3.2, 3.0] + [0.1] * 10, seed=3)
    y, _ = _inputs(512, d, [10.0] + [0.1] * 15, seed=4)
    model = _Two(d)
    rw.adapt(model, "eva", targets=["a", "b"], r=3, rho=2.0, alpha=6, init_data=_batches(x, y), trainable=None)
    a, b = model.a, model.b
    assert (a.config.r, b.config.r) == (5, 1)  # a's 5 largest ratios beat b's second (≈ 0), b keeps its top one
    assert a.config.r + b.config.r == 6  # the budget Σ r_l
    assert a.scale == pytest.approx(2.0) and b.scale == pytest.approx(2.0)  # α scaled by r'/r: α/r unchanged
    # without redistribution (rho = 1) every layer keeps r
    model = _Two(d)
    rw.adapt(model, "eva", targets=["a", "b"], r=3, rho=1.0, init_data=_batches(x, y), trainable=None)
    assert (model.a.config.r, model.b.config.r) == (3, 3)


def test_per_layer_rank_overrides_set_that_layer_budget():
    """A layer's own r (``overrides``) is its budget and caps it at round(r·ρ), as PEFT's rank_pattern."""
    base, data = make_tiny_llama(), lm_batches(n=3)
    q0 = "model.layers.0.self_attn.q_proj"
    model = rw.adapt(copy.deepcopy(base), "eva", targets=["q_proj", "o_proj"], r=4, rho=1.0, init_data=data,
                     overrides={q0: {"r": 2}})
    ranks = {n: layer.config.r for n, layer in rw.adapter_layers(model)}
    assert ranks[q0] == 2 and sum(ranks.values()) == 2 + 3 * 4


def test_distribute_ranks_counts_the_largest_pooled_ratios():
    ratios = {"l1": torch.tensor([0.5, 0.3, 0.1, 0.05]), "l2": torch.tensor([0.4, 0.04, 0.01, 0.005])}
    groups = {"l1": "l1", "l2": "l2"}
    assert distribute_ranks(ratios, groups, 4, {"l1": 4, "l2": 4}) == {"l1": 3, "l2": 1}
    assert distribute_ranks(ratios, groups, 4, {"l1": 2, "l2": 4}) == {"l1": 2, "l2": 2}  # l1 capped at r·ρ
    # a layer sharing l2's SVD competes with l2's ratios; the SVD's owner gets the larger rank
    groups = {"l1": "l1", "l2": "l2", "l3": "l2"}
    assert distribute_ranks(ratios, groups, 4, {"l1": 4, "l2": 4, "l3": 4}) == {"l1": 2, "l2": 1, "l3": 1}
    assert distribute_ranks(ratios, groups, 2, {"l1": 4, "l2": 4, "l3": 4}) == {"l1": 1, "l2": 1, "l3": 0}
    # a member allowed more components than its SVD's owner: the ranks are swapped (PEFT's rule)
    assert distribute_ranks(ratios, {"l2": "l2", "l3": "l2"}, 3, {"l2": 1, "l3": 3}) == {"l2": 2, "l3": 1}


def test_incremental_svd_matches_the_batch_svd_and_its_variance_ratio():
    x, _ = _inputs(300, 8, [5.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2], seed=5)
    svd = IncrementalSVD(8)  # no truncation: exact
    for i in range(0, 300, 50):
        svd.update(x[i : i + 50], 0.99)
    centred = x - x.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    torch.testing.assert_close(svd.sigma, s, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close((svd.components @ vh.T).abs(), torch.eye(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(svd.explained_variance_ratio, s**2 / centred.pow(2).sum(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(svd.mean, x.mean(0), atol=1e-5, rtol=0)


def _peft_eva(base, data, **eva):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="eva",
                        eva_config=EvaConfig(**eva))
    pm = get_peft_model(copy.deepcopy(base), config)
    initialize_lora_eva_weights(pm, data, show_progress_bar=False)
    return pm


@pytest.mark.filterwarnings("ignore")
def test_peft_parity_same_a_up_to_sign_and_same_ranks():
    """Same batches -> PEFT's ranks, α pattern and A (up to the sign of each row). r·ρ = 16 components of
    32-dim inputs: PEFT's randomized SVD (q = 32) is exact here."""
    base, data = make_tiny_llama(), lm_batches(n=4)
    model = rw.adapt(copy.deepcopy(base), "eva", targets=TARGETS, r=8, alpha=16, init_data=data)
    pm = _peft_eva(base, data, rho=2.0)
    theirs = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "lora_A")
              and "default" in m.lora_A}
    layers = rw.adapter_layers(model)
    assert sorted(n for n, _ in layers) == sorted(theirs)
    ranks = [layer.config.r for _, layer in layers]
    assert len(set(ranks)) > 1  # the ranks were redistributed
    for name, layer in layers:
        a = theirs[name].lora_A["default"].weight
        assert a.shape == layer.lora_A.shape, name
        assert theirs[name].scaling["default"] == pytest.approx(layer.scale)
        torch.testing.assert_close((layer.lora_A * a).sum(1).abs(), torch.ones(a.shape[0]), atol=1e-4, rtol=0)
    assert {k: v for k, v in pm.peft_config["default"].rank_pattern.items()} == {
        n: layer.config.r for n, layer in layers if layer.config.r != 8
    }


@pytest.mark.filterwarnings("ignore")
def test_starts_at_base_round_trips_and_exports_rank_pattern(tmp_path):
    from peft import PeftModel

    base, data = make_tiny_llama(), lm_batches(n=4)
    model = rw.adapt(copy.deepcopy(base), "eva", r=4, alpha=8, init_data=data)
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0]).logits, base(**data[0]).logits)
        for _, layer in rw.adapter_layers(model):
            layer.lora_B.normal_(0, 0.1)
        expected = model(**data[0]).logits
    ranks = {n: layer.config.r for n, layer in rw.adapter_layers(model)}
    rw.save_adapter(model, tmp_path / "a")
    fresh = rw.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert {n: layer.config.r for n, layer in rw.adapter_layers(fresh)} == ranks
    with torch.no_grad():
        torch.testing.assert_close(fresh(**data[0]).logits, expected)
    rw.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {n: r for n, r in ranks.items() if r != cfg["r"]} and cfg["rank_pattern"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**data[0]).logits, expected, atol=1e-5, rtol=0)


def test_label_mask_leaves_out_ignored_tokens():
    """Tokens labelled -100 do not enter the SVD: A equals EVA on the same batches with those tokens cut."""
    base, data = make_tiny_llama(), lm_batches(n=3)
    masked = [dict(b, labels=b["labels"].masked_fill(torch.arange(12) >= 8, -100)) for b in data]
    cut = [{k: v[:, :8] for k, v in b.items()} for b in data]  # causal model: the first 8 positions are unchanged
    one = rw.adapt(copy.deepcopy(base), "eva", targets=["q_proj"], r=2, rho=1.0, init_data=masked)
    two = rw.adapt(copy.deepcopy(base), "eva", targets=["q_proj"], r=2, rho=1.0, init_data=cut)
    full = rw.adapt(copy.deepcopy(base), "eva", targets=["q_proj"], r=2, rho=1.0, init_data=data)
    for (_, a), (_, b), (_, c) in zip(rw.adapter_layers(one), rw.adapter_layers(two), rw.adapter_layers(full),
                                      strict=True):
        torch.testing.assert_close(a.lora_A, b.lora_A, atol=1e-4, rtol=0)
        assert not torch.allclose(a.lora_A, c.lora_A, atol=1e-2)


@pytest.mark.parametrize(("options", "message"), [
    ({"rho": 0.5}, "rho=0.5 must be a finite number >= 1"),
    ({"tau": 1.5}, "tau=1.5 must be a number in [0, 1]"),
    ({"max_steps": 0}, "max_steps=0 must be an integer >= 1"),
    ({"whiten": 1}, "whiten=1 must be True or False"),
    ({"init": "pissa"}, "init='pissa' is not allowed for method 'eva'"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError) as err:
        rw.adapt(make_tiny_llama(), "eva", r=2, init_data=lm_batches(n=1), **options)
    assert message in str(err.value)


def test_needs_data_and_convergence_limit():
    with pytest.raises(ValueError, match="needs init_data"):
        rw.adapt(make_tiny_llama(), "eva", r=2)
    with pytest.raises(ValueError, match="did not converge in max_steps=1"):
        rw.adapt(make_tiny_llama(), "eva", r=2, max_steps=1, init_data=lm_batches(n=2))
    with pytest.raises(ValueError, match="needs EVA's data pass"):
        rw.adapt(make_tiny_llama(), "lora", r=2, init="eva")
