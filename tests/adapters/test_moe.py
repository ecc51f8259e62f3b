"""LoRA on 3-D MoE expert parameters (``target_parameters``, ``adapters/experts.py``).

Faithfulness: the expected model is built here independently: a copy of the base model whose expert
parameters are written, expert by expert, as W[e] + s·B[e]·A[e] (Mixtral / Qwen-MoE layout (E, out, in))
or W[e] + (s·B[e]·A[e])ᵀ (GPT-OSS, ``is_transposed``: (E, in, out)); mixing up experts, a missing or
extra transpose, or a wrong scale changes its logits. PEFT parity both ways on the same models.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import rankwise as rw

PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def make_mixtral(seed: int = 0) -> MixtralForCausalLM:
    """Hidden 16, intermediate 12: gate_up_proj (4, 24, 16), down_proj (4, 16, 12) (no square expert)."""
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval()


def make_gpt_oss(seed: int = 0) -> GptOssForCausalLM:
    """Transposed experts (``is_transposed``): gate_up_proj (4, 16, 24), down_proj (4, 12, 16)."""
    cfg = GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                       max_position_embeddings=32, sliding_window=8)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GptOssForCausalLM(cfg).eval()


def make_qwen3_moe(seed: int = 0) -> Qwen3MoeForCausalLM:
    """Qwen3-MoE's experts: the Mixtral layout with moe_intermediate_size 12 (gate_up_proj (4, 24, 16))."""
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=12,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg).eval()


MODELS = {"mixtral": make_mixtral, "gpt_oss": make_gpt_oss}


def expert_layers(model):
    return [(n, m) for n, m in rw.adapter_layers(model) if hasattr(m, "parameter_names")]


