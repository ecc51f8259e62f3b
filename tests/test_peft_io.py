"""PEFT interop: parity of LoRA / rsLoRA with peft 0.21.2, export_peft -> PeftModel.from_pretrained
round trips for every exportable registered method, import_peft of adapters PEFT saved, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import rankwise as rw
from rankwise import catalogue
from rankwise.adapters.init import INITS, Factors, Init
from rankwise.adapters.lora import LoRAConfig, LoRALayer
from rankwise.adapters.registry import REGISTRY, MethodSpec, register

from .conftest import cls_batches, lm_batches, make_tiny_bert, make_tiny_llama

KINDS = {
    "bert": (make_tiny_bert, cls_batches, "SEQ_CLS", ["query", "value", "dense"]),
    "llama": (make_tiny_llama, lm_batches, "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"]),
}
# qlora / loftq: over a 4-bit base, exported in tests/adapters/test_qlora.py
EXPORTABLE = sorted(n for n, s in REGISTRY.items() if s.export in ("lora", "dora") and s.family != "quantization")
NOT_EXPORTABLE = sorted(n for n, s in REGISTRY.items() if s.export == "none" and not s.needs_adapters)
# exportable LoRA-layer methods, whose ``init`` selects a LoRA-shaped init (lora, rslora, dora, pissa, ...)
# the LoRA-layer methods taking an init and an α (ALLoRA and LoFT have no α)
# allora, eva, prilora and gora fix their own init
WITH_INIT = [n for n in EXPORTABLE if issubclass(REGISTRY[n].layer_cls, LoRALayer)
             and n not in ("allora", "loft", "eva", "prilora", "gora")]


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    model.eval()
    return model(**_inputs()).logits


@torch.no_grad()
def _randomize(params, seed: int, std: float = 0.1) -> None:
    """Perturb every given parameter with seeded noise, so each adapter has a non-trivial delta."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * std)


def _rankwise_trainable(model):
    return [p for _, p in sorted(model.named_parameters()) if p.requires_grad]


def _peft_trainable(model):
    return [p for n, p in sorted(model.named_parameters()) if p.requires_grad]


# --------------------------------------------------------------------- forward parity with PEFT
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_same_weights_same_outputs_as_peft(kind, use_rslora):
    """Copy PEFT's (randomized) A, B and head into rankwise by hand: outputs agree to 1e-5.
    r=4, α=8 makes α/r = 2 and α/√r = 4 differ, so a wrong scaling rule fails."""
    make, _, task, targets = KINDS[kind]
    base = make()
    pm = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=targets, task_type=task),
    )
    _randomize(_peft_trainable(pm), seed=3)
    model = rw.adapt(copy.deepcopy(base), "rslora" if use_rslora else "lora", targets=targets, r=4, alpha=8)
    ours = dict(model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            key = name.removeprefix("base_model.model.")
            key = key.replace(".modules_to_save.default", "").replace(".default.weight", "")
            ours[key].copy_(p)
            copied += 1
    assert copied == len(_rankwise_trainable(model))
    expected = _logits(pm)
    assert (expected - _logits(base)).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------- export round trips
def _adapt_random(method: str, kind: str, **config):
    make, batches, _, _ = KINDS[kind]
    base = make()
    model = rw.adapt(copy.deepcopy(base), method, r=4, init_data=batches(n=2), **config)
    _randomize(_rankwise_trainable(model), seed=7)
    for _, layer in rw.adapter_layers(model):
        layer.finish_warmup()
    return base, model


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("method", EXPORTABLE)
def test_export_roundtrip_every_exportable_method(method, kind, tmp_path):
    """export_peft -> PeftModel.from_pretrained(untouched base) reproduces the rankwise model."""
    base, model = _adapt_random(method, kind)
    expected = _logits(model)
    assert (expected - _logits(base)).abs().max() > 1e-3
    rw.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_dora"] == (REGISTRY[method].export == "dora")
    assert cfg["task_type"] == KINDS[kind][2]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-4, rtol=0)


