"""Adapter precision: fp32 adapters (``adapter_dtype``) over bf16 / fp16 / autocast bases, for every
registered method — trainable tensors and frozen factor buffers in fp32, the output in the base
dtype, gradients equal to an fp32 reference within bf16/fp16 rounding, GradScaler steps on an fp16
base, merge / unmerge / unload / save / load / PEFT export keeping the base dtype."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.adapters.base import ADAPTER_DTYPES

from ..conftest import cls_batches, lm_batches, make_tiny_bert, make_tiny_llama

# the quantized-base methods (qlora, loftq) have their own tests (tests/adapters/test_qlora.py): they do
# not start at the full-precision base, which this matrix checks
METHODS = sorted(n for n, s in rw.REGISTRY.items() if s.family != "quantization" and not s.needs_adapters)
RANK = 4
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# options that keep ΔW of the order of W on the tiny model: FourierFT's default α = 150 is sized for
# 768-wide layers (the inverse DFT divides by out·in) and gives ΔW ≈ 160·W₀ on 32-wide ones; DeLoRA's
# default λ = 15 makes its one-scalar λ gradient a sum with too much cancellation for bf16; PST's U is
# N(0, 1) (the authors' init), so β = 0.1 keeps β·U·V of the order of W; LoTR's N(0, 1) shared factors
# give ‖ΔW‖ ≈ 4–7·‖W₀‖ at α = 1 on the tiny model (0.4–0.7 at α = 0.1)
TAME = {"fourierft": {"scaling": 1.0}, "delora": {"delora_lambda": 1.0}, "pst": {"beta": 0.1}, "lotr": {"alpha": 0.1}}


def _needs_data(method: str) -> bool:
    spec = rw.get_method(method)
    return spec.layer_cls.needs_grad(spec.make_config(r=RANK))


def _randomize(model, seed: int = 1) -> None:
    """Non-trivial values for every trainable adapter tensor, so ΔW ≠ 0 but stays of the order of W
    (RandLoRA's ΔW sums n·r terms at scale 20: a smaller step keeps the model well conditioned)."""
    g = torch.Generator().manual_seed(seed)
    std = 0.005 if rw.adapter_state(model).method == "randlora" else 0.1
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            for name, p in layer.named_parameters():
                if p.requires_grad and not name.startswith("base_layer."):
                    p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def _adapter_tensors(layer):
    """The adapter layer's own floating tensors (parameters and buffers, the base layer excluded)."""
    items = [*layer.named_parameters(), *layer.named_buffers()]
    return {n: t for n, t in items if not n.startswith("base_layer.") and t.is_floating_point()}


def _permutes_only(layer) -> bool:
    """A layer with no tensors of its own that only reorders its base (S²FT's producer layers)."""
    return not _adapter_tensors(layer) and layer.trainable_count() == 0


def _pair(method: str, dtype: torch.dtype, tmp_path):
    """(fp32 reference, the same adapted Llama on a ``dtype`` base): the reference's base weights are
    the ``dtype`` ones upcast, the adapter tensors are identical (saved and loaded with rw.save_adapter
    / rw.load_adapter); only the compute precision differs."""
    data = lm_batches(seed=3)
    ref = make_tiny_llama(0).to(dtype).float()
    rw.adapt(ref, method, r=RANK, init_data=data if _needs_data(method) else None, **TAME.get(method, {}))
    _randomize(ref)
    rw.save_adapter(ref, tmp_path / "ref")
    low = rw.load_adapter(make_tiny_llama(0).to(dtype), tmp_path / "ref")
    ref.load_state_dict(low.state_dict())  # PiSSA-style base offsets: the same rounded residual in both
    return ref, low, data


def _grads(model, batch, autocast: bool = False):
    """(output, adapter gradients); ``autocast``: the forward under CPU bf16 autocast, the backward outside it
    (as torch's AMP recipe, the transformers Trainer and rankwise's loop run it)."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch)
    out.loss.backward()
    grads = {
        f"{ln}.{n}": p.grad.detach().clone()
        for ln, layer in rw.adapter_layers(model)
        for n, p in layer.named_parameters() if p.requires_grad
    }
    return out, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


# ---------------------------------------------------------------------- the option
@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, torch.bfloat16), ("base", torch.bfloat16), ("float32", torch.float32), (torch.float32, torch.float32),
     ("bfloat16", torch.bfloat16), ("torch.float16", torch.float16), (torch.float64, torch.float64)],
)
def test_adapter_dtype_values(value, expected):
    model = rw.adapt(make_tiny_llama(0).to(torch.bfloat16), "lora", r=2, adapter_dtype=value)
    for _, layer in rw.adapter_layers(model):
        assert layer.lora_A.dtype == layer.lora_B.dtype == expected
        assert layer.base_layer.weight.dtype == torch.bfloat16


def test_adapter_dtype_default_is_float32_on_every_base():
    assert rw.get_method("lora").make_config().adapter_dtype == "float32"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = rw.adapt(make_tiny_llama(0).to(dtype), "lora", r=2)
        assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("value", ["fp32", "int8", torch.int32, 32, "half"])
def test_bad_adapter_dtype_is_an_error_naming_it(value):
    with pytest.raises(ValueError) as err:
        rw.adapt(make_tiny_llama(0), "lora", r=2, adapter_dtype=value)
    message = str(err.value)
    assert message.startswith(f"adapter_dtype={value!r} is not allowed; choose one of [")
    assert all(repr(name) in message for name in [*ADAPTER_DTYPES, "base"]) and "None" in message


# ---------------------------------------------------------------------- the reproduction
def test_five_adamw_steps_on_a_bf16_base_change_all_of_lora_A():
    """Issue 9: bf16 adapters move ~5% of lora_A's entries in five AdamW steps at lr 1e-5 (an update
    of ~1e-5 is below half a bf16 ulp of entries of ~0.1); fp32 adapters move them all."""
    model = rw.adapt(make_tiny_bert(0).to(torch.bfloat16), "lora", r=4)
    before = {n: l.lora_A.detach().clone() for n, l in rw.adapter_layers(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for batch in cls_batches(n=5, seed=2):
        opt.zero_grad()
        out = model(**batch)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
        opt.step()
    changed = sum(int((l.lora_A != before[n]).sum()) for n, l in rw.adapter_layers(model))
    total = sum(t.numel() for t in before.values())
    assert changed / total > 0.99


# ---------------------------------------------------------------------- every method, every base
@pytest.mark.parametrize("method", METHODS)
def test_adapter_tensors_are_fp32_over_a_bf16_base(method):
    data = lm_batches()
    model = rw.adapt(make_tiny_llama(0).to(torch.bfloat16), method, r=RANK,
                     init_data=data if _needs_data(method) else None)
    for name, layer in rw.adapter_layers(model):
        assert layer.base_layer.weight.dtype == torch.bfloat16
        tensors = _adapter_tensors(layer)
        if _permutes_only(layer):
            continue
        assert tensors and {n: t.dtype for n, t in tensors.items()} == dict.fromkeys(tensors, torch.float32), name


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_half_base_forward_backward_match_fp32(method, mode, tmp_path):
    """Pure bf16 / fp16 base: output in the base dtype, fp32 gradients for fp32 adapters, equal to
    the fp32 model's (same weights) within the half type's rounding."""
    dtype = HALF[mode]
    ref, low, data = _pair(method, dtype, tmp_path)
    out_ref, g_ref = _grads(ref, data[0])
    out, g = _grads(low, data[0])
    assert out.logits.dtype == dtype
    assert set(g) == set(g_ref) and g
    tol = 0.05 if dtype is torch.bfloat16 else 0.01
    assert _rel(out.logits, out_ref.logits) < tol
    for name, grad in g.items():
        assert grad.dtype == torch.float32, name
        assert torch.isfinite(grad).all(), name
        assert _rel(grad, g_ref[name]) < tol, (name, _rel(grad, g_ref[name]))


@pytest.mark.parametrize("method", METHODS)
def test_autocast_forward_backward_match_fp32(method):
    """An fp32 model whose forward runs under ``torch.autocast("cpu", bfloat16)`` (backward outside it): fp32
    gradients, close to the gradients without autocast within bf16 rounding."""
    data = lm_batches(seed=3)
    model = rw.adapt(make_tiny_llama(0), method, r=RANK, init_data=data if _needs_data(method) else None,
                     **TAME.get(method, {}))
    _randomize(model)
    out_ref, g_ref = _grads(model, data[0])
    out, g = _grads(model, data[0], autocast=True)
    assert out.logits.dtype == torch.bfloat16  # lm_head runs under autocast
    assert _rel(out.logits, out_ref.logits) < 0.05
    for name, grad in g.items():  # 0.06: OLoRA's reached 0.052 with native bf16 matmuls (AVX-512), 0.04 on AVX2
        assert grad.dtype == torch.float32, name
        assert _rel(grad, g_ref[name]) < 0.06, (name, _rel(grad, g_ref[name]))


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_fp16_base_trains_with_grad_scaler(method):
    """GradScaler unscales only fp32 gradients: with fp32 adapters an fp16 model steps; with
    ``adapter_dtype="base"`` (fp16 adapters) the scaler refuses, as for any fp16 parameter."""
    batch = lm_batches(seed=4)[0]
    model = rw.adapt(make_tiny_llama(0).half(), method, r=RANK)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(**batch).loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 1024.0  # no inf/nan found: the step was taken
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    fp16 = rw.adapt(make_tiny_llama(0).half(), method, r=RANK, adapter_dtype="base")
    opt16 = torch.optim.AdamW([p for p in fp16.parameters() if p.requires_grad], lr=1e-3)
    scaler16 = torch.amp.GradScaler("cpu")
    scaler16.scale(fp16(**batch).loss).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler16.step(opt16)


def test_fused_kernel_mixed_dtypes_against_fp32_autograd():
    """``low_rank_linear`` with a bf16 base and fp32 factors: bf16 output, fp32 factor gradients equal
    to plain fp32 autograd on the same (bf16-representable) values within bf16 rounding; with and
    without a separate dropout input."""
    from rankwise.adapters.kernels import low_rank_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g).bfloat16()
    w, bias = torch.randn(12, 16, generator=g).bfloat16(), torch.randn(12, generator=g).bfloat16()
    a, b = torch.randn(3, 16, generator=g), torch.randn(12, 3, generator=g)
    for x_d in (None, (x * 2).requires_grad_()):
        xs, a1, b1 = x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
        y = low_rank_linear(xs, x_d, w, bias, a1, b1, 0.5)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        xr, a2, b2 = x.float().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
        xd_r = xr if x_d is None else x_d.detach().float().requires_grad_()
        y_ref = xr @ w.float().t() + bias.float() + 0.5 * (xd_r @ a2.t()) @ b2.t()
        y_ref.square().sum().backward()
        assert a1.grad.dtype == b1.grad.dtype == torch.float32 and xs.grad.dtype == torch.bfloat16
        assert _rel(y, y_ref) < 0.01
        for got, want in ((a1.grad, a2.grad), (b1.grad, b2.grad), (xs.grad, xr.grad)):
            assert _rel(got, want) < 0.02
        if x_d is not None:
            assert x_d.grad.dtype == torch.bfloat16 and _rel(x_d.grad, xd_r.grad) < 0.02


def test_fused_kernel_under_no_grad_is_the_same_math_without_an_autograd_node():
    """Inference (``torch.no_grad``) skips the autograd Function: bit-identical output, no graph."""
    from rankwise.adapters.kernels import low_rank_linear

    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 4, 16, generator=g).to(dtype)
        w, bias = torch.randn(12, 16, generator=g).to(dtype), torch.randn(12, generator=g).to(dtype)
        a, b = torch.randn(3, 16, generator=g).requires_grad_(), torch.randn(12, 3, generator=g).requires_grad_()
        with_grad = low_rank_linear(x, None, w, bias, a, b, 0.5)
        with torch.no_grad():
            without = low_rank_linear(x, None, w, bias, a, b, 0.5)
        assert with_grad.grad_fn is not None and without.grad_fn is None
        assert without.dtype == dtype and torch.equal(without, with_grad.detach())


# ---------------------------------------------------------------------- whole-model operations
@pytest.mark.parametrize("method", [m for m in METHODS if rw.REGISTRY[m].mergeable])  # denselora has no ΔW
def test_bf16_base_merge_unmerge_unload_keep_the_base_dtype(method, tmp_path):
    ref, low, data = _pair(method, torch.bfloat16, tmp_path)
    batch = data[1]
    assert {t.dtype for _, l in rw.adapter_layers(low) for t in _adapter_tensors(l).values()} == {torch.float32}
    w0 = {n: l.original_weight() for n, l in rw.adapter_layers(low)}
    frozen = {n: l.base_layer.weight.detach().clone() for n, l in rw.adapter_layers(low)}
    with torch.no_grad():
        expected = low(**batch).logits
        rw.merge(low)
        merged = low(**batch).logits
        assert merged.dtype == torch.bfloat16 and _rel(merged, expected) < 0.05
        rw.unmerge(low)
        for name, layer in rw.adapter_layers(low):
            w = layer.base_layer.weight
            assert w.dtype == torch.bfloat16
            # W₀ back up to the bf16 rounding of W₀ + ΔW (Bone's blockwise inverse amplifies it a little)
            assert _rel(w, frozen[name]) < 0.02, name
        rw.save_adapter(low, tmp_path / "low")
        again = rw.load_adapter(make_tiny_llama(0).to(torch.bfloat16), tmp_path / "low")
        for (_, a), (_, b) in zip(rw.adapter_layers(again), rw.adapter_layers(low), strict=True):
            for name, t in _adapter_tensors(b).items():
                assert torch.equal(_adapter_tensors(a)[name], t), name  # fp32 values stored as fp32
        if rw.get_method(method).export != "none":
            rw.export_peft(low, tmp_path / "peft")
            imported = rw.import_peft(make_tiny_llama(0).to(torch.bfloat16), tmp_path / "peft")
            assert _rel(imported(**batch).logits, expected) < 0.05
        plain = rw.merge_and_unload(again)
        assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
        assert _rel(plain(**batch).logits, expected) < 0.05
        base = rw.unload(low)
        for name, w in w0.items():
            got = base.get_submodule(name).weight
            assert got.dtype == torch.bfloat16 and _rel(got, w) < 0.02, name


@pytest.mark.parametrize("method", METHODS)
def test_casting_the_adapted_model_afterwards_still_runs(method):
    """``model.to(torch.bfloat16)`` after ``adapt`` casts the adapters too; the layers then compute
    the delta in bf16 (the dtype their tensors have), as before fp32 adapters existed."""
    data = lm_batches()
    model = rw.adapt(make_tiny_llama(0), method, r=RANK, init_data=data if _needs_data(method) else None)
    model.to(torch.bfloat16)
    for _, layer in rw.adapter_layers(model):
        assert _permutes_only(layer) or layer.adapter_dtype == torch.bfloat16
    out = model(**data[0])
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
