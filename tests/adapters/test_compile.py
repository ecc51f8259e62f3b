"""``torch.compile`` of adapted models: no graph break for any registered method, and
``fullgraph=True`` forward + backward equal to eager.

The compile check uses the ``aot_eager`` backend (Dynamo capture and AOT autograd, which traces the
custom autograd Functions' backward too, without Inductor's code generation) to stay fast on CPU;
``benchmarks/adapter_compile.py`` times the Inductor build. Every method runs in the ``slow``
set; LoRA (the fused kernel), DoRA (its own kernel) and VeRA (shared buffers) in the default run.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw

from ..conftest import cls_batches, make_tiny_bert, require_bnb_narrow_rows

# the quantized-base methods (qlora, loftq) have their own tests (tests/adapters/test_qlora.py): they do
# not start at the full-precision base, which this matrix checks
METHODS = sorted(n for n, s in rw.REGISTRY.items() if s.family != "quantization" and not s.needs_adapters)
DEFAULT = ["dora", "lora", "vera"]
EVERY = [m if m in DEFAULT else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]


def _model(method: str, dtype: torch.dtype = torch.float32, **options):
    data = cls_batches(seed=8)
    spec = rw.get_method(method)
    needs_data = spec.layer_cls.needs_grad(spec.make_config(r=4))
    model = rw.adapt(make_tiny_bert(0).to(dtype), method, r=4, init_data=data if needs_data else None, **options)
    g = torch.Generator().manual_seed(1)
    std = 0.005 if method == "randlora" else 0.05
    with torch.no_grad():  # ΔW ≠ 0
        for _, layer in rw.adapter_layers(model):
            for name, p in layer.named_parameters():
                if p.requires_grad and not name.startswith("base_layer."):
                    p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    return model, data


def _breaks(model, batch) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(**batch).graph_break_count


def _step(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {
        n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    return out.logits.detach(), grads


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return bool((a.float() - b.float()).norm() <= tol * b.float().norm() + 1e-7)


@pytest.mark.parametrize("method", EVERY)
def test_no_graph_breaks(method):
    model, data = _model(method)
    assert _breaks(model, data[0]) == 0


@pytest.mark.parametrize("method", ["lora", "dora", pytest.param("bone", marks=pytest.mark.slow),
                                    pytest.param("randlora", marks=pytest.mark.slow)])
def test_no_graph_breaks_with_adapter_dropout_in_training(method):
    """Adapter dropout active (train mode): the fused kernel gets a separate x_d, Bone / RandLoRA /
    DoRA take their general routes; still one graph."""
    model, data = _model(method, dropout=0.1)
    model.train()
    assert _breaks(model, data[0]) == 0


@pytest.mark.parametrize("method", EVERY)
def test_fullgraph_compile_matches_eager(method):
    model, data = _model(method)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for batch in data[:2]:
        logits, grads = _step(compiled, batch)
        want_logits, want_grads = _step(eager, batch)
        assert _close(logits, want_logits, 1e-5)
        assert set(grads) == set(want_grads) and grads
        for name, g in grads.items():
            assert _close(g, want_grads[name], 1e-4), name


def test_fullgraph_compile_of_fp32_lora_on_a_bf16_base_matches_eager():
    model, data = _model("lora", torch.bfloat16)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    logits, grads = _step(torch.compile(model, fullgraph=True, backend="aot_eager"), data[0])
    want_logits, want_grads = _step(eager, data[0])
    assert logits.dtype == torch.bfloat16 and _close(logits, want_logits, 1e-2)
    for name, g in grads.items():
        assert _close(g, want_grads[name], 1e-2), name


def _randomized(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            for name, p in layer.named_parameters():
                if p.requires_grad and not name.startswith("base_layer."):
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("kind", ["stacked", "qlora"])
def test_fullgraph_compile_of_stacked_adapters_and_a_4bit_base(kind):
    """Two named adapters on every layer (LoRA + DoRA, both active: the AdapterStack path) and LoRA over a
    bitsandbytes NF4 base compile in one graph, forward and backward equal to eager."""
    if kind == "qlora":
        require_bnb_narrow_rows()
    model = make_tiny_bert(0)
    if kind == "stacked":
        rw.adapt(model, "lora", r=4, name="a")
        rw.adapt(model, "dora", r=4, name="b")
        rw.set_active(model, ["a", "b"])
    else:
        pytest.importorskip("bitsandbytes")
        rw.adapt(model, "qlora", r=4)
    model = _randomized(model)
    data = cls_batches(seed=8)
    assert _breaks(model, data[0]) == 0
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    logits, grads = _step(torch.compile(model, fullgraph=True, backend="aot_eager"), data[0])
    want_logits, want_grads = _step(eager, data[0])
    assert _close(logits, want_logits, 1e-5) and set(grads) == set(want_grads) and grads
    for name, g in grads.items():
        assert _close(g, want_grads[name], 1e-4), name
