"""S²FT (Yang et al. 2024): co-permuting the coupled layers keeps the function, the trainable block is the
dense slice of the selected columns with the full gradient's values there, and only the selected heads' /
channels' weights change."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.adapters.s2ft import expand, unit_order
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, lm_batches, make_tiny_bert, make_tiny_llama


def make_bert(seed: int = 0):
    """The tiny BERT with non-zero biases (BERT initializes them to 0), so a bias left unpermuted shows."""
    model = make_tiny_bert(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5, generator=g)
    return model


CASES = {  # model, batches, options: Llama with grouped-query attention (2 query heads per unit), BERT with biases
    "llama": (make_tiny_llama, lm_batches, {"r": 5, "heads": 1}),
    "bert": (make_bert, cls_batches, {"r": 5, "heads": 2}),
}


def _selected(layer) -> torch.Tensor:
    """The original column indices of a consumer's trainable block (its selected units, expanded)."""
    c = layer.config
    return expand(unit_order(c.seed, c.key, c.units, c.selected)[: c.selected], c.unit)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_co_permutation_keeps_the_function_and_puts_the_selection_first(kind):
    make, batches, options = CASES[kind]
    model, base = rw.adapt(make(0), "s2ft", **options), make(0)
    batch = batches(seed=3)[0]
    torch.testing.assert_close(model(**batch).logits, base(**batch).logits, atol=1e-5, rtol=1e-5)
    consumers = [(n, m) for n, m in rw.adapter_layers(model) if m.config.side == "cols"]
    assert len(consumers) == 4  # o and the MLP's output projection of 2 blocks
    for name, layer in consumers:
        cols = _selected(layer)
        assert layer.s2ft_block.shape == (layer.out_features, cols.numel())
        # the block trains the contiguous slice W[:, :k], which holds W₀'s selected columns
        assert torch.equal(layer.base_weight[:, : cols.numel()], base.get_submodule(name).weight[:, cols])


@pytest.mark.parametrize("kind", sorted(CASES))
def test_block_gradient_is_the_full_gradient_on_the_selected_columns(kind):
    make, batches, options = CASES[kind]
    model, base = rw.adapt(make(0), "s2ft", **options), make(0)
    batch = batches(seed=4)[0]
    consumers = [(n, m) for n, m in rw.adapter_layers(model) if m.config.side == "cols"]
    for name, _ in consumers:
        base.get_submodule(name).weight.requires_grad_(True)
    base(**batch).loss.backward()
    model(**batch).loss.backward()
    for name, layer in consumers:
        full = base.get_submodule(name).weight.grad
        torch.testing.assert_close(layer.s2ft_block.grad, full[:, _selected(layer)], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_training_changes_only_the_selected_columns(kind, tmp_path):
    make, batches, options = CASES[kind]
    model, base = rw.adapt(make(0), "s2ft", **options), make(0)
    data = batches(seed=5)
    train(model, data, config=TrainConfig(max_steps=3, lr=1e-2, progress=False, measure_memory=False))
    expected = model(**data[0]).logits
    rw.save_adapter(model, tmp_path / "s2ft")
    fresh = rw.load_adapter(make(0), tmp_path / "s2ft")
    torch.testing.assert_close(fresh(**data[0]).logits, expected, atol=1e-5, rtol=1e-5)
    selected = {n: _selected(m) for n, m in rw.adapter_layers(model) if m.config.side == "cols"}
    head = set(rw.adapter_state(model).trainable_modules)
    plain = rw.merge_and_unload(model)
    torch.testing.assert_close(plain(**data[0]).logits, expected, atol=1e-5, rtol=1e-5)
    before = dict(base.named_parameters())
    for name, p in plain.named_parameters():
        module = name.rsplit(".", 1)[0]
        if name.split(".")[0] in head:
            continue
        if module not in selected or name.endswith("bias"):
            assert torch.equal(p, before[name]), name  # q, k, v, gate, up, biases: bit for bit (order restored)
            continue
        changed = (p != before[name]).any(dim=0).nonzero().flatten()
        assert changed.numel() > 0 and torch.isin(changed, selected[module]).all(), name


def test_unload_gives_back_the_original_model():
    model = rw.adapt(make_bert(0), "s2ft", r=3, heads=1)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            if layer.config.side == "cols":
                layer.s2ft_block.normal_()
    plain, base = rw.unload(model), make_bert(0)
    for (name, p), (_, q) in zip(plain.named_parameters(), base.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="r=65 exceeds the 64 MLP channels"):
        rw.adapt(make_tiny_llama(0), "s2ft", r=65)
    with pytest.raises(ValueError, match="heads=3 exceeds the 2 attention units"):
        rw.adapt(make_tiny_llama(0), "s2ft", r=2, heads=3)
    with pytest.raises(ValueError, match="targets= leaves out"):
        rw.adapt(make_tiny_llama(0), "s2ft", targets=["down_proj"], r=2)
    with pytest.raises(ValueError, match="rewrites the base weight"):  # the permuted base cannot be shared
        rw.adapt(rw.adapt(make_tiny_llama(0), "lora", r=2), "s2ft", r=2, name="b")
    with pytest.raises(ValueError, match="side="):
        rw.adapt(make_tiny_llama(0), "s2ft", side="diagonal")


def test_backward_saves_only_the_selected_input_columns():
    """Partial back-propagation: the consumer keeps x[..., :k] (tokens × k) for the block's gradient, never
    the full input (the frozen base needs no activation for its own weight)."""
    model = rw.adapt(make_tiny_llama(0), "s2ft", r=5)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(3, 7, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    activations = [t for t in saved if t.untyped_storage().data_ptr() not in
                   {p.untyped_storage().data_ptr() for p in layer.parameters()}]
    assert [t.numel() for t in activations] == [3 * 7 * 5]
    assert all(t.untyped_storage().nbytes() == 3 * 7 * 5 * 4 for t in activations)
