"""SliceGPT: computational invariance before slicing (float64), exact sliced shapes, and PCA slicing
beating random-direction slicing on a model with anisotropic activations."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama import modeling_llama

import rankwise as rw
from rankwise.compress.slicegpt import SlicedDecoderLayer

from ..conftest import lm_batches, make_tiny_bert, make_tiny_llama
from .anisotropic import pattern_batches, trained_anisotropic_llama


def _float64_rmsnorm(self, x):  # LlamaRMSNorm without its float32 round trip: a float64 reference
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _spread_norms_tied_llama() -> torch.nn.Module:
    """Tiny float64 Llama with a tied head (as SmolLM2) and random RMSNorm scales, so folding matters."""
    model = make_tiny_llama(0).double()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if name.endswith("norm"):
            module.weight.data = torch.rand(32, generator=g, dtype=torch.float64) * 2 + 0.1
    return model


def test_rotation_without_slicing_keeps_the_function(monkeypatch):
    """ratio=1: per-block PCA rotations, folded norms and Q_lᵀQ_{l+1} shortcuts leave the logits unchanged."""
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _float64_rmsnorm)
    model = _spread_norms_tied_llama()
    batch = lm_batches(1, seed=5)[0]
    expected = model(**batch).logits
    rotated = rw.compress(copy.deepcopy(model), "slicegpt", ratio=1.0, data=lm_batches(2), round_to=1)
    layers = rotated.model.layers
    assert all(isinstance(layer, SlicedDecoderLayer) for layer in layers)
    eye = torch.eye(32, dtype=torch.float64)
    for layer in layers:  # the bases differ from block to block: the shortcuts are real rotations
        assert not torch.allclose(layer.attn_shortcut.weight.abs(), eye, atol=1e-2)
        assert not torch.allclose(layer.mlp_shortcut.weight.abs(), eye, atol=1e-2)
    assert not torch.allclose(rotated.model.embed_tokens.weight, model.model.embed_tokens.weight)
    torch.testing.assert_close(rotated(**batch).logits, expected, atol=1e-8, rtol=0)


def test_sliced_shapes_and_weight_count():
    model = make_tiny_llama(0)
    d, k, inter, vocab = 32, 24, 64, 100
    rw.compress(model, "slicegpt", ratio=0.75, data=lm_batches(2), round_to=1)
    state = model.rankwise_compress
    assert state.details["width"] == k == model.model.embed_tokens.weight.shape[1]
    for i, layer in enumerate(model.model.layers):
        out = d if i == len(model.model.layers) - 1 else k  # the last block writes the full width for the head
        attn, mlp = layer.self_attn, layer.mlp
        assert [m.in_features for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)] == [k] * 5
        assert (attn.o_proj.out_features, mlp.down_proj.out_features) == (k, out)
        assert tuple(layer.attn_shortcut.weight.shape) == (k, k)
        assert tuple(layer.mlp_shortcut.weight.shape) == (out, k)
        assert layer.input_layernorm.mean_dim == layer.post_attention_layernorm.mean_dim == d  # Σx² / original d
    assert model.lm_head.weight.shape == (vocab, d)
    per_block = k * (32 + 16 + 16) + 32 * k + 2 * inter * k
    after = per_block * 2 + inter * (k + d) + k * k * 2 + k * k + out * k
    assert state.weights_after == after
    assert state.weights_before == 2 * (d * (32 + 16 + 16) + 32 * d + 3 * inter * d)
    assert model(**lm_batches(1)[0]).logits.shape == (4, 12, vocab)


def test_pca_slicing_beats_random_directions():
    """On a briefly trained Llama with anisotropic activations, slicing the PCA tail loses much less
    than slicing random directions, on held-out text of the calibration distribution."""
    model, data = trained_anisotropic_llama(epochs=15)
    held_out = pattern_batches(4, seed=1)

    def loss(m):
        with torch.no_grad():
            return sum(float(m(**b).loss) for b in held_out) / len(held_out)

    dense = loss(model)
    pca = loss(rw.compress(copy.deepcopy(model), "slicegpt", ratio=0.5, data=data, round_to=1))
    rand = loss(rw.compress(copy.deepcopy(model), "slicegpt", ratio=0.5, data=data, round_to=1, basis="random"))
    assert dense < pca
    assert pca - dense < 0.5 * (rand - dense)


def test_bad_input():
    with pytest.raises(ValueError, match="slicegpt needs data"):
        rw.compress(make_tiny_llama(0), "slicegpt", ratio=0.5)
    with pytest.raises(ValueError, match="targets must be 'all-linear' for slicegpt"):
        rw.compress(make_tiny_llama(0), "slicegpt", ratio=0.5, data=lm_batches(1), targets=["q_proj"])
    with pytest.raises(ValueError, match="basis='pc' is not allowed"):
        rw.compress(make_tiny_llama(0), "slicegpt", ratio=0.5, data=lm_batches(1), basis="pc")
    with pytest.raises(ValueError, match="round_to=0"):
        rw.compress(make_tiny_llama(0), "slicegpt", ratio=0.5, data=lm_batches(1), round_to=0)
    with pytest.raises(ValueError, match="Llama-style"):
        rw.compress(make_tiny_bert(0), "slicegpt", ratio=0.5, data=lm_batches(1))
