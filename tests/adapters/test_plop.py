"""PLoP: the placement is decided before training from the pretrained weights and the task's inputs (NFN per
module type), and the adapted module types are the lowest-NFN ones."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.adapters.plop import choose_types, module_type, nfn_scores, type_scores
from rankwise.rng import layer_generator

from ..conftest import lm_batches, make_tiny_llama

K = 2


def _inputs(model, names, batch):
    """Every named layer's input rows on ``batch`` (all tokens are real: the attention mask is all ones)."""
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0].detach().reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    return seen


def _reference(model, names, batch, seed=0):
    """NFN per module type written out: Σ_l mean‖Ŵẑ‖ / Σ_l mean‖Ŵû‖."""
    rows = _inputs(model, names, batch)
    real, rand = {}, {}
    for n in names:
        w = model.get_submodule(n).weight.detach()
        w = w / w.pow(2).mean().sqrt()
        z = rows[n] / rows[n].norm(dim=1, keepdim=True)
        u = torch.randn(z.shape, generator=layer_generator(seed, n))
        u = u / u.norm(dim=1, keepdim=True)
        t = module_type(n)
        real[t] = real.get(t, 0.0) + float((z @ w.T).norm(dim=1).mean())
        rand[t] = rand.get(t, 0.0) + float((u @ w.T).norm(dim=1).mean())
    return {t: real[t] / rand[t] for t in real}


def test_adapted_types_are_the_lowest_nfn_types_of_the_pretrained_model():
    base = make_tiny_llama(0)
    data = lm_batches(n=1)
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    ref = _reference(base, names, data[0])
    assert len(ref) == 7  # q, k, v, o, gate, up, down
    assert type_scores(nfn_scores(base, names, data)) == pytest.approx(ref, rel=1e-4)
    model = rw.adapt(make_tiny_llama(0), "plop", r=2, init_data=data, plop_types=K)
    adapted = {module_type(n) for n, _ in rw.adapter_layers(model)}
    lowest = sorted(ref, key=ref.get)[:K]
    assert adapted == set(lowest)
    assert max(ref[t] for t in adapted) < min(ref[t] for t in ref if t not in adapted)
    assert {n for n, _ in rw.adapter_layers(model)} == {n for n in names if module_type(n) in adapted}


def test_the_placement_follows_the_pretrained_weights_and_the_data():
    """Scaling one type's weights does not move its NFN (a ratio); aligning them with the task's inputs raises it
    above every other type's, so that type loses its adapter."""
    data = lm_batches(n=1)
    model = rw.adapt(make_tiny_llama(0), "plop", r=2, init_data=data, plop_types=K)
    first = sorted({module_type(n) for n, _ in rw.adapter_layers(model)})
    base = make_tiny_llama(0)
    target = first[0]
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and module_type(n) == target]
    rows = _inputs(base, names, data[0])
    with torch.no_grad():
        for n in names:  # every output row along the inputs' mean direction: maximal alignment
            w = base.get_submodule(n).weight
            mean = rows[n].mean(0)
            w.copy_(mean.expand_as(w) / mean.norm() * w.norm() / w.shape[0] ** 0.5)
    moved = rw.adapt(base, "plop", r=2, init_data=data, plop_types=K)
    assert target not in {module_type(n) for n, _ in rw.adapter_layers(moved)}


def test_choose_types_and_bad_input():
    assert choose_types({"a": 0.3, "b": 0.1, "c": 0.2}, 2) == ["b", "c"]
    assert module_type("model.layers.12.mlp.up_proj") == "mlp.up_proj"
    assert module_type("bert.pooler.dense") == "bert.pooler.dense"
    with pytest.raises(ValueError, match="init_data"):
        rw.adapt(make_tiny_llama(0), "plop", r=2)
    with pytest.raises(ValueError, match="plop_types"):
        rw.adapt(make_tiny_llama(0), "plop", r=2, init_data=lm_batches(n=1), plop_types=0)
    with pytest.raises(ValueError, match="init"):
        rw.adapt(make_tiny_llama(0), "plop", r=2, init_data=lm_batches(n=1), init="lora_ga")


@pytest.mark.slow
def test_on_minilm_bbc_the_normalization_decides_the_placement():
    """MiniLM on BBC News: NFN (feature norm over the random-input norm) and the raw feature norm mean‖Ŵẑ‖ order
    the module types differently, so the random baseline of the score changes the placement on a real model."""
    from rankwise.data import classification_loader, load_classification
    from rankwise.models import load_model

    model, tok = load_model("minilm-l6", task="seq-cls", num_labels=5)
    loader = classification_loader(load_classification("bbc", "train", seed=0, limit=32), tok, 16, 128,
                                   shuffle=False)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "classifier"]
    layer = nfn_scores(model, names, loader, batches=2)
    nfn = type_scores(layer)
    raw = type_scores({n: (real, 1.0) for n, (real, _) in layer.items()})
    assert len(nfn) == 7
    # all types but one: NFN leaves out the FFN output (output.dense), the raw norm the FFN input
    assert choose_types(nfn, 6) != choose_types(raw, 6), (nfn, raw)
    assert choose_types(nfn, K) != sorted(nfn, key=nfn.get)[-K:]  # the direction matters: lowest, not highest
    adapted = rw.adapt(model, "plop", r=4, init_data=loader, init_batches=2, plop_types=K)
    assert {module_type(n) for n, _ in rw.adapter_layers(adapted)} == set(choose_types(nfn, K))


def test_trains_in_the_transformers_trainer(tmp_path):
    from rankwise.hf_trainer import RankwiseTrainer

    from ..conftest import cls_batches
    from ..test_hf_trainer import _args, _base, _dataset

    model = rw.adapt(_base(tmp_path), "plop", r=2, init_data=cls_batches(n=1), plop_types=1)
    (layer_type,) = {module_type(n) for n, _ in rw.adapter_layers(model)}
    before = {n: layer.lora_B.detach().clone() for n, layer in rw.adapter_layers(model)}
    RankwiseTrainer(model=model, args=_args(tmp_path / "run", steps=2, save_steps=100),
                    train_dataset=_dataset()).train()
    assert all(not torch.equal(layer.lora_B, before[n]) for n, layer in rw.adapter_layers(model))