def test_export_lora_writes_peft_keys_and_scaling(tmp_path):
    """Plain LoRA exports its own A, B under PEFT's key names with lora_alpha = α, target suffixes."""
    base, model = _adapt_random("lora", "bert", alpha=16)
    model.bert.encoder.layer[0].attention.self.query.lora_B.data.fill_(0.5)
    rw.export_peft(model, tmp_path / "p", base_model_name_or_path="tiny-bert")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 16, False)
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert cfg["target_modules"] == ["dense", "key", "query", "value"]  # all-linear on BERT
    assert cfg["modules_to_save"] == ["classifier"] and cfg["base_model_name_or_path"] == "tiny-bert"
    tensors = load_file(tmp_path / "p" / "adapter_model.safetensors")
    layer = model.bert.encoder.layer[0].attention.self.query
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert torch.equal(tensors[f"{prefix}.lora_A.weight"], layer.lora_A.detach())
    assert torch.equal(tensors[f"{prefix}.lora_B.weight"], layer.lora_B.detach())
    assert torch.equal(tensors["base_model.model.classifier.weight"], model.classifier.weight.detach())


def test_export_suffixes_fall_back_to_full_names(tmp_path):
    """When only some 'query' layers are adapted, suffixes would select too much: full names are written."""
    base = make_tiny_bert()
    model = rw.adapt(copy.deepcopy(base), "lora", targets=r".*layer\.0\.attention\.self\.query", r=2)
    _randomize(_rankwise_trainable(model), seed=1)
    rw.export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["bert.encoder.layer.0.attention.self.query"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-4, rtol=0)


def test_export_per_layer_ranks_use_rank_and_alpha_pattern(tmp_path):
    """Layers adapted with their own r / α (overrides) export through rank_pattern / alpha_pattern."""
    q0 = "model.layers.0.self_attn.q_proj"
    v1 = "model.layers.1.self_attn.v_proj"
    base, model = _adapt_random("rslora", "llama", alpha=8, overrides={q0: {"r": 8}, v1: {"alpha": 3.0}})
    assert model.get_submodule(q0).lora_A.shape == (8, 32)
    rw.export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {q0: 8}
    assert cfg["alpha_pattern"] == {v1: 3}
    assert cfg["use_rslora"] is True and cfg["lora_alpha"] == 8
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-4, rtol=0)


def _svd_offset_init(weight, ctx):
    """A PiSSA-like base-moving init (top-r SVD, s·B₀A₀ = W's top-r part), local to these tests."""
    r = ctx.r
    u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
    root = (sv[:r] / ctx.scale).sqrt()
    return Factors(u[:, :r] * root, root[:, None] * vh[:r])


@pytest.mark.parametrize("method", WITH_INIT)
def test_export_base_moving_init_is_rank_2r_and_matches_original_base(method, tmp_path, monkeypatch):
    """An init that moved s·B₀A₀ out of W₀ exports [B, −B₀]·[A; A₀] at rank 2r; PEFT on the
    *untouched* base reproduces the rankwise outputs (the delta is relative to W₀)."""
    monkeypatch.setitem(INITS, "test_offset", Init(_svd_offset_init, moves_base=True))
    base, model = _adapt_random(method, "llama", init="test_offset", alpha=8)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert not torch.allclose(layer.base_layer.weight, base.get_submodule("model.layers.0.mlp.down_proj").weight)
    rw.export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["r"] == 8  # rank 2r, with α chosen so that PEFT's scaling equals the layer's s
    assert cfg["lora_alpha"] / (8**0.5 if cfg["use_rslora"] else 8) == pytest.approx(layer.scale, rel=1e-12)
    tensors = load_file(tmp_path / "p" / "adapter_model.safetensors")
    b = tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    torch.testing.assert_close(b[:, 4:], -layer.init_B, atol=0, rtol=0)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-4, rtol=0)


