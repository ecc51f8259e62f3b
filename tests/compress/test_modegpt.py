"""MoDeGPT (Lin et al. 2025): no backward pass; every module's inner dimension is the target fraction;
the physically smaller modules reconstruct their calibration outputs better than plain weight SVD at
the same size; and each module's decomposition is the paper's (Nyström with ridge-leverage channels and
a least-squares refit, CR scores from the query/key correlations with RoPE pairs kept together,
input-whitened SVD for value-output)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.compress.modegpt import ModularAttention, cr_pairs, nystrom_mlp, svd_value_output

from ..conftest import cls_batches, lm_batches, make_tiny_bert, make_tiny_llama
from .anisotropic import trained_anisotropic_llama


@pytest.fixture(scope="module")
def trained():
    return trained_anisotropic_llama(epochs=3)


def _module_inputs(model, data):
    """Per layer, the attention keyword inputs and the MLP inputs of ``model`` on ``data``."""
    got: dict = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kw, i=i: got.setdefault(("attn", i), []).append(kw), with_kwargs=True))
        handles.append(layer.mlp.register_forward_pre_hook(
            lambda mod, args, i=i: got.setdefault(("mlp", i), []).append(args[0])))
    with torch.no_grad():
        for batch in data:
            model(**batch, use_cache=False)
    for h in handles:
        h.remove()
    return got


def _module_errors(reference, other, inputs):
    """Relative squared error of every attention and MLP module's outputs (summed over layers)."""
    errors = {}
    with torch.no_grad():
        for kind in ("attn", "mlp"):
            num = den = 0.0
            for i, (ref_layer, layer) in enumerate(zip(reference.model.layers, other.model.layers, strict=True)):
                for x in inputs[(kind, i)]:
                    if kind == "attn":
                        a, b = ref_layer.self_attn(**x)[0], layer.self_attn(**x)[0]
                    else:
                        a, b = ref_layer.mlp(x), layer.mlp(x)
                    num += float((a - b).square().sum())
                    den += float(a.square().sum())
            errors[kind] = num / den
    return errors


def test_no_backward_pass_and_inner_dimensions(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("MoDeGPT ran a backward pass")

    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "grad", refuse)
    model = make_tiny_llama(0)  # d 32, MLP 64, 4 heads of 8, 2 key-value heads
    for p in model.parameters():
        p.requires_grad_(True)
    rw.compress(model, "modegpt", ratio=0.5, data=lm_batches(2))
    assert all(p.grad is None for p in model.parameters())
    state = model.rankwise_compress
    assert state.kept_fraction == 0.5
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert isinstance(attn, ModularAttention) and (attn.qk_dim, attn.v_dim) == (4, 4)
        assert (attn.q_proj.out_features, attn.k_proj.out_features) == (16, 8)
        assert (attn.v_proj.out_features, attn.o_proj.in_features) == (8, 16)
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 32
    out = model(**lm_batches(1)[0])
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_module_outputs_beat_weight_svd_at_the_same_size(trained, ratio):
    model, data = trained
    inputs = _module_inputs(model, data[:4])
    modegpt = rw.compress(copy.deepcopy(model), "modegpt", ratio=ratio, data=data[:4])
    svd = rw.compress(copy.deepcopy(model), "svd", ratio=ratio + 0.05)  # at least as many weights
    assert modegpt.rankwise_compress.kept_fraction <= svd.rankwise_compress.kept_fraction
    ours, baseline = _module_errors(model, modegpt, inputs), _module_errors(model, svd, inputs)
    assert ours["attn"] < 0.3 * baseline["attn"]
    assert ours["mlp"] < 0.2 * baseline["mlp"]
    with torch.no_grad():
        held_out = [float(m(**data[6]).loss) for m in (model, modegpt, svd)]
    assert held_out[1] - held_out[0] < 0.5 * (held_out[2] - held_out[0])


def _mlp(seed=0, d=12, n=24):
    torch.manual_seed(seed)
    return nn.Linear(d, n, bias=False).double(), nn.Linear(d, n, bias=False).double(), \
        nn.Linear(n, d, bias=False).double()


