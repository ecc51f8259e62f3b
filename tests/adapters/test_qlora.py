"""Quantized bases: ``rw.quantize`` (bitsandbytes NF4), adapters over a 4-bit base (QLoRA), LoftQ.

bitsandbytes quantizes and runs ``Linear4bit`` on CPU, so everything here runs without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def _bnb_narrow_rows_quantize_correctly():
    require_bnb_narrow_rows()

import bitsandbytes as bnb  # noqa: E402

import rankwise as rw  # noqa: E402
from rankwise import quant  # noqa: E402
from rankwise.adapters.init import InitContext, loftq_init  # noqa: E402
from rankwise.adapters.lora import QLoRAConfig  # noqa: E402

from ..conftest import lm_batches, make_tiny_llama, require_bnb_narrow_rows  # noqa: E402


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _randomize(model, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            for name, p in layer.named_parameters():
                if p.requires_grad and not name.startswith("base_layer."):
                    p.add_(torch.randn(p.shape, generator=g) * std)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------- rw.quantize
def test_quantize_makes_nf4_double_quant_linear4bit_layers_and_keeps_the_head_and_biases():
    model = make_tiny_llama(0)
    fp = {n: (m.weight.detach().clone(), m.bias) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert rw.quantize(model, "nf4") is model
    record = model.rankwise_quantized
    assert record.scheme == "nf4" and record.double_quant and record.blocksize == 64
    assert len(record.layers) == 14 and "lm_head" not in record.layers
    assert type(model.lm_head) is nn.Linear
    for name in record.layers:
        layer = model.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit)
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested  # double quantization
        w = quant.dequantize(layer)
        assert w.shape == fp[name][0].shape and w.dtype == torch.float32
        assert record.errors[name] == pytest.approx(_rel(w, fp[name][0]), rel=1e-6)
        assert 0.05 < record.errors[name] < 0.15  # NF4 with 64-blocks on a Gaussian weight: ~0.09
    bias_model = nn.Sequential(nn.Linear(16, 8))
    bias = bias_model[0].bias.detach().clone()
    rw.quantize(bias_model, "fp4", double_quant=False)
    assert torch.equal(bias_model[0].bias, bias) and bias_model[0].weight.quant_state.quant_type == "fp4"
    assert not bias_model[0].weight.quant_state.nested


def test_quantize_bad_input():
    with pytest.raises(ValueError, match=r"scheme='int4' is not allowed; choose one of \['nf4', 'fp4'\]"):
        rw.quantize(make_tiny_llama(0), "int4")
    with pytest.raises(ValueError, match="compute_dtype='int8' is not allowed"):
        rw.quantize(make_tiny_llama(0), compute_dtype="int8")
    model = rw.quantize(make_tiny_llama(0))
    with pytest.raises(ValueError, match="already 4-bit quantized"):
        rw.quantize(model)
    with pytest.raises(ValueError, match="before rw.adapt"):
        rw.quantize(rw.adapt(make_tiny_llama(0), "lora", r=2))


def test_without_bitsandbytes_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"need bitsandbytes: pip install 'bitsandbytes>=0.45'"):
        rw.quantize(make_tiny_llama(0))
    with pytest.raises(ImportError, match="need bitsandbytes"):
        rw.adapt(make_tiny_llama(0), "qlora", r=2)


def test_writers_of_weights_refuse_4bit_layers():
    model = rw.quantize(make_tiny_llama(0))
    with pytest.raises(ValueError, match="4-bit quantized layers"):
        rw.sparsify(model, "sltrain")
    with pytest.raises(ValueError, match="4-bit quantized layers"):
        rw.compress(model, "svd", rank=2)
    with pytest.raises(ValueError, match="4-bit quantized layers"):
        rw.optim.make("galore", model, rank=2, lr=1e-3)
    with pytest.raises(ValueError, match=r"of type Linear4bit \(4-bit quantized\); this method writes"):
        rw.compress(model, "svd", rank=2, targets=["q_proj"])
    with pytest.raises(ValueError, match="full gradient of W₀, which 4-bit quantized layers"):
        rw.adapt(model, "lora_ga", r=2, init_data=lm_batches(1))
    with pytest.raises(ValueError, match="needs the full-precision weight"):
        rw.adapt(model, "loftq", r=2)


def test_qlora_config_bad_options():
    with pytest.raises(ValueError, match="quant_type='int4' is not allowed"):
        rw.adapt(make_tiny_llama(0), "qlora", r=2, quant_type="int4")
    with pytest.raises(ValueError, match="loftq_iter"):
        rw.adapt(make_tiny_llama(0), "loftq", r=2, loftq_iter=0)


# ---------------------------------------------------------------------- QLoRA
def test_qlora_starts_at_the_quantized_base_and_trains_only_the_adapters():
    data = lm_batches(4)
    quantized = rw.quantize(make_tiny_llama(0))
    expected = _logits(quantized, data[0])
    model = rw.adapt(make_tiny_llama(0), "qlora", r=4)  # quantizes the layers it adapts: the same codes
    assert torch.equal(_logits(model, data[0]), expected)
    over = rw.adapt(quantized, "lora", r=4)  # LoRA over a model quantized before: the same model
    assert torch.equal(_logits(over, data[0]), expected)
    for _, layer in rw.adapter_layers(model):
        assert layer.base_quantized and layer.lora_A.dtype == torch.float32  # fp32 adapters
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(8):
        loss = model(**data[step % 2]).loss
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert (p.grad is not None) == ("lora_" in name), name
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for _, layer in rw.adapter_layers(model):
        assert not layer.base_layer.weight.requires_grad and layer.base_layer.weight.grad is None


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "vera", "pissa", "olora", "bone", "lora_xs", "svfit"])
def test_methods_over_a_4bit_base_merge_and_unmerge_within_the_reported_error(method):
    data = lm_batches(2)
    model = rw.adapt(rw.quantize(make_tiny_llama(0)), method, r=4)
    layers = rw.adapter_layers(model)
    codes = {n: layer.base_layer.weight.data.clone() for n, layer in layers}
    _randomize(model, std=0.005 if method == "bone" else 0.05)
    base = {n: layer.base_weight for n, layer in layers}
    before = {n: base[n] + layer.delta_weight() for n, layer in layers}
    expected = _logits(model, data[0])
    rw.merge(model)
    for name, layer in layers:
        measured = _rel(layer.base_weight, before[name])
        assert layer.requant_error == pytest.approx(measured, rel=1e-4, abs=1e-7), name
        lost = float((layer.base_weight - before[name]).norm() / (before[name] - base[name]).norm())
        assert layer.merge_delta_error == pytest.approx(lost, rel=1e-3), name
        assert layer.requant_error < 0.15  # NF4 with 64-blocks: ~0.09 on a fresh weight
    # the merged model is off by about the requantization error (a merge cannot be exact in 4 bits)
    assert _rel(_logits(model, data[0]), expected) < 3 * max(layer.requant_error for _, layer in layers)
    rw.unmerge(model)
    for name, layer in layers:
        assert torch.equal(layer.base_layer.weight.data, codes[name]), name  # exact: the codes come back
    assert torch.allclose(_logits(model, data[0]), expected, atol=1e-5)


def test_merge_and_unload_requantizes_by_default_or_gives_a_dense_model():
    data = lm_batches(2)
    model = rw.adapt(make_tiny_llama(0), "qlora", r=4)
    _randomize(model)
    expected = _logits(model, data[0])
    dense = rw.merge_and_unload(_copy_adapted(model))
    assert isinstance(dense.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    errors = dense.rankwise_merge_errors
    assert len(errors) == 14 and all(0 < e < 0.1 for e in errors.values())
    assert _rel(_logits(dense, data[0]), expected) < 3 * max(errors.values())
    plain = rw.merge_and_unload(model, dequantize=True)
    q = plain.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == torch.float32
    assert torch.allclose(_logits(plain, data[0]), expected, atol=1e-4)
    assert set(plain.rankwise_merge_errors.values()) == {0.0}


def test_merging_a_small_update_into_4_bits_loses_it_and_warns():
    model = rw.adapt(make_tiny_llama(0), "qlora", r=4)
    _randomize(model, std=0.001)  # ‖ΔW‖ ≈ 1% of ‖W‖, a fine-tune's size: below NF4's resolution
    dense = _copy_adapted(model)
    with pytest.warns(UserWarning, match=r"dequantize=True\) keeps it exactly"):
        rw.merge_and_unload(model)
    layers = rw.adapter_layers(dense)
    for _, layer in layers:
        layer.merge()
        assert layer.requant_error < 0.05 and layer.merge_delta_error > 0.5  # small next to W, not next to ΔW
        layer.unmerge()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rw.merge_and_unload(dense, dequantize=True)


def _copy_adapted(model):
    import copy

    return copy.deepcopy(model)


def test_unload_gives_back_the_4bit_base():
    data = lm_batches(1)
    quantized = rw.quantize(make_tiny_llama(0))
    expected = _logits(quantized, data[0])
    model = rw.adapt(quantized, "lora", r=4)
    _randomize(model)
    rw.merge(model)
    base = rw.unload(model)
    assert isinstance(base.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert torch.equal(_logits(base, data[0]), expected)


@pytest.mark.parametrize("method", ["qlora", "loftq"])
def test_save_load_adapter_over_a_quantized_base(method, tmp_path):
    data = lm_batches(2)
    model = rw.adapt(make_tiny_llama(0), method, r=4, loftq_iter=2) if method == "loftq" else rw.adapt(
        make_tiny_llama(0), method, r=4
    )
    _randomize(model)
    expected = _logits(model, data[1])
    rw.save_adapter(model, tmp_path / "a")
    loaded = rw.load_adapter(make_tiny_llama(0), tmp_path / "a")
    assert all(layer.base_quantized for _, layer in rw.adapter_layers(loaded))
    assert torch.allclose(_logits(loaded, data[1]), expected, atol=1e-5)
    if method == "qlora":  # a base quantized by rw.quantize takes the same adapter
        over = rw.load_adapter(rw.quantize(make_tiny_llama(0)), tmp_path / "a")
        assert torch.allclose(_logits(over, data[1]), expected, atol=1e-5)


def test_peft_export_loads_onto_the_same_bnb_base_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    data = lm_batches(2)
    model = rw.adapt(make_tiny_llama(0), "qlora", r=4, alpha=8)
    _randomize(model)
    expected = _logits(model, data[0])
    rw.export_peft(model, tmp_path / "peft")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # the adapter only, no base
    base = rw.quantize(make_tiny_llama(0))
    base.is_loaded_in_4bit = True  # what transformers sets on a bnb-loaded model: PEFT then wraps with its bnb layer
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj, peft.tuners.lora.bnb.Linear4bit)
    assert torch.allclose(_logits(pm, data[0]), expected, atol=1e-5)


# ---------------------------------------------------------------------- LoftQ
def _loftq_errors(w: torch.Tensor, r: int, alpha: float, iters: range) -> list[float]:
    out = []
    for t in iters:
        cfg = QLoRAConfig(r=r, alpha=alpha, init="loftq", loftq_iter=t)
        f = loftq_init(w, InitContext(config=cfg, r=r, scale=cfg.scale))
        out.append(float((w - quant.dequantize_tensor(f.base) - cfg.scale * f.left @ f.right).norm()))
    return out


def test_loftq_error_falls_with_t_and_beats_qlora():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.02 + 0.1 * torch.randn(96, 6, generator=g) @ torch.randn(
        6, 128, generator=g
    ) / 8
    qlora = float((w - quant.dequantize_tensor(quant.quantize_tensor(w))).norm())
    errors = _loftq_errors(w, r=8, alpha=16.0, iters=range(1, 6))
    assert errors[0] < 0.95 * qlora, (errors, qlora)
    assert all(b <= a * (1 + 1e-4) for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.97 * errors[0], errors


def test_loftq_model_starts_near_the_full_precision_model_and_closer_than_qlora():
    data = lm_batches(1)
    fp = _logits(make_tiny_llama(0), data[0])
    qlora = _logits(rw.adapt(make_tiny_llama(0), "qlora", r=4), data[0])
    model = rw.adapt(make_tiny_llama(0), "loftq", r=4, alpha=8, loftq_iter=3)
    loftq = _logits(model, data[0])
    assert _rel(loftq, fp) < _rel(qlora, fp)
    for _, layer in rw.adapter_layers(model):
        assert layer.base_quantized and not layer.identity_at_init
        assert layer.init_A.shape == layer.lora_A.shape


# ---------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv,needles", [
    (["--quantize", "int4"], ["--quantize 'int4'; choose one of ['nf4', 'fp4']"]),
    (["--method", "none", "--quantize", "nf4"], ["--quantize applies to adapter methods"]),
    (["--method", "loftq", "--quantize", "nf4"], ["does not apply to LoftQ"]),
    (["--method", "qlora", "--option", "quant_type=int8"], ["quant_type='int8' is not allowed"]),
])
def test_cli_quantize_mistakes_are_one_line_exit_2(capsys, argv, needles):
    from ..cli.cli_helpers import one_line, run_cli

    code, _, err = run_cli(capsys, "train", *argv)
    assert one_line(code, err, *needles), err


def test_cli_train_quantize_nf4_trains_lora_over_a_4bit_base(tmp_path, capsys, monkeypatch):
    import json

    from ..cli.cli_helpers import HAVE_ASSETS, run_cli

    if not HAVE_ASSETS:
        pytest.skip("MiniLM tokenizer asset not installed")
    from rankwise.models import load_model, tiny_llama

    _, tok = load_model("minilm-l6", task="base")
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(vocab_size=tok.vocab_size, seed=0).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    seen = {}
    real = rw.quantize

    def spy(model, *args, **kwargs):
        seen["scheme"] = args[0] if args else kwargs.get("scheme")
        out = real(model, *args, **kwargs)
        seen["layers"] = len(out.rankwise_quantized.layers)
        return out

    monkeypatch.setattr(quant, "quantize", spy)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", str(model_dir), "--data", "stdlib-code", "--method", "lora",
                           "--quantize", "nf4", "--r", "2", "--output", str(out), "--max-steps", "2",
                           "--max-length", "32", "--train-limit", "2", "--test-limit", "1", "--no-progress")
    assert code == 0, err
    assert seen["scheme"] == "nf4" and seen["layers"] > 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["run"]["quantize"] == "nf4" and record["metrics"]["loss"] > 0


# ---------------------------------------------------------------------- other bases and dtypes
def test_gpt2_conv1d_layers_quantize_to_linear4bit_with_the_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    from .test_conv1d import make_gpt2

    data = lm_batches(1)
    fp = make_gpt2("lm", 0)
    conv = fp.transformer.h[0].attn.c_attn
    assert isinstance(conv, Conv1D)
    quantized = rw.quantize(make_gpt2("lm", 0))
    layer = quantized.transformer.h[0].attn.c_attn
    assert isinstance(layer, bnb.nn.Linear4bit) and (layer.out_features, layer.in_features) == (96, 32)
    assert _rel(quant.dequantize(layer), conv.weight.t()) < 0.15
    x = torch.randn(3, 32)
    assert _rel(layer(x), conv(x)) < 0.2
    model = rw.adapt(make_gpt2("lm", 0), "qlora", r=4)  # the Conv1D bases quantized by the layer: the same codes
    assert torch.equal(_logits(model, data[0]), _logits(quantized, data[0]))


def test_bf16_compute_dtype_keeps_fp32_adapters():
    data = lm_batches(1)
    model = rw.adapt(rw.quantize(make_tiny_llama(0), compute_dtype="bfloat16"), "lora", r=4)
    layer = rw.adapter_layers(model)[0][1]
    assert layer.base_weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    _randomize(model)
    expected = _logits(model, data[0])
    assert expected.dtype == torch.float32
    rw.merge(model)
    assert 0 < layer.requant_error < 0.15
    rw.unmerge(model)
    assert torch.equal(_logits(model, data[0]), expected)
    with rw.adapters_disabled(model):  # the 4-bit base model
        base = rw.quantize(make_tiny_llama(0), compute_dtype="bfloat16")
        assert torch.allclose(_logits(model, data[0]), _logits(base, data[0]))
    assert rw.summary(model).trainable == sum(l.trainable_count() for _, l in rw.adapter_layers(model))


@pytest.mark.parametrize("method", ["qlora", "loftq"])
def test_cli_merge_of_a_quantized_base_adapter_writes_a_plain_model(tmp_path, capsys, method):
    from transformers import AutoModelForCausalLM

    from ..cli.cli_helpers import run_cli
    from ..cli.test_export_merge import adapted, logits, model_dir

    model = adapted(model_dir(tmp_path, "llama"), "llama", method, tmp_path / "adapter")
    assert all(layer.base_quantized for _, layer in rw.adapter_layers(model))
    code, _, err = run_cli(capsys, "merge", tmp_path / "adapter", "--output", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-4, rtol=0)  # 4-bit base + ΔW, exactly