# --------------------------------------------------------------------- import of PEFT-saved adapters
IMPORT_CASES = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("variant", sorted(IMPORT_CASES))
def test_import_peft_saved_adapter_matches_peft(variant, kind, tmp_path):
    """An adapter saved by PEFT (with rank_pattern / alpha_pattern) imports to the same outputs (1e-5)."""
    make, _, task, targets = KINDS[kind]
    base = make()
    first = "bert.encoder.layer.0.attention.self.query" if kind == "bert" else "model.layers.0.self_attn.q_proj"
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, task_type=task,
        rank_pattern={first: 6}, alpha_pattern={"down_proj" if kind == "llama" else "value": 3},
        **IMPORT_CASES[variant],
    )
    pm = get_peft_model(copy.deepcopy(base), config)
    _randomize(_peft_trainable(pm), seed=11)
    pm.save_pretrained(tmp_path / "peft")
    expected = _logits(pm)

    model = rw.import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert rw.adapter_state(model).method == variant
    assert model.get_submodule(first).lora_A.shape[0] == 6
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in pm.parameters() if p.requires_grad
    )
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=0)

    # the per-layer ranks survive rankwise's own save/load (AdapterState.overrides)
    rw.save_adapter(model, tmp_path / "rw")
    again = rw.load_adapter(copy.deepcopy(base), tmp_path / "rw")
    torch.testing.assert_close(_logits(again), expected, atol=1e-5, rtol=0)
    # and export writes the same numbers back for PEFT
    rw.export_peft(again, tmp_path / "back")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    torch.testing.assert_close(_logits(back), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------- bad input
def _write_peft_dir(path, config: dict, tensors: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(path / "adapter_model.safetensors"))


def _lora_tensors(r: int = 2) -> dict:
    key = "base_model.model.bert.encoder.layer.0.attention.self.query"
    return {f"{key}.lora_A.weight": torch.zeros(r, 32), f"{key}.lora_B.weight": torch.zeros(32, r)}


GOOD = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"], "bias": "none"}


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({**GOOD, "peft_type": "IA3"}, _lora_tensors(), "peft_type='IA3' is not supported"),
        ({**GOOD, "bias": "all"}, _lora_tensors(), "bias='all' is not supported; allowed: 'none'"),
        ({**GOOD, "lora_bias": True}, _lora_tensors(), "lora_bias=True is not supported"),
        ({**GOOD, "init_lora_weights": "pissa"}, _lora_tensors(), "init_lora_weights='pissa' is not supported"),
        ({**GOOD, "r": 3}, _lora_tensors(), "rank_pattern / r: layer 'bert.encoder.layer.0.attention.self.query'"),
        (GOOD, {"base_model.model.bert.nope.lora_A.weight": torch.zeros(2, 32),
                "base_model.model.bert.nope.lora_B.weight": torch.zeros(32, 2)},
         "target_modules: the adapter has layer 'bert.nope'"),
        (GOOD, {**_lora_tensors(), "base_model.model.classifier.weight": torch.zeros(3, 32)},
         "modules_to_save: adapter_model.safetensors has tensors ['classifier.weight']"),
        (GOOD, {k: v[:, :16].contiguous() if k.endswith("lora_A.weight") else v for k, v in _lora_tensors().items()},
         "lora_A of layer 'bert.encoder.layer.0.attention.self.query' has shape (2, 16), expected (2, 32)"),
        (GOOD, None, "adapter_model.safetensors not found; import_peft reads adapter_model.safetensors only"),
    ],
)
def test_import_bad_input(config, tensors, message, tmp_path):
    model = make_tiny_bert()
    _write_peft_dir(tmp_path / "p", config, tensors)
    with pytest.raises(ValueError) as err:
        rw.import_peft(model, tmp_path / "p")
    assert message in str(err.value)
    assert not rw.adapter_names(model)  # nothing was injected