def test_mlp_keeps_ridge_leverage_channels_and_refits_down_by_least_squares():
    """Channels 0..7 carry 100x the activation energy of the rest but the *smallest* weights: the
    leverage scores of the activation correlation keep them, and down becomes the least-squares map
    from the kept activations to the original outputs."""
    gate, up, down = _mlp()
    with torch.no_grad():
        for lin in (gate, up):
            lin.weight[8:] *= 3.0
        down.weight[:, 8:] *= 3.0
    x = torch.randn(400, 12, dtype=torch.float64)
    act = nn.functional.silu(x @ gate.weight.T) * (x @ up.weight.T)
    energy = torch.ones(24, dtype=torch.float64)
    energy[:8] = 100.0
    act = act / act.norm(dim=0) * energy.sqrt()  # rescale each channel's activations ...
    y = act @ down.weight.T
    corr = act.T @ act
    nystrom_mlp(gate, up, down, corr, 8, ridge=1.0)
    assert gate.weight.shape == (8, 12) and down.weight.shape == (12, 8)
    torch.testing.assert_close(gate.weight, _mlp()[0].weight[:8] * 1.0)
    best = torch.linalg.lstsq(act[:, :8], y).solution.T
    torch.testing.assert_close(down.weight, best, rtol=1e-6, atol=1e-8)


