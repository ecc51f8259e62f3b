"""Named adapters: several adapters (any mix of methods) on one model, the active set, per-example
adapters in one batch, merging, deletion, and save / load / PEFT export per name.

The model holds ``a`` (LoRA, every linear layer), ``b`` (the method under test, every linear layer)
and ``c`` (PiSSA on q/o: its init moves part of W₀ out of the shared base, so an inactive ``c``
must give it back). Each property is checked against an independent reference: a copy of the model
from which the other adapters were deleted, a fresh base model, or the saved adapter reloaded alone.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw

from ..conftest import lm_batches, make_tiny_llama, require_bnb_narrow_rows

# the quantization family quantizes the layers it adapts (tests over a 4-bit base below)
METHODS = sorted(
    m for m in rw.REGISTRY if rw.get_method(m).api == "adapt" and rw.get_method(m).family != "quantization"
    and not rw.get_method(m).needs_adapters  # built from the model's adapters (MeteoRA): tests/adapters/test_meteora.py
    and rw.get_method(m).layer_cls.stackable  # S²FT permutes its bases, which it cannot share (a clear error)
)
RANK = 4
IDS = lm_batches(n=1, batch=5, seq=10, seed=3)[0]["input_ids"]


def _randomize(model, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model, name):
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _adapt(model, method: str, name: str, **kw):
    spec = rw.get_method(method)
    data = lm_batches(n=2, batch=2, seq=8) if spec.layer_cls.needs_grad(spec.make_config(r=RANK)) else None
    return rw.adapt(model, method, r=RANK, name=name, init_data=data, **kw)


def _three(method: str):
    model = make_tiny_llama(0)
    _adapt(model, "lora", "a")
    _randomize(model, "a", 1)
    _adapt(model, method, "b")
    _randomize(model, "b", 2)
    _adapt(model, "pissa", "c", targets=["q_proj", "o_proj"])
    _randomize(model, "c", 3)
    return model


def _logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.fixture(scope="module", params=METHODS)
def three(request):
    return request.param, _three(request.param)


def test_each_adapter_alone_equals_a_model_holding_only_it(three):
    method, model = three
    model = copy.deepcopy(model)
    pristine = copy.deepcopy(model)
    for name in ("a", "b", "c"):
        alone = copy.deepcopy(pristine)
        for other in {"a", "b", "c"} - {name}:
            rw.delete_adapter(alone, other)
        assert rw.adapter_names(alone) == [name]
        assert not any(isinstance(m, rw.adapters.AdapterStack) for m in alone.modules())  # plain layers again
        rw.set_active(model, name)
        torch.testing.assert_close(_logits(model), _logits(alone), atol=2e-5, rtol=0)
    rw.set_active(model, ["a", "b", "c"])
    # no adapter active: the untouched base model (PiSSA's offset given back)
    rw.disable_adapters(model)
    torch.testing.assert_close(_logits(model), _logits(make_tiny_llama(0)), atol=2e-5, rtol=0)
    rw.enable_adapters(model)


def test_all_active_merge_equals_forward_and_unmerge_restores(three):
    method, model = three
    model = copy.deepcopy(model)
    if not rw.get_method(method).mergeable:  # no ΔW (DenseLoRA's GELU): merging is refused, naming the method
        with pytest.raises(ValueError, match=method):
            rw.merge(model)
        return
    before = _logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rw.merge(model)
    tol = 5e-4 if method in ("bone", "randlora") else 5e-5
    torch.testing.assert_close(_logits(model), before, atol=tol, rtol=0)
    rw.unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-5, rtol=0, msg=n)
    torch.testing.assert_close(_logits(model), before, atol=1e-5, rtol=0)
    plain = rw.merge_and_unload(copy.deepcopy(model))
    assert not rw.adapter_layers(plain)
    torch.testing.assert_close(_logits(plain), before, atol=tol, rtol=0)


def test_mixed_batch_rows_equal_each_adapter_alone(three):
    """``adapter_names``: row i equals the batch run with only adapter names[i] active (DoRA too)."""
    method, model = three
    model = copy.deepcopy(model)
    names = ["b", "a", None, "c", "__base__"]
    mixed = _logits(model, adapter_names=names)
    alone = {}
    for name in ("a", "b", "c"):
        rw.set_active(model, name)
        alone[name] = _logits(model)
    rw.set_active(model, ["a", "b", "c"])
    alone[None] = alone["__base__"] = _logits(make_tiny_llama(0))
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=2e-5, rtol=0, msg=f"row {i} ({name})")
    # the keyword leaves nothing behind: the next forward is the plain all-active one
    torch.testing.assert_close(_logits(model), _logits(copy.deepcopy(model)), atol=0, rtol=0)
    with rw.batch_adapters(model, names):
        torch.testing.assert_close(_logits(model), mixed, atol=0, rtol=0)


def test_train_one_adapter_while_the_others_stay_frozen(three):
    method, model = three
    model = copy.deepcopy(model)
    rw.set_active(model, "b")
    model(input_ids=IDS, labels=IDS).loss.backward()
    for target, layer in rw.adapter_layers(model):
        for p in layer.parameters():
            if layer.adapter_name == "b" and p.requires_grad:
                assert p.grad is not None, target
            else:
                assert p.grad is None and not (p.requires_grad and layer.adapter_name != "b"), target
    rows = {row.adapter for row in rw.summary(model).layers if row.trainable}
    assert rows == {"b"}


def test_save_per_name_and_all_round_trip(three, tmp_path):
    method, model = three
    rw.save_adapter(model, tmp_path / "b_only", name="b")
    only_b = rw.load_adapter(make_tiny_llama(0), tmp_path / "b_only")
    assert rw.adapter_names(only_b) == ["b"]
    alone = copy.deepcopy(model)
    rw.set_active(alone, "b")
    torch.testing.assert_close(_logits(only_b), _logits(alone), atol=2e-5, rtol=0)

    rw.save_adapter(model, tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["a", "b", "c"]  # no 'default': subdirs only
    back = rw.load_adapters(make_tiny_llama(0), tmp_path / "all")
    assert rw.adapter_names(back) == ["a", "b", "c"]
    torch.testing.assert_close(_logits(back), _logits(model), atol=2e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="load_adapters"):
        rw.load_adapter(make_tiny_llama(0), tmp_path / "all")


def test_peft_multi_adapter_layout_loads_in_peft(tmp_path):
    """export_peft of two adapters writes PEFT's save_pretrained layout; PEFT's set_adapter gives the
    rankwise outputs of each adapter alone."""
    peft = pytest.importorskip("peft")
    model = make_tiny_llama(0)
    rw.adapt(model, "lora", r=RANK, name="default")
    _randomize(model, "default", 1)
    rw.adapt(model, "dora", r=RANK, name="other", targets=["q_proj", "v_proj"])
    _randomize(model, "other", 2)
    rw.export_peft(model, tmp_path / "p")
    assert (tmp_path / "p" / "adapter_config.json").is_file()
    assert (tmp_path / "p" / "other" / "adapter_config.json").is_file()
    loaded = peft.PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / "p")
    loaded.load_adapter(tmp_path / "p" / "other", adapter_name="other")
    for name in ("default", "other"):
        loaded.set_adapter(name)
        rw.set_active(model, name)
        torch.testing.assert_close(_logits(loaded), _logits(model), atol=2e-5, rtol=0, msg=name)
    back = rw.import_peft(make_tiny_llama(0), tmp_path / "p")
    rw.import_peft(back, tmp_path / "p" / "other", name="other")
    rw.set_active(back, "other")
    torch.testing.assert_close(_logits(back), _logits(model), atol=2e-5, rtol=0)


def test_deleting_an_offset_adapter_gives_its_part_of_w0_back():
    model = make_tiny_llama(0)
    rw.adapt(model, "pissa", r=RANK, name="p")
    rw.adapt(model, "lora", r=RANK, name="l")
    _randomize(model, "l", 5)
    rw.delete_adapter(model, "p")
    reference = rw.adapt(make_tiny_llama(0), "lora", r=RANK, name="l")
    for (_, got), (_, want) in zip(rw.adapter_layers(model), rw.adapter_layers(reference), strict=True):
        torch.testing.assert_close(got.base_weight, want.base_weight, atol=1e-6, rtol=0)
    rw.delete_adapter(model, "l")
    assert not rw.adapter_names(model) and not rw.adapter_layers(model)
    torch.testing.assert_close(_logits(model), _logits(make_tiny_llama(0)), atol=1e-5, rtol=0)


def test_errors_name_the_adapter():
    model = rw.adapt(make_tiny_llama(0), "lora", r=RANK, name="a")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        rw.adapt(model, "dora", r=RANK, name="a")
    for bad in ("", "x.y", "__base__", "a/b"):
        with pytest.raises(ValueError, match="is not a valid adapter name"):
            rw.adapt(model, "lora", r=RANK, name=bad)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        rw.set_active(model, ["a", "nope"])
    with pytest.raises(ValueError, match="adapter name='nope' is not on the model"):
        rw.delete_adapter(model, "nope")
    with pytest.raises(ValueError, match=r"adapter_names has unknown adapter\(s\) \['zz'\]"):
        model(input_ids=IDS, adapter_names=["a", "zz", None, None, None])
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 5 examples"):
        model(input_ids=IDS, adapter_names=["a", None])
    assert all(layer.batch_names is None for _, layer in rw.adapter_layers(model))  # reset after an error
    rw.adapt(model, "vera", r=RANK, name="v")
    with pytest.raises(ValueError, match="several adapters"):
        rw.adapter_state(model)
    rw.merge(model)
    with pytest.raises(ValueError, match="merged"):
        rw.set_active(model, "a")
    with pytest.raises(ValueError, match="merged"):
        rw.adapt(model, "lora", r=RANK, name="z")
    with pytest.raises(ValueError, match="unmerge"):
        model(input_ids=IDS, adapter_names=["a"] * 5)


def test_named_adapters_share_a_4bit_base():
    """rw.quantize, then LoRA + DoRA: each alone equals the model holding only it, per-example
    adapters equal each alone, and unmerge gives the 4-bit codes back exactly."""
    require_bnb_narrow_rows()
    pytest.importorskip("bitsandbytes")
    model = rw.quantize(make_tiny_llama(0))
    rw.adapt(model, "lora", r=RANK, name="a")
    _randomize(model, "a", 1)
    rw.adapt(model, "dora", r=RANK, name="b", targets=["q_proj", "v_proj"])
    _randomize(model, "b", 2)
    names = ["b", "a", None, "b", "a"]
    mixed = _logits(model, adapter_names=names)
    alone = {}
    pristine = copy.deepcopy(model)
    for name in ("a", "b"):
        only = copy.deepcopy(pristine)
        rw.delete_adapter(only, "b" if name == "a" else "a")
        rw.set_active(model, name)
        alone[name] = _logits(model)
        torch.testing.assert_close(alone[name], _logits(only), atol=2e-5, rtol=0)
    alone[None] = _logits(rw.quantize(make_tiny_llama(0)))
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=2e-5, rtol=0, msg=f"row {i}")
    rw.set_active(model, ["a", "b"])
    codes = {n: b.detach().clone() for n, b in model.named_parameters() if b.dtype == torch.uint8}
    rw.merge(model)
    rw.unmerge(model)
    for n, b in model.named_parameters():
        if n in codes:
            assert torch.equal(b, codes[n]), n
    rw.adapt(model, "qlora", r=RANK, name="q")  # over a 4-bit base qlora is plain LoRA: it shares it
    plain = rw.adapt(make_tiny_llama(0), "lora", r=RANK, name="a")
    before = _logits(plain)
    with pytest.raises(ValueError, match="method 'qlora' replaces the base layer"):
        rw.adapt(plain, "qlora", r=RANK, name="q")
    assert rw.adapter_names(plain) == ["a"]
    torch.testing.assert_close(_logits(plain), before, atol=0, rtol=0)  # refused before anything changed
