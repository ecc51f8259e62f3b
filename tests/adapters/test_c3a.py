"""C³A: ΔW is block-circulant and its FFT forward equals the dense matmul, parity with PEFT 0.21.2."""

from __future__ import annotations

import peft
import pytest
import torch

import rankwise as rw

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import TARGETS, _close, _pair, _peft_layer, _train, check_peft_parity


def test_c3a_delta_is_block_circulant_and_the_fft_forward_is_its_matmul():
    b = 8
    model = rw.adapt(make_tiny_llama(0), "c3a", block_size=b, kernel_init="zeros")
    batch = lm_batches()[0]
    _close(model(**batch).logits, make_tiny_llama(0)(**batch).logits, atol=1e-6)
    _train(model, steps=3)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    for _, layer in rw.adapter_layers(model):
        kernel = layer.c3a_kernel.detach()
        assert kernel.shape == (layer.out_features // b, layer.in_features // b, b)
        assert layer.trainable_count() == layer.out_features * layer.in_features // b
        delta = layer.delta_weight().detach()
        for m, n in [(0, 0), (1, 2), (layer.out_features // b - 1, 0)]:
            block = delta[m * b:(m + 1) * b, n * b:(n + 1) * b]
            # first row is the kernel, each row the previous one shifted right (wrapped): a circulant
            _close(block[0], kernel[m, n] / layer.in_features, atol=1e-8)
            for j in range(1, b):
                _close(block[j], torch.roll(block[j - 1], 1), atol=0, rtol=0)
        xs = x[..., : layer.in_features]
        _close(layer.delta_forward(xs).detach(), xs @ delta.t(), atol=1e-6)
        assert torch.linalg.matrix_rank(delta) > 4  # high rank, unlike a rank-4 LoRA of the same size


def test_c3a_block_size_defaults_to_the_gcd_and_must_divide_the_layer():
    model = rw.adapt(make_tiny_llama(0), "c3a")
    for _, layer in rw.adapter_layers(model):
        assert layer.block_size == {(32, 32): 32, (16, 32): 16, (64, 32): 32, (32, 64): 32}[
            (layer.out_features, layer.in_features)]
    with pytest.raises(ValueError, match="block_size=5 must divide in_features=32 and out_features=32"):
        rw.adapt(make_tiny_llama(0), "c3a", block_size=5)
    with pytest.raises(ValueError, match="kernel_init='normal' is not allowed"):
        rw.adapt(make_tiny_llama(0), "c3a", kernel_init="normal")


@pytest.mark.parametrize("init", ["xavier_uniform", "kaiming_uniform"])
def test_c3a_init_draws_peft_bounds(init):
    model = rw.adapt(make_tiny_llama(0), "c3a", block_size=8, kernel_init=init)
    for _, layer in rw.adapter_layers(model):
        fan = layer.in_features + layer.out_features if init == "xavier_uniform" else 6 * layer.in_features
        bound = (6.0 / fan) ** 0.5
        assert layer.c3a_kernel.abs().max() <= bound and layer.c3a_kernel.abs().max() > 0.8 * bound


def test_c3a_matches_peft():
    cfg = peft.C3AConfig(block_size=8, target_modules=TARGETS)
    pm, mine = _pair(cfg, "c3a", block_size=8)
    pairs = []
    with torch.no_grad():
        for name, layer in rw.adapter_layers(mine):
            pl = _peft_layer(pm, name)
            pk = pl.c3a_kernel["default"]
            pk.mul_(100.0)  # ΔW ~ 1/in: large enough to move the loss
            layer.c3a_kernel.copy_(pk)
            pairs.append((layer.c3a_kernel, pk))
            _close(layer.delta_weight(), pl.get_delta_weight("default"), atol=1e-6)
    batch = lm_batches()[2]
    with torch.no_grad():
        assert (mine(**batch).loss - make_tiny_llama(0)(**batch).loss).abs() > 1e-3
    # PEFT's hand-written backward gets the kernel gradient right but not the input gradient (see
    # test_c3a_gradients_are_those_of_the_dense_matmul), so only the last adapted layer, which no other
    # C³A layer sits above, has the same kernel gradient in both
    check_peft_parity(pm, mine, pairs, batch, graded=slice(-1, None))


def test_c3a_gradients_are_those_of_the_dense_matmul():
    """The FFT forward's gradients (kernel and input) equal those of x·ΔWᵀ with the materialised ΔW."""
    layer = rw.adapter_layers(rw.adapt(make_tiny_llama(0), "c3a", block_size=8, kernel_init="gaussian"))[0][1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, layer.in_features, generator=g, requires_grad=True)
    up = torch.randn(4, layer.out_features, generator=g)
    (layer.delta_forward(x) * up).sum().backward()
    fft_grads = x.grad.clone(), layer.c3a_kernel.grad.clone()
    x.grad, layer.c3a_kernel.grad = None, None
    (torch.nn.functional.linear(x, layer.delta_weight()) * up).sum().backward()
    _close(fft_grads[0], x.grad, atol=1e-6)
    _close(fft_grads[1], layer.c3a_kernel.grad, atol=1e-6)
