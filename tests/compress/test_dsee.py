"""Faithful tests of two method variants: LoRD's data-aware (output-covariance) decomposition and
DSEE's structured (attention-head) final sparsity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import rankwise as rw
from rankwise.compress.dsee import DSEEConfig, attention_blocks, dsee_finetune, dsee_prune
from rankwise.compress.factorized import FactorizedLinear
from rankwise.compress.lord import lord_compress, output_grams

from ..conftest import VOCAB, cls_batches, lm_batches, make_tiny_bert, make_tiny_llama


# ---------------------------------------------------------------------------------------- LoRD
class Proj(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.proj.weight.copy_(weight)
            self.proj.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _proj_case(x: torch.Tensor, rank: int = 4) -> dict:
    """Compress one 24×16 linear at ``rank`` data-free and data-aware on inputs ``x`` (n×16)."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    calibration = list(x.view(4, -1, 16).split(1))  # 4 batches of shape [1, n/4, 16]
    free, aware = Proj(weight, bias), Proj(weight, bias)
    grams = output_grams(aware, {"proj": aware.proj}, calibration)
    lord_compress(free, 0.5, ["proj"], rank=rank)
    lord_compress(aware, 0.5, ["proj"], rank=rank, calibration=calibration)
    y = x.double() @ weight.double().T

    def error(model: Proj) -> float:
        layer = model.proj
        assert isinstance(layer, FactorizedLinear) and layer.U.shape == (24, rank)
        torch.testing.assert_close(layer.bias, bias)  # the bias stays
        product = (layer.U @ layer.V).detach().double()
        return float(torch.linalg.norm(y - x.double() @ product.T))

    return {"free": free, "aware": aware, "weight": weight, "y": y, "gram": grams["proj"],
            "err_free": error(free), "err_aware": error(aware)}


def test_lord_data_aware_factors_minimize_output_error_on_anisotropic_inputs():
    g = torch.Generator().manual_seed(1)
    scales = torch.logspace(1, -2, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    x = (torch.randn(200, 16, generator=g) * scales) @ rotation  # strongly anisotropic inputs
    case = _proj_case(x, rank=4)
    y = case["y"]
    # the hook saw exactly the outputs W x (bias removed), summed over all calibration tokens
    torch.testing.assert_close(case["gram"], y.T @ y, rtol=1e-4, atol=1e-3)  # fp32 forward
    layer = case["aware"].proj
    assert torch.linalg.matrix_rank(layer.U.double() @ layer.V.double()) == 4
    # Eckart–Young on Y: the error is exactly the energy of Y outside its top-4 principal directions
    tail = torch.linalg.eigvalsh(y.T @ y)[:-4].sum().sqrt()
    assert case["err_aware"] == pytest.approx(float(tail), rel=1e-4)
    assert case["err_aware"] < 0.5 * case["err_free"]  # strictly better than the weight SVD here


def test_lord_data_aware_equals_svd_on_isotropic_inputs():
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(200, 16, generator=g))
    x = q * 200**0.5  # XᵀX = n·I exactly (whitened)
    case = _proj_case(x, rank=4)
    assert case["err_aware"] == pytest.approx(case["err_free"], rel=1e-4)
    aware, free = case["aware"].proj, case["free"].proj
    torch.testing.assert_close(aware.U @ aware.V, free.U @ free.V, atol=1e-4, rtol=1e-4)