def randomize(model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in expert_layers(model):
            for t in [*layer.lora_A.values(), *layer.lora_B.values()]:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def reference(base, adapted) -> torch.nn.Module:
    """The base model with every expert's matrix written as W[e] + s·B[e]A[e] in its own layout."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in expert_layers(adapted):
            module = ref.get_submodule(name)
            for p in layer.parameter_names:
                w = getattr(module, p)
                for e in range(w.shape[0]):
                    delta = layer.scale * layer.lora_B[p][e] @ layer.lora_A[p][e]  # (out, in)
                    w[e] += delta.t() if getattr(module, "is_transposed", False) else delta
    return ref


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("method", ["lora", "rslora"])
def test_per_expert_delta_is_the_formula(arch, method):
    base = MODELS[arch]()
    model = rw.adapt(copy.deepcopy(base), method, targets=[], target_parameters=PARAMS, r=2, alpha=3)
    assert torch.equal(model(IDS).logits, base(IDS).logits)  # B = 0: the base model at init
    randomize(model)
    scale = 3 / math.sqrt(2) if method == "rslora" else 3 / 2
    assert all(layer.scale == scale for _, layer in expert_layers(model))
    out = model(IDS).logits
    torch.testing.assert_close(out, reference(base, model)(IDS).logits, rtol=0, atol=1e-5)
    assert (out - base(IDS).logits).abs().max() > 1e-2
    for name, layer in expert_layers(model):  # trainable set and count: E·r·(in + out) per parameter
        module = base.get_submodule(name)
        e, d1, d2 = module.gate_up_proj.shape
        assert layer.trainable_count() == sum(
            e * 2 * sum(getattr(module, p).shape[1:]) for p in ("gate_up_proj", "down_proj"))
        assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert rw.summary(model).trainable == sum(layer.trainable_count() for _, layer in expert_layers(model))


def test_routing_and_base_tensors_unchanged_by_training():
    base = make_mixtral()
    model = rw.adapt(copy.deepcopy(base), "lora", targets=[], target_parameters=PARAMS, r=2)
    frozen = {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, t in model.state_dict().items():
        if "lora_" not in n:
            assert torch.equal(t, frozen[n]), n  # experts' 3-D tensors, router, attention: bit-identical
    assert all(layer.lora_B[p].abs().sum() > 0 for _, layer in expert_layers(model) for p in layer.parameter_names)
    # routing: the first layer's router sees the same hidden states, so it picks the same experts
    picks = {}
    for key, m in (("base", base), ("adapted", model)):
        hook = m.model.layers[0].mlp.gate.register_forward_hook(lambda _m, _i, o, key=key: picks.__setitem__(key, o))
        m(IDS)
        hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(picks["base"], picks["adapted"], strict=True))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_merge_unmerge_unload_save_load(arch, tmp_path):
    base = MODELS[arch]()
    originals = {n: t.clone() for n, t in base.state_dict().items()}
    model = rw.adapt(copy.deepcopy(base), "lora", targets=[], target_parameters=PARAMS, r=2, alpha=4)
    randomize(model)
    out = model(IDS).logits
    rw.save_adapter(model, tmp_path / "a")
    rw.merge(model)
    torch.testing.assert_close(model(IDS).logits, out, rtol=0, atol=1e-5)
    rw.unmerge(model)
    torch.testing.assert_close(model(IDS).logits, out, rtol=0, atol=1e-5)
    loaded = rw.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(loaded(IDS).logits, out)
    plain = rw.unload(model)
    for n, t in plain.state_dict().items():
        torch.testing.assert_close(t, originals[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("method", ["lora", "rslora"])
def test_peft_parity_export(arch, method, tmp_path):
    """Our export (experts and q_proj / v_proj together) loads into PEFT with the same logits."""
    from peft import PeftModel

    base = MODELS[arch]()
    model = rw.adapt(copy.deepcopy(base), method, targets=["q_proj"], target_parameters=PARAMS, r=2, alpha=3)
    randomize(model)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            if hasattr(layer, "lora_B") and isinstance(layer.lora_B, torch.Tensor):
                layer.lora_B.normal_()
    rw.save_adapter(model, tmp_path / "a")  # module targets and experts in one adapter
    assert torch.equal(rw.load_adapter(copy.deepcopy(base), tmp_path / "a")(IDS).logits, model(IDS).logits)
    rw.export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj"] and len(cfg["target_parameters"]) == 4
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    torch.testing.assert_close(peft_model(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_qwen3_moe_formula_and_peft_export(tmp_path):
    from peft import PeftModel

    base = make_qwen3_moe()
    model = rw.adapt(copy.deepcopy(base), "lora", targets=[], target_parameters=PARAMS, r=2, alpha=3)
    randomize(model)
    out = model(IDS).logits
    torch.testing.assert_close(out, reference(base, model)(IDS).logits, rtol=0, atol=1e-5)
    rw.export_peft(model, tmp_path / "p")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    torch.testing.assert_close(peft_model(IDS).logits, out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_peft_parity_import(arch, tmp_path):
    """A PEFT adapter (random B, rsLoRA, experts only) imports with PEFT's logits and per-expert deltas."""
    from peft import LoraConfig, get_peft_model

    base = MODELS[arch]()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, lora_alpha=5, use_rslora=True, target_modules=[], target_parameters=PARAMS, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "p")
    peft_model.eval()
    model = rw.import_peft(copy.deepcopy(base), tmp_path / "p")
    assert rw.adapter_state(model).method == "rslora"
    torch.testing.assert_close(model(IDS).logits, peft_model(IDS).logits, rtol=0, atol=1e-5)
    ours = dict(expert_layers(model))
    for name, module in peft_model.named_modules():  # PEFT's own per-parameter ΔW, in the parameter's layout
        if type(module).__name__ == "ParamWrapper":
            owner = name.removeprefix("base_model.model.").split(".base_layer")[0]
            assert torch.allclose(ours[owner].delta_weights()[module.parameter_name],
                                  module.get_delta_weight("default"), atol=1e-6)
    rw.export_peft(model, tmp_path / "again")  # and our export of it gives PEFT's tensors back
    from safetensors.torch import load_file
    theirs, again = load_file(tmp_path / "p" / "adapter_model.safetensors"), load_file(
        tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(again) and all(torch.equal(theirs[k], again[k]) for k in theirs)


def test_refusals():
    base = make_mixtral()
    for method in ("dora", "pissa", "vera", "qlora"):
        with pytest.raises(ValueError, match=rf"method '{method}' does not support target_parameters.*'lora'"):
            rw.adapt(copy.deepcopy(base), method, targets=[], target_parameters=PARAMS)
    with pytest.raises(ValueError, match="dropout=0.1 is not supported with target_parameters"):
        rw.adapt(copy.deepcopy(base), "lora", targets=[], target_parameters=PARAMS, dropout=0.1)
    with pytest.raises(ValueError, match=r"matched 'model.layers.0.mlp.gate.weight', which has shape \(4, 16\)"):
        rw.adapt(copy.deepcopy(base), "lora", targets=[], target_parameters=["gate.weight"])
    with pytest.raises(ValueError, match="matched no parameter.*experts.gate_up_proj"):
        rw.adapt(copy.deepcopy(base), "lora", targets=[], target_parameters=["experts.nope"])
    with pytest.raises(ValueError, match="r=13 is larger than min"):
        rw.adapt(copy.deepcopy(base), "lora", targets=[], target_parameters=PARAMS, r=13)
    model = rw.adapt(copy.deepcopy(base), "lora", targets=[], target_parameters=PARAMS)
    with pytest.raises(ValueError, match="already holds an adapter"):
        rw.adapt(model, "lora", targets=[], target_parameters=PARAMS, name="second")
    with pytest.raises(ValueError, match="per-example adapters"):
        model(IDS, adapter_names=["default", None])
