"""FourierFT: n trainable spectral coefficients at seeded frequencies, ΔW = α·Re(IDFT2), parity with PEFT 0.21.2."""

from __future__ import annotations

import math

import peft
import pytest
import torch

import rankwise as rw
from rankwise.adapters.fourierft import frequency_locations

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import TARGETS, _close, _pair, _peft_layer, _train, check_peft_parity


def _idft_sum(c: torch.Tensor, loc: torch.Tensor, out: int, inp: int, alpha: float) -> torch.Tensor:
    """α/(out·in)·Σₖ cₖ cos(2π(uₖp/out + vₖq/in)), the real part of the inverse DFT written out."""
    p = torch.arange(out, dtype=torch.float64).view(out, 1, 1)
    q = torch.arange(inp, dtype=torch.float64).view(1, inp, 1)
    phase = 2 * math.pi * (loc[0].double() * p / out + loc[1].double() * q / inp)
    return alpha / (out * inp) * (torch.cos(phase) * c.double()).sum(-1)


def test_fourierft_trains_exactly_n_coefficients_and_delta_is_their_inverse_dft():
    n, alpha = 40, 30.0
    model = rw.adapt(make_tiny_llama(0), "fourierft", n_frequency=n, scaling=alpha, random_loc_seed=5, zero_init=True)
    batch = lm_batches()[0]
    _close(model(**batch).logits, make_tiny_llama(0)(**batch).logits, atol=1e-6)  # zero_init: ΔW = 0
    trainable = {k.rsplit(".", 1)[-1] for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fourierft_spectrum"}
    _train(model, steps=3)
    for _, layer in rw.adapter_layers(model):
        assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == n
        loc = layer.fourierft_locations
        assert torch.equal(loc, frequency_locations(5, layer.out_features, layer.in_features, n))
        assert len({(int(u), int(v)) for u, v in loc.t()}) == n  # n distinct frequencies
        c = layer.fourierft_spectrum.detach()
        assert c.abs().min() > 0
        expected = _idft_sum(c, loc, layer.out_features, layer.in_features, alpha)
        _close(layer.delta_weight().double(), expected, atol=1e-7)
        assert torch.linalg.matrix_rank(expected) > 4  # full-rank in general, unlike a rank-4 LoRA


def test_fourierft_frequencies_regenerate_from_the_seed_and_are_not_saved(tmp_path):
    model = rw.adapt(make_tiny_llama(0), "fourierft", n_frequency=16, random_loc_seed=3)
    layers = rw.adapter_layers(model)
    shapes = {}
    for _, layer in layers:  # one entry matrix per layer shape, as the paper shares E
        key = (layer.out_features, layer.in_features)
        assert torch.equal(shapes.setdefault(key, layer.fourierft_locations), layer.fourierft_locations)
    rw.save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    assert not any("locations" in k for k in load_file(str(tmp_path / "a" / "rankwise_adapter.safetensors")))
    other = rw.adapt(make_tiny_llama(0), "fourierft", n_frequency=16, random_loc_seed=4)
    assert not torch.equal(rw.adapter_layers(other)[0][1].fourierft_locations, layers[0][1].fourierft_locations)


def test_fourierft_matches_peft():
    cfg = peft.FourierFTConfig(n_frequency=24, scaling=50.0, random_loc_seed=11, target_modules=TARGETS)
    pm, mine = _pair(cfg, "fourierft", n_frequency=24, scaling=50.0, random_loc_seed=11)
    pairs = []
    with torch.no_grad():
        for name, layer in rw.adapter_layers(mine):
            pl = _peft_layer(pm, name)
            assert torch.equal(layer.fourierft_locations, pl.indices["default"])  # same frequencies, same seed
            pc = pl.fourierft_spectrum["default"]
            layer.fourierft_spectrum.copy_(pc)
            pairs.append((layer.fourierft_spectrum, pc))
            _close(layer.delta_weight(), pl.get_delta_weight("default"), atol=1e-7)
    batch = lm_batches()[1]
    check_peft_parity(pm, mine, pairs, batch)


def test_fourierft_bad_input():
    with pytest.raises(ValueError, match=r"n_frequency=600 is more than the 512 = 16×32 entries"):
        rw.adapt(make_tiny_llama(0), "fourierft", n_frequency=600)
    with pytest.raises(ValueError, match="n_frequency=0 must be a positive integer"):
        rw.adapt(make_tiny_llama(0), "fourierft", n_frequency=0)
