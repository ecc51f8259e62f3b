"""ResLoRA (block shortcut): block l runs its own LoRA block and those of its pre_num predecessors of the
same module type on its input, so the predecessors get gradient through layer l too (the residual
edges); the merged model is the same function with no cross-layer edges left; no extra parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.reslora import ResLoRAConfig, module_type

from ..conftest import make_tiny_llama


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)


class _Stack(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_Block() for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block.fc(x))
        return x


def _adapted(n: int = 3, **config) -> tuple[_Stack, list]:
    model = _Stack(n)
    rw.adapt(model, "reslora", ["fc"], **config)
    layers = [layer for _, layer in rw.adapter_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_()
    return model, layers


def test_chains_link_the_preceding_blocks_of_the_same_type():
    assert module_type("model.layers.11.self_attn.q_proj") == "model.layers.*.self_attn.q_proj"
    model = make_tiny_llama()
    rw.adapt(model, "reslora", ["q_proj", "v_proj"], r=2)
    q0, q1 = (model.model.layers[i].self_attn.q_proj for i in (0, 1))
    v1 = model.model.layers[1].self_attn.v_proj
    assert q0.previous == () and q1.previous == (q0,)
    assert v1.previous == (model.model.layers[0].self_attn.v_proj,)
    # no extra parameters: each layer owns exactly LoRA's A and B
    assert sorted(n for n, p in q1.named_parameters() if p.requires_grad) == ["lora_A", "lora_B"]
    _, layers = _adapted(4, r=2, pre_num=2)
    assert [len(layer.previous) for layer in layers] == [0, 1, 2, 2]
    assert layers[3].previous == (layers[2], layers[1])


def test_forward_and_gradients_follow_the_residual_paths():
    model, layers = _adapted(3, r=2, alpha=4.0)
    x = torch.randn(5, 6)
    out = model(x)
    out.square().sum().backward()
    params = [(layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True))
              for layer in layers]
    h = x
    for i, layer in enumerate(layers):
        terms = [params[j][1] @ params[j][0] for j in range(max(0, i - 1), i + 1)]  # own + the previous block
        w = layer.base_weight + 2.0 * sum(terms)
        h = torch.tanh(h @ w.t() + layer.base_layer.bias)
    torch.testing.assert_close(out, h)
    h.square().sum().backward()
    for layer, (a, b) in zip(layers, params, strict=True):
        torch.testing.assert_close(layer.lora_A.grad, a.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_merged_model_is_the_same_function_without_cross_layer_edges():
    model, layers = _adapted(3, r=2)
    x = torch.randn(5, 6)
    expected = model(x).detach()
    for layer in layers:
        layer.merge()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # merged: block 0's factors no longer reach block 1 (nor itself)
        layers[0].lora_B.zero_()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [{"pre_num": 0}, {"init": "loftq"}])
def test_bad_options_name_the_parameter(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ResLoRAConfig(**bad)