def test_key_query_pairs_follow_the_correlation_cr_scores():
    """Input directions with large energy make some query/key rows dominant although their weights are
    small; the CR scores (C_q,ii·C_k,ii summed over a group's query heads and the RoPE pair) pick them."""
    torch.manual_seed(0)
    d, heads, kv_heads, head_dim = 16, 4, 2, 8
    q = torch.randn(heads * head_dim, d, dtype=torch.float64)
    k = torch.randn(kv_heads * head_dim, d, dtype=torch.float64)
    scale = torch.ones(d, dtype=torch.float64)
    scale[:2] = 30.0  # two loud input features ...
    q[:, :2] *= 0.05  # ... that the weights barely read, except dimensions 1 and 5 (a RoPE pair) of each
    k[:, :2] *= 0.05  # head, whose rows read nothing else: the rows with the smallest weights
    for w, n in ((q, heads), (k, kv_heads)):
        for h in range(n):
            for row in (h * head_dim + 1, h * head_dim + 5):
                w[row, :2], w[row, 2:] = 1.0, 0.0
    x = torch.randn(500, d, dtype=torch.float64) * scale
    corr = x.T @ x
    kept = cr_pairs(q, k, corr, heads, kv_heads, head_dim, 1)
    assert kept.tolist() == [[1], [1]]
    qs, ks = (x @ q.T).square().sum(0).view(kv_heads, 2, head_dim), (x @ k.T).square().sum(0).view(kv_heads, 1,
                                                                                                  head_dim)
    expect = (qs * ks).sum(1).view(kv_heads, 2, head_dim // 2).sum(1).topk(2, dim=1).indices.sort(dim=1).values
    torch.testing.assert_close(cr_pairs(q, k, corr, heads, kv_heads, head_dim, 2), expect)


def test_value_output_is_the_whitened_svd_optimum():
    """‖X (W_vᵀW_oᵀ − Ŵ_vᵀŴ_oᵀ)‖² per key-value group equals the tail Σ_{i>k} σ_i² of C_x^{1/2}W_vᵀ[W_o,hᵀ…]."""
    torch.manual_seed(1)
    d, heads, kv_heads, head_dim, rank = 16, 4, 2, 8, 3
    v = nn.Linear(d, kv_heads * head_dim, bias=False).double()
    o = nn.Linear(heads * head_dim, d, bias=False).double()
    x = torch.randn(300, d, dtype=torch.float64) * torch.logspace(1, -1, d, dtype=torch.float64)
    corr = x.T @ x
    joint = []
    for g in range(kv_heads):
        w_o = [o.weight[:, h * head_dim:(h + 1) * head_dim].detach() for h in (2 * g, 2 * g + 1)]
        joint.append(v.weight[g * head_dim:(g + 1) * head_dim].detach().T @ torch.cat([m.T for m in w_o], 1))
    svd_value_output(v, o, corr, heads, kv_heads, head_dim, rank, eps=1e-12)
    assert v.weight.shape == (kv_heads * rank, d) and o.weight.shape == (d, heads * rank)
    for g in range(kv_heads):
        w_o = [o.weight[:, h * rank:(h + 1) * rank].detach() for h in (2 * g, 2 * g + 1)]
        approx = v.weight[g * rank:(g + 1) * rank].detach().T @ torch.cat([m.T for m in w_o], 1)
        err = float((x @ (joint[g] - approx)).square().sum())
        values, vectors = torch.linalg.eigh(corr)
        s = torch.linalg.svdvals((vectors * values.sqrt()) @ vectors.T @ joint[g])
        assert err == pytest.approx(float(s[rank:].square().sum()), rel=1e-6)
        plain = torch.linalg.svd(joint[g])
        weight_only = (plain.U[:, :rank] * plain.S[:rank]) @ plain.Vh[:rank]
        assert err < 0.9 * float((x @ (joint[g] - weight_only)).square().sum())


def test_smaller_attention_equals_the_dense_attention_with_zeroed_dimensions():
    """ModularAttention (kept RoPE pairs gathered, smaller heads) computes exactly the original Llama
    attention whose dropped query/key dimensions and value/output widths are zero."""
    model = make_tiny_llama(0)
    dense = copy.deepcopy(model)
    rw.compress(model, "modegpt", ratio=0.5, data=lm_batches(2))
    with torch.no_grad():
        for layer, ref in zip(model.model.layers, dense.model.layers, strict=True):
            attn, full = layer.self_attn, ref.self_attn
            hd = attn.head_dim
            q = torch.zeros_like(full.q_proj.weight).view(attn.heads, hd, -1)
            k = torch.zeros_like(full.k_proj.weight).view(attn.kv_heads, hd, -1)
            v = torch.zeros_like(full.v_proj.weight).view(attn.kv_heads, hd, -1)
            o = torch.zeros_like(full.o_proj.weight).view(-1, attn.heads, hd)
            index = attn.rotary_index
            for h in range(attn.heads):
                q[h, index[h // attn.num_key_value_groups]] = attn.q_proj.weight.view(attn.heads, attn.qk_dim, -1)[h]
                o[:, h, :attn.v_dim] = attn.o_proj.weight.view(-1, attn.heads, attn.v_dim)[:, h]
            for g in range(attn.kv_heads):
                k[g, index[g]] = attn.k_proj.weight.view(attn.kv_heads, attn.qk_dim, -1)[g]
                v[g, :attn.v_dim] = attn.v_proj.weight.view(attn.kv_heads, attn.v_dim, -1)[g]
            for lin, w in ((full.q_proj, q), (full.k_proj, k), (full.v_proj, v), (full.o_proj, o)):
                lin.weight.copy_(w.reshape(lin.weight.shape))
            ref.mlp = layer.mlp
    batch = lm_batches(1, seed=3)[0]
    torch.testing.assert_close(model(**batch).logits, dense(**batch).logits, rtol=1e-5, atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="modegpt needs data"):
        rw.compress(make_tiny_llama(0), "modegpt")
    with pytest.raises(ValueError, match="targets must be 'all-linear' for modegpt"):
        rw.compress(make_tiny_llama(0), "modegpt", targets=["q_proj"], data=lm_batches(1))
    with pytest.raises(ValueError, match="modegpt needs Llama-style blocks"):
        rw.compress(make_tiny_bert(0), "modegpt", data=cls_batches(1))
    with pytest.raises(ValueError, match="ridge=0"):
        rw.compress(make_tiny_llama(0), "modegpt", data=lm_batches(1), ridge=0)
