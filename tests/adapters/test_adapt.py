"""rw.adapt and the whole-model operations: target selection, what is frozen, config errors, adapting twice,
summary, unload, atomic save."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.targets import find_targets

from ..conftest import cls_batches, make_tiny_bert, make_tiny_llama


def test_all_linear_excludes_output_heads():
    bert = make_tiny_bert()
    names = [n for n, _ in find_targets(bert, "all-linear")]
    assert "classifier" not in names and len(names) == 13  # 6 per layer x 2 + pooler
    llama = make_tiny_llama()
    names = [n for n, _ in find_targets(llama, "all-linear")]
    assert "lm_head" not in names and len(names) == 14  # q,k,v,o,gate,up,down x 2


def test_suffix_and_regex_targets():
    bert = make_tiny_bert()
    by_suffix = [n for n, _ in find_targets(bert, ["query", "value"])]
    by_regex = [n for n, _ in find_targets(bert, r".*\.(query|value)")]
    assert by_suffix == by_regex and len(by_suffix) == 4


def test_adapt_freezes_all_but_adapters_and_head(tiny_bert):
    rw.adapt(tiny_bert, "lora", r=4, targets=["query", "value"])
    trainable = {n for n, p in tiny_bert.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or n.startswith("classifier.") for n in trainable)
    assert any(n.startswith("classifier.") for n in trainable)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "nope"}, "unknown method 'nope'; known methods: ["),
        ({"method": "lora", "r": 0}, "r=0 must be a positive integer"),
        ({"method": "lora", "r": 33}, "r=33 is larger than min(in_features, out_features)=32"),
        ({"method": "lora", "targets": ["nothing_here"]}, "matched no module"),
        ({"method": "lora", "targets": ["embeddings"]},
         "only nn.Linear / transformers Conv1D / nn.Embedding / nn.Conv1d / nn.Conv2d modules can be adapted"),
        ({"method": "lora", "rank": 4}, "unknown option(s) ['rank'] for method 'lora'; allowed options: ["),
        ({"method": "lora", "init": "magic"}, "init='magic' is not allowed; choose one of ["),
        ({"method": "lora", "dropout": 1.5}, "dropout=1.5 must be in [0, 1)"),
        ({"method": "lora", "alpha": -1}, "alpha=-1 must be a positive number"),
    ],
)
def test_bad_config_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        rw.adapt(make_tiny_bert(), **kwargs)
    assert message in str(err.value)


def test_adapting_twice_is_refused(tiny_bert):
    rw.adapt(tiny_bert, "lora", r=2)
    with pytest.raises(ValueError, match="already has an adapter named .default."):
        rw.adapt(tiny_bert, "lora", r=2)


def test_summary_counts(tiny_llama):
    rw.adapt(tiny_llama, "lora", r=4)
    s = rw.summary(tiny_llama)
    expected = sum(layer.trainable_count() for _, layer in rw.adapter_layers(tiny_llama))
    assert s.per_method["lora"] == expected == s.trainable
    assert s.total == sum(p.numel() for p in tiny_llama.parameters())
    assert "trainable" in str(s)


def test_unload_restores_plain_model(tiny_llama):
    ref = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    rw.adapt(tiny_llama, "lora", r=4)
    base = rw.unload(tiny_llama)
    assert not rw.adapter_layers(base)
    assert all(torch.equal(v, ref[k]) for k, v in base.state_dict().items())


def test_save_is_atomic(tmp_path, monkeypatch):
    model = rw.adapt(make_tiny_bert(), "lora", r=2)
    rw.save_adapter(model, tmp_path / "a")
    before = sorted(p.name for p in (tmp_path / "a").iterdir())

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("rankwise.io.save_tensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        rw.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary left behind


def test_save_without_adapters_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="model has no rankwise adapters"):
        rw.save_adapter(make_tiny_bert(), tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_adapters_disabled_is_the_untouched_base_model_exactly(method):
    """Inside ``adapters_disabled`` the model is the base model bit for bit, also after training has
    changed the adapters and the fully trained classification head; on exit the trained values are
    back in the same parameter objects (an optimizer holding them keeps working)."""
    base = make_tiny_bert(0)
    model = rw.adapt(make_tiny_bert(0), method, r=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for batch in cls_batches(n=3, seed=5):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    head = model.classifier.weight
    trained_head = head.detach().clone()
    assert not torch.equal(trained_head, base.classifier.weight)
    batch = cls_batches(seed=6)[0]
    with torch.no_grad():
        expected = base(**batch).logits
        trained = model(**batch).logits
        assert (trained - expected).abs().max() > 1e-2
        with rw.adapters_disabled(model):
            assert torch.equal(model(**batch).logits, expected)
        assert torch.equal(model(**batch).logits, trained)
        rw.merge(model)
        with rw.adapters_disabled(model):
            assert torch.allclose(model(**batch).logits, expected, atol=1e-5)
    assert model.classifier.weight is head and torch.equal(head, trained_head)
    assert [p for p in model.parameters() if p.requires_grad] == params
