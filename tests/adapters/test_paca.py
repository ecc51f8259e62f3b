"""PaCA (Woo et al. 2025): r random input columns of each weight train in place with the scale s = α/r;
only those columns change and only x[..., idx] is saved for backward."""

from __future__ import annotations

import torch

import rankwise as rw
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama

R, ALPHA, LR = 3, 12.0, 1e-2  # s = 4


def _official_step_model(model, data, steps):
    """PaCA written as the paper's layer: P = W₀[:, idx]/s trained, W[:, idx] = s·P in the forward."""
    layers = {n: m for n, m in rw.adapter_layers(model)}
    ref = make_tiny_llama(0)
    s = ALPHA / R
    params = {}
    for name, layer in layers.items():
        lin = ref.get_submodule(name)
        lin.weight.requires_grad_(False)
        idx = layer.paca_columns
        params[name] = torch.nn.Parameter(lin.weight[:, idx].clone() / s)

        def forward(x, lin=lin, idx=idx, p=params[name]):
            w = lin.weight.index_copy(1, idx, s * p)
            return torch.nn.functional.linear(x, w, lin.bias)

        lin.forward = forward
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)
    for batch in data[:steps]:
        ref(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: ref.get_submodule(n).weight.index_copy(1, layers[n].paca_columns, s * p.detach())
            for n, p in params.items()}


def test_training_equals_the_official_in_place_update_of_the_selected_columns():
    data = lm_batches(seed=6)
    model = rw.adapt(make_tiny_llama(0), "paca", r=R, alpha=ALPHA)
    expected = _official_step_model(model, data, 3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    train(model, data[:3], optimizer=opt, config=TrainConfig.plain(3))
    base = make_tiny_llama(0)
    for name, layer in rw.adapter_layers(model):
        w = layer.base_weight + layer.delta_weight()
        torch.testing.assert_close(w, expected[name], atol=1e-6, rtol=1e-5)
        changed = (w != base.get_submodule(name).weight).any(dim=0).nonzero().flatten()
        assert changed.numel() > 0 and torch.isin(changed, layer.paca_columns).all(), name  # only idx moved


def test_backward_saves_only_the_selected_input_columns():
    model = rw.adapt(make_tiny_llama(0), "paca", r=R)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {layer.paca_columns.data_ptr()}
    activations = [t for t in saved if t.untyped_storage().data_ptr() not in params]
    assert [t.untyped_storage().nbytes() for t in activations] == [2 * 5 * R * 4]


def test_columns_are_distinct_and_seeded_per_layer(tmp_path):
    model = rw.adapt(make_tiny_llama(0), "paca", r=R, seed=1)
    columns = {n: m.paca_columns.clone() for n, m in rw.adapter_layers(model)}
    assert all(c.unique().numel() == R for c in columns.values())
    assert len({tuple(c.tolist()) for c in columns.values()}) > 1
    again = rw.adapt(make_tiny_llama(0), "paca", r=R, seed=1)
    assert all(torch.equal(m.paca_columns, columns[n]) for n, m in rw.adapter_layers(again))
