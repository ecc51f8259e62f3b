"""rw.compress: every catalogued method round-trips through save_compressed / load_compressed, recovery trains
only the method part, and bad input is refused. The faithful test of each method is in its own module
(test_svd, test_lord, test_welore, test_pela, test_loraprune, test_dsee); tiny random Llama / BERT from configs,
real-model runs are slow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.compress import (
    COMPRESS_METHODS,
    factorized_layers,
    find_blocks,
    load_compressed,
    recover,
    save_compressed,
    welore_finetune_params,
    welore_ranks,
)

from ..conftest import lm_batches, make_tiny_llama

#: Settings for the methods that train while compressing; every catalogued method is round-tripped.
TRAINING_SETTINGS = {"loraprune": {"steps": 2}}
#: Methods that need calibration batches (``data=``) but do not train.
CALIBRATED = ("slicegpt", "dsnot", "ecoflap", "spqr", "modegpt")


@pytest.mark.parametrize("method", list(COMPRESS_METHODS))
def test_save_load_compressed_round_trip(tmp_path, method):
    """Generic, for every catalogued compression method: save, load, same logits and ranks."""
    model = make_tiny_llama(0)
    settings = TRAINING_SETTINGS.get(method, {})
    calibrate = bool(settings) or method in CALIBRATED
    rw.compress(model, method, ratio=0.6, data=lm_batches(2) if calibrate else None, **settings)
    batch = lm_batches(1)[0]
    expected = model(**batch).logits
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    torch.testing.assert_close(loaded(**batch).logits, expected)
    assert loaded.rankwise_compress.ranks == model.rankwise_compress.ranks
    assert [n for n, _ in factorized_layers(loaded)] == [n for n, _ in factorized_layers(model)]


def test_recover_trains_only_the_method_part():
    model = make_tiny_llama(0)
    rw.compress(model, "svd", ratio=0.5)
    embed = model.model.embed_tokens.weight.detach().clone()
    before = {n: l.U.detach().clone() for n, l in factorized_layers(model)}
    hist = recover(model, lm_batches(2), steps=2, lr=1e-2)
    assert len(hist) == 2
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert model.model.embed_tokens.weight.requires_grad  # flags restored
    assert any(not torch.equal(l.U, before[n]) for n, l in factorized_layers(model))


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, "half", True, None])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"ratio=.*\(0, 1\]"):
        rw.compress(make_tiny_llama(0), "svd", ratio=ratio)


def test_bad_inputs():
    with pytest.raises(ValueError, match="method='nope' is not allowed"):
        rw.compress(make_tiny_llama(0), "nope")
    with pytest.raises(ValueError, match=r"rank=64 is larger than min\(out_features, in_features\)=32"):
        rw.compress(make_tiny_llama(0), "svd", rank=64)
    with pytest.raises(ValueError, match=r"rank=64 is larger"):
        rw.compress(make_tiny_llama(0), "lord", rank=64)
    with pytest.raises(ValueError, match="only nn.Linear"):
        rw.compress(make_tiny_llama(0), "svd", targets=["embed_tokens"])
    with pytest.raises(ValueError, match="only nn.Linear"):
        rw.compress(make_tiny_llama(0), "welore", targets=r"model\.layers\.0\.mlp")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rnak'\]"):
        rw.compress(make_tiny_llama(0), "svd", rnak=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['alpha'\] for method 'pela'"):
        rw.compress(make_tiny_llama(0), "pela", alpha=3)
    with pytest.raises(ValueError, match="trainable='some' is not allowed"):
        rw.compress(make_tiny_llama(0), "pela", trainable="some")
    with pytest.raises(ValueError, match="one-shot: steps must be 0"):
        rw.compress(make_tiny_llama(0), "svd", steps=3)
    with pytest.raises(ValueError, match="needs data=..."):
        rw.compress(make_tiny_llama(0), "pela", steps=3)
    with pytest.raises(ValueError, match="loraprune needs data"):
        rw.compress(make_tiny_llama(0), "loraprune", ratio=0.5)
    with pytest.raises(ValueError, match="targets must be 'all-linear' for loraprune"):
        rw.compress(make_tiny_llama(0), "loraprune", targets=["q_proj"], data=lm_batches(1), steps=2)
    with pytest.raises(ValueError, match="warmup \\+ cooldown"):
        rw.compress(make_tiny_llama(0), "loraprune", data=lm_batches(1), steps=2, warmup=0.5, cooldown=0.5)
    with pytest.raises(ValueError, match="support='dense' is not allowed"):
        rw.compress(make_tiny_llama(0), "dsee", support="dense")
    with pytest.raises(ValueError, match="nnz=5000 exceeds"):
        rw.adapt(make_tiny_llama(0), "dsee", r=2, nnz=5000)
    with pytest.raises(ValueError, match="cannot be reached by WeLore"):
        welore_ranks({"a": torch.tensor([1.0, 0.5])}, {"a": (2, 2)}, 0.1)
    compressed = rw.compress(make_tiny_llama(0), "svd", ratio=0.5)
    with pytest.raises(ValueError, match="already compressed"):
        rw.compress(compressed, "svd")
    with pytest.raises(ValueError, match="not compressed with rw.compress\\(model, 'welore'"):
        welore_finetune_params(compressed)
    sparse = rw.compress(make_tiny_llama(0), "dsee", ratio=0.8)
    with pytest.raises(ValueError, match="dsee recovers during its own fine-tuning"):
        recover(sparse, lm_batches(1), steps=1)
    with pytest.raises(ValueError, match="no Llama-style"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))
