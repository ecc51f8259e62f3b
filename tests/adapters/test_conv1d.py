"""Every registered adapter method on GPT-2-style transformers ``Conv1D`` layers (weight stored (in, out),
``y = x W + b``), on a tiny ``GPT2LMHeadModel`` and ``GPT2ForSequenceClassification``.

Faithfulness: each Conv1D model has a *Linear twin*, the same network with every Conv1D replaced by an
``nn.Linear`` holding the transposed weight. Adapting both with the same method and seed must give the
same outputs, gradients, merged weights and ΔW; a dropped (or doubled) transpose anywhere (init, the
init gradient, merge, the fused kernel, DoRA's norms, ...) breaks it. Then the matrix properties on the
Conv1D model itself, and PEFT parity (PEFT wraps Conv1D with ``fan_in_fan_out=True``).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import rankwise as rw
from rankwise.adapters.base import AdapterLayer

# the quantized-base methods (qlora, loftq) have their own tests (tests/adapters/test_qlora.py): they do
# not start at the full-precision base, which this matrix checks. S²FT co-permutes the coupled layers of
# Llama- / BERT-style blocks (layout.find_blocks); GPT-2's fused c_attn has no such layout, and S²FT's
# Conv1D-free layers are checked in tests/adapters/test_s2ft.py
BLOCK_LAYOUT_ONLY = {"s2ft"}
METHODS = sorted(n for n, s in rw.REGISTRY.items()
                 if s.family != "quantization" and not s.needs_adapters and n not in BLOCK_LAYOUT_ONLY)
EXPORTABLE = sorted(n for n in METHODS if rw.REGISTRY[n].export in ("lora", "dora"))
# a method with no ΔW (denselora's GELU) cannot merge: the tests that read ΔW or merge leave it out
MERGEABLE = sorted(n for n in METHODS if rw.REGISTRY[n].mergeable)
RANK = 4
KINDS = {"lm": GPT2LMHeadModel, "cls": GPT2ForSequenceClassification}
CONV1D = ("c_attn", "c_proj", "c_fc")


def make_gpt2(kind: str = "lm", seed: int = 0) -> nn.Module:
    """The tiny GPT-2 of the issue (dropout off, so training-mode passes are deterministic)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        num_labels=3,
    )
    return KINDS[kind](config).eval()


def linear_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Conv1D replaced by the equivalent ``nn.Linear`` (weight = Wᵀ)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            lin = nn.Linear(in_features, out_features)
            with torch.no_grad():
                lin.weight.copy_(module.weight.t())
                lin.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent_name), child, lin)
    return twin


