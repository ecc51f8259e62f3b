"""Adapters on ``nn.Embedding``, ``nn.Conv1d`` and ``nn.Conv2d`` bases (issue "Adapter core v2" §4).

Faithfulness: every expected output is computed here from the layer's raw tensors in the base module's
own weight layout, independently of the adapter code: an embedding's update is (B·A)ᵀ in its
(num_embeddings, dim) layout (PEFT's ``embedding(ids, Aᵀ)·Bᵀ``), a convolution's is B·A reshaped to its
(out, in, *k) kernel (PEFT's ``lora_B(lora_A(x))`` with A the base's kernel and B a 1×1 conv), DoRA's
norm runs over every dim but the output channel (a column of the embedding table). A transposed A, a
swapped A/B or kernel, or a norm over the wrong dim breaks them. PEFT parity both ways on the same model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import rankwise as rw
from rankwise.targets import find_targets

from ..conftest import lm_batches, make_tiny_llama

# allora, cola, convlora, lora_dropout, lora_pro, loraplus, flora_batched, roselora: LoRA layers
SUPPORTED = ["allora", "ba_lora", "cola", "convlora", "dora", "fast_forward", "flora_batched", "loft", "lora",
             "lora_dropout", "lora_ggpo", "lora_pro", "loraplus", "olora", "pissa", "roselora", "rslora"]
UNSUPPORTED = sorted(n for n in rw.REGISTRY if n not in SUPPORTED and not rw.REGISTRY[n].needs_adapters)
TARGETS = ["emb", "c1", "c2"]
KIND_OF = {"emb": nn.Embedding, "c1": nn.Conv1d, "c2": nn.Conv2d}
RANK = 2


class Tiny(nn.Module):
    """Token ids → embedding (padding_idx 0) → Conv1d over the sequence → Conv2d (strided, padded,
    non-square kernel; optionally dilated) → linear head."""

    def __init__(self, dilation: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.c1 = nn.Conv1d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, (3, 2), stride=(1, 2), padding=1, dilation=dilation)
        self.head = nn.Linear(5, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids).transpose(1, 2)  # (N, 8, T)
        h = torch.tanh(self.c1(h))  # (N, 6, T)
        h = torch.tanh(self.c2(h.unsqueeze(-1) * torch.linspace(0.5, 1.5, 4)))  # (N, 5, T', 2)
        return self.head(h.mean((2, 3)))


def make_tiny(seed: int = 0, **kwargs) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(**kwargs).eval()


def ids(seed: int = 3, n: int = 4) -> torch.Tensor:
    t = torch.randint(0, 20, (n, 7), generator=torch.Generator().manual_seed(seed))
    t[0, 0] = 0  # the padding id too
    return t


def adapt(model: nn.Module, method: str, targets=TARGETS, **options) -> nn.Module:
    alpha = None if method in ("allora", "loft") else 3  # ALLoRA and LoFT have no scaling factor
    return rw.adapt(model, method, targets=targets, r=RANK, alpha=alpha, trainable=None, **options)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def expected_weight(layer) -> torch.Tensor:
    """The adapted weight in the base module's own layout, from the raw tensors: W + s·BA (LoRA; W the
    frozen base, which holds W₀ − s₀B₀A₀ after PiSSA / OLoRA) or DoRA's m ⊙ V / ‖V‖ per output channel."""
    base = layer.base_layer
    w = base.weight.detach().clone()
    ba = layer.scale * (layer.lora_B @ layer.lora_A)  # (out, in) of the map
    if isinstance(base, nn.Embedding):  # the table (num_embeddings, dim): one-hot(id) → row, so ΔW = (BA)ᵀ
        v = w + ba.t()
        if layer.method == "dora":  # output channel = column of the table
            v = v * (layer.magnitude / v.norm(dim=0)).unsqueeze(0)
        return v
    v = w + ba.reshape(w.shape)  # conv kernel (out, in, *k)
    if layer.method == "dora":
        norm = v.flatten(1).norm(dim=1)
        v = v * (layer.magnitude / norm).reshape(-1, *(1,) * (w.dim() - 1))
    return v


def dense_twin(base: nn.Module, model: nn.Module) -> nn.Module:
    """``base`` with every adapted layer's weight replaced by ``expected_weight``."""
    twin = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in rw.adapter_layers(model):
            twin.get_submodule(name).weight.copy_(expected_weight(layer))
    return twin


