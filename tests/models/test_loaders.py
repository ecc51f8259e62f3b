"""Tests for rankwise.models: the model registry, tiny models, Llama configs, and the offline MiniLM / SmolLM2
loaders (the SmolLM2 conversion cache)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from rankwise.data import classification_loader, load_classification
from rankwise.models import ALIASES, MODELS, count_parameters, llama_config, load_model, loaders, tiny_bert, tiny_llama


def test_model_registry_and_errors():
    assert {"smollm2-135m", "minilm-l6"} <= set(MODELS)
    assert ALIASES == {"smollm2": "smollm2-135m", "minilm": "minilm-l6"}
    with pytest.raises(ValueError, match=r"unknown model 'gpt2'.*'smollm2-135m'.*local"):
        load_model("gpt2")
    with pytest.raises(ValueError, match=r"`task`.*'causal-lm'.*'seq-cls'.*'base'"):
        load_model("minilm", task="mlm")
    with pytest.raises(ValueError, match="`task`"):
        load_model("minilm", task="causal-lm")  # BERT has no causal-LM head here
    with pytest.raises(ValueError, match="`size`"):
        llama_config("1b")


def test_tiny_models_deterministic():
    torch.manual_seed(0)
    a = tiny_llama()
    torch.manual_seed(0)
    b = tiny_llama()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = tiny_llama(seed=0)
    d = tiny_llama(seed=0)
    assert all(torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters(), strict=True))
    x = torch.randint(0, 128, (2, 10))
    assert a(input_ids=x).logits.shape == (2, 10, 128)
    cls = tiny_llama(task="seq-cls", num_labels=3, seed=1)
    assert cls(input_ids=x).logits.shape == (2, 3)
    bert = tiny_bert(num_labels=4, seed=1)
    assert bert(input_ids=x, attention_mask=torch.ones_like(x)).logits.shape == (2, 4)
    assert tiny_bert(task="base", seed=1)(input_ids=x).last_hidden_state.shape == (2, 10, 32)
    assert a.config.hidden_size == 32 and a.config.num_hidden_layers == 2


def test_llama_config_sizes():
    from transformers import AutoModelForCausalLM

    for size, lo, hi in (("20m", 15e6, 25e6), ("60m", 50e6, 70e6)):
        cfg = llama_config(size)
        assert cfg.vocab_size == 49152 and 256 <= cfg.hidden_size <= 512
        with torch.device("meta"):
            n = count_parameters(AutoModelForCausalLM.from_config(cfg))
        assert lo < n < hi
    assert llama_config("20m", vocab_size=1000, num_hidden_layers=2).num_hidden_layers == 2


def test_minilm_loads_offline():
    t0 = time.perf_counter()
    model, tok = load_model("minilm", task="seq-cls", num_labels=5)
    assert time.perf_counter() - t0 < 30
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 5 and tok.pad_token_id == model.config.pad_token_id
    ds = load_classification("bbc", "test", limit=4)
    batch = next(iter(classification_loader(ds, tok, batch_size=4, max_length=32, shuffle=False)))
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (4, 5) and torch.isfinite(out.loss)
    base, _ = load_model("minilm-l6", task="base")
    assert base.config.hidden_size == 384 and count_parameters(base) == 22_713_216


def test_smollm2_cache_is_atomic(tmp_path, monkeypatch):
    """A conversion that dies half-way leaves no cache; a good one is reused (tiny stand-in)."""
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))

    class BrokenTokenizer:
        def save_pretrained(self, path):
            Path(path, "tokenizer.json").write_text("{")
            raise KeyboardInterrupt

    monkeypatch.setattr(loaders, "_convert_gguf", lambda g: (tiny_llama(seed=0), BrokenTokenizer()))
    with pytest.raises(KeyboardInterrupt):
        loaders.ensure_smollm2_cache(verbose=False)
    assert list(tmp_path.iterdir()) == []

    class OkTokenizer:
        def save_pretrained(self, path):
            Path(path, "tokenizer.json").write_text("{}")

    calls = []
    monkeypatch.setattr(loaders, "_convert_gguf",
                        lambda g: calls.append(g) or (tiny_llama(seed=0), OkTokenizer()))
    path = loaders.ensure_smollm2_cache(verbose=False)
    assert path == tmp_path / "smollm2-135m-instruct" and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert (path / "model.safetensors").is_file()
    assert json.loads((path / "rankwise_source.json").read_text())["size"] > 0
    assert loaders.ensure_smollm2_cache(verbose=False) == path and len(calls) == 1


@pytest.mark.slow
def test_smollm2_load_and_cache_roundtrip(tmp_path, monkeypatch):
    """First load converts the GGUF (~15-30 s); the second comes from the cache, same logits."""
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    first, tok = load_model("smollm2-135m")
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    second, tok2 = load_model("smollm2")
    t_second = time.perf_counter() - t0
    print(f"smollm2 first load {t_first:.1f}s, cached load {t_second:.2f}s")
    assert t_second < 10
    assert type(first).__name__ == "LlamaForCausalLM" and count_parameters(first) == 134_515_008
    assert first.dtype == torch.float32 and tok.pad_token is not None
    assert getattr(second.config, "quantization_config", None) is None
    x = tok(["The capital of France is", "def add(a, b):\n    return"], padding=True,
            return_tensors="pt")
    assert torch.equal(x["input_ids"], tok2(["The capital of France is", "def add(a, b):\n    return"],
                                            padding=True, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        la, lb = first(**x).logits, second(**x).logits
    assert la.shape == (2, x["input_ids"].shape[1], 49152)
    assert torch.equal(la, lb)
    cls, _ = load_model("smollm2", task="seq-cls", num_labels=3)
    assert cls.config.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        assert cls(**x).logits.shape == (2, 3)
