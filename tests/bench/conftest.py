"""A tiny BERT saved with MiniLM's tokenizer, and a bench profile on it that runs in seconds."""

from __future__ import annotations

import pytest

from rankwise.bench import BenchTask, Profile


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from rankwise.models import load_model, tiny_bert

    _, tok = load_model("minilm-l6", task="base")
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(vocab_size=tok.vocab_size, num_labels=5, seed=0).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture
def tiny_profile(tiny_bert_dir):
    return Profile("tiny", "tiny BERT on BBC", (BenchTask("bbc", str(tiny_bert_dir), "bbc", "seq-cls"),),
                   steps=3, batch_size=4, max_length=16, seeds=2, val_size=8, test_size=8,
                   lr_grids={"adapter": (1e-3, 1e-2), "full": (1e-4, 1e-3), "head": (1e-2,)})