def outputs(model: nn.Module, seed: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return model(ids(seed))


def test_the_declared_support_is_this_list():
    declared = sorted(
        n for n, spec in rw.REGISTRY.items()
        if spec.layer_cls.supported_kinds(spec.make_config(r=RANK)) == ("linear", "embedding", "conv")
    )
    assert declared == SUPPORTED
    assert all(rw.REGISTRY[n].layer_cls.supported_kinds(rw.REGISTRY[n].make_config(r=RANK)) == ("linear",)
               for n in UNSUPPORTED)


# ------------------------------------------------------------------------------ the forward
@pytest.mark.parametrize("method", SUPPORTED)
def test_identity_at_init_and_the_dense_formula(method):
    base = make_tiny()
    model = adapt(copy.deepcopy(base), method)
    layers = dict(rw.adapter_layers(model))
    assert {n: type(layer.base_layer) for n, layer in layers.items()} == KIND_OF
    assert (layers["emb"].out_features, layers["emb"].in_features) == (8, 20)  # (dim, num_embeddings)
    assert (layers["c2"].out_features, layers["c2"].in_features) == (5, 6 * 3 * 2)  # (out, in·kh·kw)
    torch.testing.assert_close(outputs(model), outputs(base), atol=1e-5, rtol=0)
    if method in ("lora", "rslora", "dora"):  # PEFT's embedding init: A = 0, B ~ N(0, 1); conv: B = 0
        assert torch.all(layers["emb"].lora_A == 0) and layers["emb"].lora_B.abs().sum() > 0
        assert torch.all(layers["c2"].lora_B == 0) and layers["c2"].lora_A.abs().sum() > 0
    randomize(model)
    got = outputs(model)
    assert (got - outputs(base)).abs().max() > 1e-2
    torch.testing.assert_close(got, outputs(dense_twin(base, model)), atol=1e-5, rtol=0)
    # the same per layer, on its own input (and ΔW in the (out, in) view)
    inputs = {"emb": ids(), "c1": torch.randn(3, 8, 9), "c2": torch.randn(3, 6, 9, 4)}
    for name, layer in layers.items():
        module, x = dense_twin(base, model).get_submodule(name), inputs[name]
        with torch.no_grad():
            torch.testing.assert_close(layer(x), module(x), atol=1e-5, rtol=0, msg=name)


def test_dilated_conv2d_uses_the_base_dilation():
    base = make_tiny(dilation=(2, 1))
    model = adapt(copy.deepcopy(base), "lora")
    randomize(model)
    torch.testing.assert_close(outputs(model), outputs(dense_twin(base, model)), atol=1e-5, rtol=0)


def test_embedding_delta_is_a_lookup_of_a_transposed():
    """ΔW of an embedding in the (out, in) = (dim, num_embeddings) view is s·B·A, the table gets (s·B·A)ᵀ."""
    model = adapt(make_tiny(), "lora", targets=["emb"])
    randomize(model)
    layer = dict(rw.adapter_layers(model))["emb"]
    t = torch.tensor([[3, 0, 19]])
    with torch.no_grad():
        want = layer.base_layer(t) + layer.scale * layer.lora_A.t()[t] @ layer.lora_B.t()
        torch.testing.assert_close(layer(t), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.delta_weight(), layer.scale * layer.lora_B @ layer.lora_A)


# ------------------------------------------------------------------------------ merge / unload / save
@pytest.mark.parametrize("method", SUPPORTED)
def test_merge_unmerge_unload(method):
    base = make_tiny()
    model = adapt(copy.deepcopy(base), method)
    randomize(model)
    expected = outputs(model)
    layers = rw.adapter_layers(model)
    frozen = {n: layer.base_layer.weight.detach().clone() for n, layer in layers}
    merged_want = {n: expected_weight(layer) for n, layer in layers}
    rw.merge(model)
    torch.testing.assert_close(outputs(model), expected, atol=1e-5, rtol=0)
    for name, layer in layers:
        torch.testing.assert_close(layer.base_layer.weight, merged_want[name], atol=1e-5, rtol=0, msg=name)
    rw.unmerge(model)
    for name, layer in layers:
        torch.testing.assert_close(layer.base_layer.weight, frozen[name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(outputs(model), expected, atol=1e-5, rtol=0)

    plain = rw.merge_and_unload(copy.deepcopy(model))
    assert not rw.adapter_layers(plain)
    assert {n: type(plain.get_submodule(n)) for n in TARGETS} == KIND_OF
    torch.testing.assert_close(outputs(plain), expected, atol=1e-5, rtol=0)

    rw.merge(model)
    rw.unload(model)
    for name, module in base.named_modules():
        if name in TARGETS:
            assert type(model.get_submodule(name)) is type(module)
            torch.testing.assert_close(model.get_submodule(name).weight, module.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs(model), outputs(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", SUPPORTED)
def test_save_load_round_trip(method, tmp_path):
    base = make_tiny()
    model = adapt(copy.deepcopy(base), method)
    randomize(model)
    rw.save_adapter(model, tmp_path / "a")
    loaded = rw.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert torch.equal(outputs(loaded), outputs(model))
    for (name, t), (_, u) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items()), strict=True):
        assert torch.equal(t, u), name


@pytest.mark.parametrize("method", SUPPORTED)
def test_gradients_reach_only_adapter_parameters(method):
    model = adapt(make_tiny(), method)
    randomize(model)
    model.train()
    model(ids()).square().sum().backward()
    for name, p in model.named_parameters():
        if ".base_layer." in name or name.startswith("head."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    layer = dict(rw.adapter_layers(model))["emb"]
    assert torch.all(layer.lora_A.grad[:, 0] == 0)  # padding_idx: its column of A gets no gradient (PEFT's)


# ------------------------------------------------------------------------------ PEFT
@pytest.mark.parametrize("method", [m for m in SUPPORTED if rw.REGISTRY[m].export != "none"])
def test_export_to_peft_gives_the_same_outputs(method, tmp_path):
    peft = pytest.importorskip("peft")
    base = make_tiny()
    model = adapt(copy.deepcopy(base), method)
    randomize(model)
    rw.export_peft(model, tmp_path / "p")
    tensors = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    rank = RANK * (2 if method in ("pissa", "olora", "ba_lora") else 1)  # the init offset is a second block
    shapes = {
        "base_model.model.emb.lora_embedding_A": (rank, 20),
        "base_model.model.emb.lora_embedding_B": (8, rank),
        "base_model.model.c1.lora_A.weight": (rank, 8, 3),
        "base_model.model.c1.lora_B.weight": (6, rank, 1),
        "base_model.model.c2.lora_A.weight": (rank, 6, 3, 2),
        "base_model.model.c2.lora_B.weight": (5, rank, 1, 1),
    }
    if method == "dora":
        shapes.update({
            "base_model.model.emb.lora_magnitude_vector": (8,),
            "base_model.model.c1.lora_magnitude_vector": (1, 6, 1),
            "base_model.model.c2.lora_magnitude_vector": (1, 5, 1, 1),
        })
    assert {k: tuple(t.shape) for k, t in tensors.items()} == shapes
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    torch.testing.assert_close(outputs(pm), outputs(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "rslora", "dora"])
def test_import_from_peft_gives_peft_outputs(method, tmp_path):
    peft = pytest.importorskip("peft")
    base = make_tiny()
    cfg = peft.LoraConfig(r=RANK, lora_alpha=3, target_modules=TARGETS, use_dora=method == "dora",
                          use_rslora=method == "rslora")
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    randomize(pm)
    pm.eval()
    pm.save_pretrained(tmp_path / "p")
    mine = rw.import_peft(copy.deepcopy(base), tmp_path / "p")
    assert rw.adapter_state(mine).method == method
    assert (outputs(pm) - outputs(base)).abs().max() > 1e-2
    torch.testing.assert_close(outputs(mine), outputs(pm), atol=1e-5, rtol=0)
    # and back: rankwise's export of the import loads into PEFT as the same adapter
    rw.export_peft(mine, tmp_path / "q")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "q").eval()
    torch.testing.assert_close(outputs(again), outputs(pm), atol=1e-5, rtol=0)


def test_dilated_conv_is_refused_by_peft_export(tmp_path):
    model = adapt(make_tiny(dilation=(2, 1)), "lora")
    with pytest.raises(ValueError, match=r"'c2'.*dilation=\(2, 1\).*PEFT"):
        rw.export_peft(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_llama_embedding_with_peft_both_ways(tmp_path):
    """A real transformers model: LoRA on the tiny Llama's ``embed_tokens`` and ``q_proj``."""
    peft = pytest.importorskip("peft")
    base = make_tiny_llama(0)
    batch = lm_batches(n=1)[0]

    def logits(m):
        with torch.no_grad():
            return m(input_ids=batch["input_ids"]).logits

    model = rw.adapt(copy.deepcopy(base), "lora", targets=["embed_tokens", "q_proj"], r=4, alpha=8)
    assert isinstance(model.model.embed_tokens.base_layer, nn.Embedding)
    kinds = {n: type(m.base_layer) for n, m in rw.adapter_layers(model)}
    assert [n for n, k in kinds.items() if k is nn.Embedding] == ["model.embed_tokens"]
    randomize(model)
    rw.export_peft(model, tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    torch.testing.assert_close(logits(pm), logits(model), atol=1e-4, rtol=0)
    back = rw.import_peft(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(logits(back), logits(model), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ named adapters
def test_named_adapters_and_mixed_batches():
    base = make_tiny()
    model = adapt(copy.deepcopy(base), "lora", name="a")
    adapt(model, "dora", targets=["emb", "c2"], name="b")
    adapt(model, "pissa", targets=["c1", "c2"], name="c")
    randomize(model)
    alone = {}
    for name in ("a", "b", "c"):
        rw.set_active(model, name)
        alone[name] = outputs(model)
    rw.set_active(model, ["a", "b", "c"])
    names = ["b", None, "a", "c"]
    with torch.no_grad():
        mixed = model(ids(), adapter_names=names)
    for i, name in enumerate(names):
        want = outputs(base)[i] if name is None else alone[name][i]
        torch.testing.assert_close(mixed[i], want, atol=1e-5, rtol=0, msg=str(name))
    # merge of the stacks == the unmerged forward, unmerge gives the base back
    full = outputs(model)
    rw.merge(model)
    torch.testing.assert_close(outputs(model), full, atol=1e-5, rtol=0)
    rw.unmerge(model)
    rw.set_active(model, [])
    torch.testing.assert_close(outputs(model), outputs(base), atol=1e-5, rtol=0)
    # each alone equals the model that only ever held it
    only_b = adapt(copy.deepcopy(base), "dora", targets=["emb", "c2"], name="b")
    with torch.no_grad():
        for (_, p), (_, q) in zip(rw.adapter_layers(only_b, "b"), rw.adapter_layers(model, "b"), strict=True):
            for k in ("lora_A", "lora_B", "magnitude"):
                getattr(p, k).copy_(getattr(q, k))
    torch.testing.assert_close(outputs(only_b), alone["b"], atol=1e-5, rtol=0)


def test_merge_adapters_into_base_on_every_kind():
    base = make_tiny()
    model = adapt(copy.deepcopy(base), "lora", name="a")
    adapt(model, "lora", name="b")
    randomize(model)
    full = outputs(model)
    rw.merge_adapters(model, {"a": 1.0, "b": 1.0}, "linear", name="ab")
    torch.testing.assert_close(outputs(model), full, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("method", UNSUPPORTED)
@pytest.mark.parametrize("target", TARGETS)
def test_unsupported_method_and_layer_type_is_refused_before_changes(method, target):
    model = make_tiny()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    label = f"nn.{KIND_OF[target].__name__}"
    with pytest.raises(ValueError, match=rf"method '{method}' does not support {label} layers \('{target}'\); "
                                         r"supported: nn.Linear"):
        rw.adapt(model, method, targets=[target], r=RANK)
    assert not rw.adapter_names(model) and type(model.get_submodule(target)) is KIND_OF[target]
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


@pytest.mark.parametrize(("init", "kwargs"), [("lora_ga", {}), ("default", {"quant_type": "nf4"})])
def test_lora_inits_needing_more_than_w_stay_linear_only(init, kwargs):
    method = "qlora" if kwargs else "lora"
    with pytest.raises(ValueError, match=rf"method '{method}' does not support nn.Conv2d"):
        rw.adapt(make_tiny(), method, targets=["c2"], r=RANK, init=init, **kwargs)


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
        (nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular"), "padding_mode='circular'"),
        (nn.Embedding(10, 4, max_norm=1.0), "max_norm=1.0"),
    ],
)
def test_unsupported_layer_options_are_refused(module, match):
    model = nn.Sequential(module)
    with pytest.raises(ValueError, match=match):
        rw.adapt(model, "lora", targets=["0"], r=2)
    assert not rw.adapter_names(model) and type(model[0]) is type(module)


def test_targets_all_linear_stays_linear_and_other_users_refuse():
    llama = rw.adapt(make_tiny_llama(0), "lora", r=2)
    assert all(not isinstance(layer.base_layer, nn.Embedding) for _, layer in rw.adapter_layers(llama))
    model = make_tiny()
    assert [n for n, _ in find_targets(model, TARGETS, layer_types=True)] == TARGETS
    for kwargs in ({}, {"conv1d": False}):  # quantize, sparse, compress, projected optimizers
        with pytest.raises(ValueError, match="of type Embedding"):
            find_targets(model, ["emb"], **kwargs)
    with pytest.raises(ValueError, match="of type Conv2d"):
        rw.sparsify(model, "sltrain", targets=["c2"], rank=2)