def test_import_rejects_layers_of_no_adaptable_type(tmp_path):
    """A PEFT LoRA on an embedding is imported onto the nn.Embedding (``lora_embedding_A`` / ``_B``;
    parity in tests/adapters/test_layer_types.py); a layer of no adaptable type is refused."""
    pm = get_peft_model(make_tiny_bert(), LoraConfig(r=2, target_modules=["word_embeddings"]))
    pm.save_pretrained(tmp_path / "emb")
    mine = rw.import_peft(make_tiny_bert(), tmp_path / "emb")
    assert [type(layer.base_layer) for _, layer in rw.adapter_layers(mine)] == [torch.nn.Embedding]
    pm = get_peft_model(make_tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    pm.save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    t = load_file(tmp_path / "q" / "adapter_model.safetensors")
    renamed = {k.replace("attention.self.query", "attention.self"): v for k, v in t.items()}
    _write_peft_dir(tmp_path / "s", cfg, renamed)
    message = "target_modules: layer 'bert.encoder.layer.0.attention.self' is a BertSelfAttention"
    with pytest.raises(ValueError, match=message):
        rw.import_peft(make_tiny_bert(), tmp_path / "s")


def test_import_missing_dir_and_dora_without_magnitude(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        rw.import_peft(make_tiny_bert(), tmp_path / "missing")
    _write_peft_dir(tmp_path / "m", GOOD, {**_lora_tensors(), "base_model.model.bert.encoder.layer.0."
                                          "attention.self.query.lora_magnitude_vector": torch.ones(32)})
    with pytest.raises(ValueError, match="use_dora=False but layer .* has a lora_magnitude_vector"):
        rw.import_peft(make_tiny_bert(), tmp_path / "m")


@pytest.mark.parametrize("method", NOT_EXPORTABLE)
def test_export_none_methods_refuse(method, tmp_path):
    """Registered methods whose delta is not a LoRA pair (export="none") raise and write nothing."""
    spec = rw.get_method(method)
    needs_data = spec.layer_cls.needs_grad(spec.make_config(r=2))  # LT-SFT's phase 1 runs on init_data
    model = rw.adapt(make_tiny_bert(), method, r=2, init_data=cls_batches(n=2) if needs_data else None)
    with pytest.raises(ValueError) as err:
        rw.export_peft(model, tmp_path / "x")
    assert f"method '{method}' cannot be exported as a PEFT LoRA adapter" in str(err.value)
    assert ("rw.merge" in str(err.value)) == spec.mergeable  # a non-mergeable one (denselora) points to save
    assert not (tmp_path / "x").exists()


def test_export_bad_input(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="model has no rankwise adapters"):
        rw.export_peft(make_tiny_bert(), tmp_path / "x")
    monkeypatch.setattr(catalogue, "_RECORDS", {**catalogue._RECORDS})  # the registration below ends with the test
    register(MethodSpec("dense_only_test", "adapter", "test", LoRAConfig, LoRALayer, export="none"))
    model = rw.adapt(make_tiny_bert(), "dense_only_test", r=2)
    with pytest.raises(ValueError) as err:
        rw.export_peft(model, tmp_path / "x")
    assert "method 'dense_only_test' cannot be exported as a PEFT LoRA adapter" in str(err.value)
    assert "use rw.merge / rw.merge_and_unload or rw.save_adapter instead" in str(err.value)
    assert not (tmp_path / "x").exists()
    model = rw.adapt(make_tiny_bert(), "lora", r=2, trainable=["pooler"])
    message = "trainable module 'bert.pooler' contains the adapted layer 'bert.pooler.dense'"
    with pytest.raises(ValueError, match=message):
        rw.export_peft(model, tmp_path / "x")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bert.nope": {"r": 2}}, "overrides name layer(s) ['bert.nope'] that are not adapted"),
        ({"bert.encoder.layer.0.attention.self.query": 4}, "must be a dict {layer name: {config field: value}}"),
        ({"bert.encoder.layer.0.attention.self.query": {"r": 64}}, "r=64 is larger than min(in_features"),
        ({"bert.encoder.layer.0.attention.self.query": {"rank": 2}}, "unknown option(s) ['rank']"),
    ],
)
def test_adapt_overrides_errors(overrides, message):
    with pytest.raises(ValueError) as err:
        rw.adapt(make_tiny_bert(), "lora", r=2, targets=["query"], overrides=overrides)
    assert message in str(err.value)


def test_rankwise_peft_rankwise_round_trip_is_lossless(tmp_path):
    """export_peft then import_peft gives back the same A, B, per-layer ranks and head."""
    q0 = "model.layers.0.self_attn.q_proj"
    base, model = _adapt_random("lora", "llama", alpha=6, overrides={q0: {"r": 8, "alpha": 2.5}})
    rw.export_peft(model, tmp_path / "p")
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "p")
    assert rw.adapter_state(back).layers == rw.adapter_state(model).layers
    assert rw.adapter_state(back).overrides == {q0: {"r": 8, "alpha": 2.5}}
    for (name, a), (_, b) in zip(rw.adapter_layers(model), rw.adapter_layers(back), strict=True):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name
        assert a.scale == pytest.approx(b.scale, rel=1e-12)
    torch.testing.assert_close(_logits(back), _logits(model), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        rw.import_peft(back, tmp_path / "p")


def test_export_without_trained_head_declares_no_task_type(tmp_path):
    """A classifier adapted with trainable=None keeps the base head: PEFT must not expect one."""
    base = make_tiny_bert()
    model = rw.adapt(copy.deepcopy(base), "lora", r=4, trainable=None)
    _randomize(_rankwise_trainable(model), seed=7)
    rw.export_peft(model, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["task_type"] is None
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-4, rtol=0)