def batches(kind: str, n: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (3, 10), generator=g)
        labels = ids if kind == "lm" else torch.randint(0, 3, (3,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def needs_data(method: str) -> bool:
    spec = rw.get_method(method)
    return spec.layer_cls.needs_grad(spec.make_config(r=RANK))


#: options that make a method adapt every Conv1D (PLoP places adapters on its lowest-NFN module types only)
EVERY_LAYER = {"plop": {"plop_types": 4}}


def adapt(model: nn.Module, method: str, kind: str, **options) -> nn.Module:
    options = {**EVERY_LAYER.get(method, {}), **options}
    return rw.adapt(model, method, r=RANK, init_data=batches(kind) if needs_data(method) else None, **options)


@torch.no_grad()
def logits(model: nn.Module, seed: int = 5) -> torch.Tensor:
    kind = "lm" if isinstance(model, GPT2LMHeadModel) else "cls"
    batch = batches(kind, n=1, seed=seed)[0]
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def trainable(model: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    # every name of a tensor shared by several layers (LoTR's U, DenseLoRA's encoder), as state_dict lists them
    return [(n, p) for n, p in sorted(model.named_parameters(remove_duplicate=False)) if p.requires_grad]


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Seeded noise on every trainable adapter tensor (by sorted name), so ΔW ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    for _, p in trainable(model):
        p.add_(torch.randn(p.shape, generator=g) * std)
    for _, layer in rw.adapter_layers(model):
        layer.finish_warmup()


def conv_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    layers = rw.adapter_layers(model)
    assert layers and all(isinstance(layer.base_layer, Conv1D) for _, layer in layers)
    return layers


def one_step(model: nn.Module, kind: str, lr: float = 1e-2) -> None:
    opt = torch.optim.Adam([p for _, p in trainable(model)], lr=lr)
    model.train()
    torch.manual_seed(0)  # the same training-time randomness (e.g. LoRA Dropout's masks) in both twins
    model(**batches(kind, n=1, seed=9)[0]).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


# ------------------------------------------------------------------------------ the Linear twin
@pytest.mark.parametrize("method", MERGEABLE)
def test_conv1d_model_equals_its_linear_twin(method):
    """Same method, same seed on the Conv1D GPT-2 and its nn.Linear twin: the same initial output, ΔW,
    gradients, trained output and merged weights (Conv1D weight = twin weightᵀ)."""
    base = make_gpt2("lm")
    twin_base = linear_twin(base)
    torch.testing.assert_close(logits(twin_base), logits(base), atol=1e-6, rtol=0)
    conv = adapt(copy.deepcopy(base), method, "lm")
    lin = adapt(copy.deepcopy(twin_base), method, "lm")
    assert [n for n, _ in conv_layers(conv)] == [n for n, _ in rw.adapter_layers(lin)]
    tol = {"atol": 2e-5, "rtol": 0}
    torch.testing.assert_close(logits(conv), logits(lin), **tol)
    randomize(conv)
    randomize(lin)
    torch.testing.assert_close(logits(conv), logits(lin), **tol)
    assert (logits(conv) - logits(base)).abs().max() > 1e-3  # the adapters do act
    for (name, a), (_, b) in zip(rw.adapter_layers(conv), rw.adapter_layers(lin), strict=True):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight(), atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(a.base_layer.weight, b.base_layer.weight.t(), atol=1e-6, rtol=0, msg=name)
    # gradients of one training step, then the trained outputs
    for model in (conv, lin):
        model.train()
        model.zero_grad()
        torch.manual_seed(0)
        model(**batches("lm", n=1, seed=9)[0]).loss.backward()
    for (name, p), (_, q) in zip(trainable(conv), trainable(lin), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    one_step(conv, "lm")
    one_step(lin, "lm")
    torch.testing.assert_close(logits(conv), logits(lin), **tol)
    rw.merge(conv)
    rw.merge(lin)
    for (name, a), (_, b) in zip(rw.adapter_layers(conv), rw.adapter_layers(lin), strict=True):
        torch.testing.assert_close(a.base_layer.weight, b.base_layer.weight.t(), atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(logits(conv), logits(lin), **tol)


# ------------------------------------------------------------------------------ the matrix on Conv1D
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("method", METHODS)
def test_initial_output_and_disabled_adapters(method, kind):
    base = make_gpt2(kind)
    model = adapt(copy.deepcopy(base), method, kind)
    layers = conv_layers(model)
    same = torch.allclose(logits(model), logits(base), atol=1e-4)
    assert same == layers[0][1].identity_at_init
    with rw.adapters_disabled(model):
        torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("method", METHODS)
def test_one_training_step_changes_only_adapter_parameters(method, kind):
    model = adapt(make_gpt2(kind), method, kind)
    layers = conv_layers(model)
    for _, layer in layers:
        assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
        n = sum(p.numel() for k, p in layer.named_parameters() if p.requires_grad and not k.startswith("base_layer."))
        assert n == layer.trainable_count()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    allowed = {n for n, _ in trainable(model)}
    assert all(".base_layer." not in n for n in allowed)
    assert any(n.startswith("score.") for n in allowed) == (kind == "cls")  # the head is trained in full
    stats = {f"{name}.{b}" for name, layer in layers for b in layer.running_statistics}
    one_step(model, kind)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed and changed <= allowed | stats


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_unmerge_delta_weight_and_merge_and_unload(method, kind):
    base = make_gpt2(kind)
    model = adapt(copy.deepcopy(base), method, kind)
    randomize(model)
    expected = logits(model)
    layers = conv_layers(model)
    frozen = {n: layer.base_layer.weight.detach().clone() for n, layer in layers}
    deltas = {n: layer.delta_weight().detach().clone() for n, layer in layers}
    rw.merge(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    for name, layer in layers:
        # ΔW (out × in) is what merge adds to the (out × in) view Conv1D.weightᵀ
        change = layer.base_layer.weight.t() - frozen[name].t()
        torch.testing.assert_close(change, deltas[name].to(change.dtype), atol=1e-5, rtol=0, msg=name)
    rw.unmerge(model)
    for name, layer in layers:
        torch.testing.assert_close(layer.base_layer.weight, frozen[name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)

    plain = rw.merge_and_unload(model)
    assert not rw.adapter_layers(plain) and not rw.adapter_names(plain)
    for name, _ in layers:
        assert type(plain.get_submodule(name)) is Conv1D
    assert type(plain) is type(base)
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", MERGEABLE)
def test_unload_gives_back_the_original_conv1d_weights(method):
    base = make_gpt2("lm")
    model = adapt(copy.deepcopy(base), method, "lm")
    randomize(model)
    rw.merge(model)
    rw.unload(model)
    for name, module in base.named_modules():
        if isinstance(module, Conv1D):
            got = model.get_submodule(name)
            assert type(got) is Conv1D
            torch.testing.assert_close(got.weight, module.weight, atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_exact(method, kind, tmp_path):
    base = make_gpt2(kind)
    model = adapt(copy.deepcopy(base), method, kind)
    randomize(model)
    expected = logits(model)
    rw.save_adapter(model, tmp_path / "adapter")
    loaded = rw.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    conv_layers(loaded)
    assert torch.equal(logits(loaded), expected)
    for (name, t), (_, u) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items()), strict=True):
        assert torch.equal(t, u), name


def test_fused_kernel_runs_on_the_transposed_view():
    """The fused LoRA path takes the (out, in) view of the Conv1D weight: no copy of W is made."""
    model = adapt(make_gpt2("lm"), "lora", "lm")
    layer = conv_layers(model)[0][1]
    assert layer.base_weight.data_ptr() == layer.base_layer.weight.data_ptr()
    assert layer.base_weight.shape == (layer.out_features, layer.in_features) == (96, 32)
    assert layer.weight is layer.base_layer.weight  # module.weight keeps the Conv1D layout
    assert "base=Conv1D" in repr(layer)


# ------------------------------------------------------------------------------ PEFT
def _peft_pair(kind: str, **lora_options):
    from peft import LoraConfig, get_peft_model

    base = make_gpt2(kind)
    task = "CAUSAL_LM" if kind == "lm" else "SEQ_CLS"
    config = LoraConfig(r=RANK, lora_alpha=8, target_modules=list(CONV1D), fan_in_fan_out=True, task_type=task,
                        **lora_options)
    return base, get_peft_model(copy.deepcopy(base), config)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_same_init_same_outputs_and_gradients_as_peft(method, kind):
    """PEFT's randomized factors (and head) copied into rankwise: the same logits and the same gradients."""
    base, pm = _peft_pair(kind, use_dora=method == "dora")
    randomize(pm, seed=3)
    model = rw.adapt(copy.deepcopy(base), method, targets=list(CONV1D), r=RANK, alpha=8)
    ours = dict(model.named_parameters())
    names = []
    with torch.no_grad():
        for name, p in trainable(pm):
            key = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            key = key.replace(".default.weight", "").replace("lora_magnitude_vector", "magnitude")
            ours[key].copy_(p)
            names.append(key)
    assert sorted(names) == sorted(n for n, _ in trainable(model))
    expected = logits(pm)
    assert (expected - logits(base)).abs().max() > 1e-3
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    batch = batches(kind, n=1, seed=9)[0]
    grads = {}
    for who, m in (("peft", pm), ("rw", model)):
        m.train()
        m.zero_grad()
        m(**batch).loss.backward()
        grads[who] = [p.grad for _, p in trainable(m)]
    for key, g, h in zip(sorted(names), grads["peft"], grads["rw"], strict=True):
        torch.testing.assert_close(h, g, atol=1e-6, rtol=1e-4, msg=key)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("method", EXPORTABLE)
def test_export_to_peft_reproduces_the_conv1d_model(method, kind, tmp_path):
    from peft import PeftModel

    base = make_gpt2(kind)
    model = adapt(copy.deepcopy(base), method, kind)
    randomize(model, seed=7)
    expected = logits(model)
    assert (expected - logits(base)).abs().max() > 1e-3
    rw.export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    assert sorted(cfg["target_modules"]) == sorted(CONV1D)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_import_of_a_peft_gpt2_lora_is_exact(variant, kind, tmp_path):
    options = {"use_rslora": variant == "rslora", "use_dora": variant == "dora"}
    base, pm = _peft_pair(kind, **options)
    randomize(pm, seed=11)
    pm.save_pretrained(tmp_path / "peft")
    expected = logits(pm)
    model = rw.import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert rw.adapter_state(model).method == variant
    conv_layers(model)
    peft_tensors = dict(pm.named_parameters())
    for name, layer in rw.adapter_layers(model):
        key = f"base_model.model.{name}.lora_A.default.weight"
        assert torch.equal(layer.lora_A, peft_tensors[key])  # copied bit for bit
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    # and back: rankwise's export loads in PEFT to the same numbers
    rw.export_peft(model, tmp_path / "back")
    from peft import PeftModel

    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    torch.testing.assert_close(logits(back), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_conv1d_layer_compiles_fullgraph(method):
    """The transposed view is read in forward without a graph break (the fused LoRA / DoRA kernels)."""
    model = adapt(make_gpt2("lm"), method, "lm")
    randomize(model)
    layer = conv_layers(model)[0][1]
    x = torch.randn(2, 5, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for fn in (layer, compiled):
        layer.zero_grad()
        x.grad = None
        out = fn(x)
        out.square().sum().backward()
        if fn is layer:
            expected = (out.detach(), x.grad.clone(), [p.grad.clone() for _, p in trainable(layer)])
    torch.testing.assert_close(out.detach(), expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, expected[1], atol=1e-6, rtol=1e-5)
    for p, g in zip([p for _, p in trainable(layer)], expected[2], strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_dsee_compress_on_gpt2_matches_its_linear_twin():
    """rw.compress(model, "dsee") (adapter, global magnitude pruning of W₀ + ΔW, merge) on the Conv1D GPT-2
    gives the transposed weights of the same run on its Linear twin, half of them zero."""
    base = make_gpt2("lm")
    conv = rw.compress(copy.deepcopy(base), "dsee", ratio=0.5, data=batches("lm"), steps=2)
    lin = rw.compress(linear_twin(base), "dsee", ratio=0.5, data=batches("lm"), steps=2)
    pairs = [(m, lin.get_submodule(n)) for n, m in conv.named_modules() if isinstance(m, Conv1D)]
    assert len(pairs) == 8 and all(isinstance(b, nn.Linear) for _, b in pairs)
    for a, b in pairs:
        torch.testing.assert_close(a.weight, b.weight.t(), atol=1e-6, rtol=0)
    zeros = sum(int((a.weight == 0).sum()) for a, _ in pairs) / sum(a.weight.numel() for a, _ in pairs)
    assert abs(zeros - 0.5) < 0.01
    torch.testing.assert_close(logits(conv), logits(lin), atol=1e-5, rtol=0)


def test_import_follows_peft_when_the_config_says_fan_in_fan_out_false(tmp_path):
    """PEFT sets fan_in_fan_out per layer type (True for a Conv1D, with a warning), so an adapter whose
    config says False loads in PEFT as the Conv1D LoRA it is; import_peft gives the same numbers."""
    from peft import PeftModel

    base, pm = _peft_pair("lm")
    randomize(pm, seed=13)
    pm.save_pretrained(tmp_path / "peft")
    cfg_file = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["fan_in_fan_out"] = False
    cfg_file.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        expected = logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft"))
    torch.testing.assert_close(expected, logits(pm), atol=0, rtol=0)
    model = rw.import_peft(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


def test_trainer_checkpoint_of_a_base_moving_init_loads_back(tmp_path):
    """hf_trainer's loader restores the original W₀ through base_weight before re-applying PiSSA's offset."""
    from rankwise.hf_trainer import load_adapter_checkpoint, save_adapter_checkpoint

    base = make_gpt2("lm")
    model = adapt(copy.deepcopy(base), "pissa", "lm")
    randomize(model)
    save_adapter_checkpoint(model, tmp_path / "ckpt")
    fresh = adapt(copy.deepcopy(base), "pissa", "lm")
    randomize(fresh, seed=2)
    assert not torch.allclose(logits(fresh), logits(model))
    load_adapter_checkpoint(fresh, tmp_path / "ckpt")
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-5, rtol=0)