def _pattern_batches(n: int, seed: int, batch: int = 8, seq: int = 16) -> list[dict]:
    """Arithmetic token sequences: a tiny Llama learns them in a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(1, VOCAB, (batch, 1), generator=g)
        step = torch.randint(1, 4, (batch, 1), generator=g)
        ids = (start + step * torch.arange(seq)) % (VOCAB - 1) + 1
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _trained_anisotropic_llama() -> tuple[nn.Module, list[dict]]:
    """A tiny Llama whose RMSNorm gains span 100× (anisotropic layer inputs, like the outlier
    features of real LLMs; frozen), trained briefly so that compression visibly hurts."""
    model = make_tiny_llama(0)
    g = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if name.endswith("layernorm"):
            module.weight.data = torch.logspace(0.5, -1.5, 32)[torch.randperm(32, generator=g)]
            module.weight.requires_grad_(False)
    data = _pattern_batches(8, seed=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        for batch in data:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    return model.eval(), data[:4]


@torch.no_grad()
def _loss(model: nn.Module, batches: list[dict]) -> float:
    return sum(model(**b).loss.item() for b in batches) / len(batches)


def test_lord_data_aware_whole_model_beats_data_free_in_one_pass():
    base, calibration = _trained_anisotropic_llama()
    free, aware = copy.deepcopy(base), copy.deepcopy(base)
    calls = []
    aware.register_forward_hook(lambda *args: calls.append(1))
    ranks_free = lord_compress(free, 0.5)
    ranks_aware = lord_compress(aware, 0.5, calibration=calibration)
    assert ranks_free == ranks_aware and any(r is not None for r in ranks_aware.values())
    assert len(calls) == len(calibration)  # one forward pass over the calibration batches
    assert not any(m._forward_hooks for m in aware.model.modules())  # hooks removed
    assert all(p.requires_grad for n, p in aware.named_parameters() if n.endswith((".U", ".V")))
    assert _loss(aware, calibration) < _loss(free, calibration) - 0.05
    # the same through rw.compress: data= makes lord data-aware and the report says so
    via_api = rw.compress(copy.deepcopy(base), "lord", ratio=0.5, data=calibration)
    assert via_api.rankwise_compress.details["decomposition"] == "output-covariance"
    assert _loss(via_api, calibration) == pytest.approx(_loss(aware, calibration), abs=1e-5)
    assert rw.compress(copy.deepcopy(base), "lord", ratio=0.5).rankwise_compress.details["decomposition"] == "svd"


def test_lord_data_aware_bad_calibration():
    with pytest.raises(ValueError, match="calibration yielded no batch"):
        lord_compress(make_tiny_llama(0), 0.5, calibration=[])


# ---------------------------------------------------------------------------------------- DSEE heads
def _mha_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def _plant(model: nn.Module, head_scales: list[list[float]], kv_updates: bool = True,
           weight_boost: float = 1.0) -> None:
    """Give each block's q/o (and k/v) updates per-head ℓ1 mass proportional to ``head_scales[block]``;
    multiply W₀ of the low-update half of the heads by ``weight_boost`` (so |W₀| ranks them the other way)."""
    g = torch.Generator().manual_seed(3)
    for block, scales in zip(attention_blocks(model), head_scales, strict=True):
        d = block.head_dim
        c = torch.tensor(scales).repeat_interleave(d)
        low = torch.tensor(scales).argsort()[: len(scales) // 2]
        boost = torch.ones(len(scales)).index_fill(0, low, weight_boost).repeat_interleave(d)
        for layer in (block.q, block.k, block.v, block.o):
            layer.sparse_values.zero_()
            layer.lora_A.copy_(torch.rand(layer.lora_A.shape, generator=g) + 0.5)
            layer.lora_B.copy_(0.01 * (torch.rand(layer.lora_B.shape, generator=g) + 0.5))
        for layer in (block.q, block.k, block.v):
            if layer is block.q or kv_updates:
                layer.lora_B.mul_(c[: layer.out_features, None])
            else:
                layer.lora_B.zero_()
            layer.base_layer.weight.mul_(boost[: layer.out_features, None])
        block.o.lora_A.mul_(c[None, :])
        block.o.base_layer.weight.mul_(boost[None, :])


def _zero_heads(model: nn.Module, prefix: str, heads: int, d: int, kind: str) -> set[int]:
    """Heads whose slice of the merged module ``kind`` (q/k/v rows or o columns) is all exactly 0."""
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
    w = model.get_submodule(prefix + names[kind]).weight
    w = w.T if kind == "o" else w
    return {h for h in range(w.shape[0] // d) if torch.all(w[h * d : (h + 1) * d] == 0)}


def test_dsee_heads_prunes_the_least_important_whole_heads():
    model = _mha_llama(0)
    rw.adapt(model, "dsee", r=2, nnz=4, structure="heads")
    scales = [[3.0, 0.1, 2.0, 0.5], [0.2, 4.0, 0.3, 1.0]]  # least important: {1, 3} and {0, 2}
    _plant(model, scales, weight_boost=20.0)  # |W₀| is largest exactly on those heads
    other = copy.deepcopy(model)
    for _, layer in rw.adapter_layers(other):
        layer.config = DSEEConfig(r=2, nnz=4, structure="heads", head_score="weight_update")
    mlp_before = model.model.layers[0].mlp.up_proj.base_layer.weight.clone()
    assert dsee_prune(model, 0.5) == 4  # round(0.5·4) heads in each of the 2 blocks
    assert dsee_prune(other, 0.5) == 4
    rw.merge_and_unload(model)
    rw.merge_and_unload(other)
    for i, expected in enumerate([{1, 3}, {0, 2}]):
        prefix = f"model.layers.{i}."
        for kind in "qkvo":  # whole heads: q, k, v rows and o columns exactly 0, nothing else
            assert _zero_heads(model, prefix, 4, 8, kind) == expected
        # the |W₀| + |ΔW| score keeps the heavy-weight heads and prunes the others instead
        assert _zero_heads(other, prefix, 4, 8, "q") == {0, 1, 2, 3} - expected
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, mlp_before)  # MLP untouched


def test_dsee_heads_with_grouped_query_attention():
    model = make_tiny_llama(0)  # 4 query heads, 2 key-value heads
    rw.adapt(model, "dsee", r=2, nnz=4, structure="heads")
    _plant(model, [[0.1, 0.2, 3.0, 2.0], [0.1, 3.0, 0.2, 2.0]], kv_updates=False)
    assert dsee_prune(model, 0.5) == 4
    rw.merge_and_unload(model)
    # block 0 pruned a whole group {0, 1}: its key-value head 0 goes too; block 1 pruned {0, 2}: none
    assert _zero_heads(model, "model.layers.0.", 4, 8, "q") == {0, 1}
    assert _zero_heads(model, "model.layers.0.", 4, 8, "k") == {0}
    assert _zero_heads(model, "model.layers.0.", 4, 8, "v") == {0}
    assert _zero_heads(model, "model.layers.1.", 4, 8, "o") == {0, 2}
    assert _zero_heads(model, "model.layers.1.", 4, 8, "k") == set()


def test_dsee_heads_finetune_save_load_and_compress(tmp_path):
    model = _mha_llama(0)
    rw.adapt(model, "dsee", r=2, nnz=4, structure="heads")
    dsee_finetune(model, lm_batches(2), steps=2, sparsity=0.25, prune_at=0.5, lr=1e-2)
    for block in attention_blocks(model):
        assert int((~block.q.keep_mask.all(1)).view(4, 8).all(1).sum()) == 1  # round(0.25·4) heads
    batch = lm_batches(1, seed=5)[0]
    expected = model(**batch).logits
    rw.save_adapter(model, tmp_path / "dsee_heads")
    fresh = rw.load_adapter(_mha_llama(0), tmp_path / "dsee_heads")
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    # through rw.compress (the option passes through as a DSEEConfig field); BERT-style blocks
    bert = rw.compress(make_tiny_bert(0), "dsee", ratio=0.5, data=cls_batches(1), steps=1, r=2, nnz=4,
                       structure="heads")
    for i in range(2):
        q = bert.bert.encoder.layer[i].attention.self.query.weight
        assert sum(bool(torch.all(q[h * 8 : (h + 1) * 8] == 0)) for h in range(4)) == 2


def test_dsee_structure_bad_values():
    with pytest.raises(ValueError, match="structure='rows' is not allowed"):
        DSEEConfig(structure="rows")
    with pytest.raises(ValueError, match="head_score='grad' is not allowed"):
        DSEEConfig(head_score="grad")
    model = _mha_llama(0)
    rw.adapt(model, "dsee", targets=["q_proj", "v_proj"], r=2, nnz=4, structure="heads")
    with pytest.raises(ValueError, match="k_proj' has none"):
        dsee_prune(model, 0.5)
