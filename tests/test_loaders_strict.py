"""Strict loaders: every tensor that load_adapter, import_peft, checkpoint resume and load_compressed copy
into a model must have its tensor's exact shape (no broadcasting), a floating dtype and finite values; a
compressed-model file may only name known architectures and set known attributes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import rankwise as rw
from rankwise.checkpoint import find_checkpoint
from rankwise.compress.api import load_compressed, save_compressed
from rankwise.train import TrainConfig, train

from .conftest import cls_batches, make_tiny_bert, make_tiny_llama

QUERY = "bert.encoder.layer.0.attention.self.query"


def tamper(file: Path, key_part: str, make) -> str:
    """Replace the first tensor of ``file`` whose key contains ``key_part`` by ``make(tensor)``; its key."""
    tensors = load_file(str(file))
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = make(tensors[key])
    save_file(tensors, str(file))
    return key


BAD = {  # what each damaged tensor becomes, and what the error says
    "rows": (lambda t: t[:1].clone(), "expected shape"),  # (1, in) where (r, in): broadcasts into copy_
    "scalar": (lambda t: torch.tensor(0.5), "found ()"),
    "int32": (lambda t: t.to(torch.int32), "found torch.int32"),
    "nan": (lambda t: torch.full_like(t, float("nan")), "NaN/inf"),
}


@pytest.mark.parametrize("damage", sorted(BAD))
def test_load_adapter_checks_every_tensor(tmp_path, damage):
    model = make_tiny_bert()
    rw.adapt(model, "lora", r=4, targets=["query", "value"])
    rw.save_adapter(model, tmp_path / "a")
    make, needle = BAD[damage]
    key = tamper(tmp_path / "a" / "rankwise_adapter.safetensors", f"{QUERY}.lora_A", make)
    with pytest.raises(ValueError, match=needle) as e:
        rw.load_adapter(make_tiny_bert(), tmp_path / "a")
    assert key in str(e.value)


@pytest.mark.parametrize("damage", sorted(BAD))
def test_checkpoint_resume_checks_every_tensor(tmp_path, damage):
    cfg = TrainConfig(lr=1e-2, max_steps=2, checkpoint_every=2, output_dir=str(tmp_path), progress=False)
    model = make_tiny_bert()
    rw.adapt(model, "lora", r=4, targets=["query", "value"])
    train(model, cls_batches(), config=cfg)
    make, needle = BAD[damage]
    key = tamper(find_checkpoint(tmp_path) / "trained_tensors.safetensors", f"{QUERY}.lora_A", make)
    fresh = make_tiny_bert()
    rw.adapt(fresh, "lora", r=4, targets=["query", "value"])
    with pytest.raises(ValueError, match=needle) as e:
        train(fresh, cls_batches(), config=cfg, resume_from=tmp_path)
    assert key in str(e.value)


@pytest.mark.parametrize("damage", ["scalar", "int32", "nan"])
def test_import_peft_checks_every_tensor(tmp_path, damage):
    model = make_tiny_bert()
    rw.adapt(model, "lora", r=4, targets=["query", "value"])
    rw.export_peft(model, tmp_path / "p")
    make, needle = BAD[damage]
    tamper(tmp_path / "p" / "adapter_model.safetensors", f"{QUERY}.lora_B", make)
    with pytest.raises(ValueError, match=needle.replace("found ()", "lora_B")) as e:
        rw.import_peft(make_tiny_bert(), tmp_path / "p")
    assert QUERY in str(e.value)


def test_import_peft_checks_the_saved_head(tmp_path):
    model = make_tiny_bert()
    rw.adapt(model, "lora", r=4, targets=["query", "value"])  # the classifier is trained: modules_to_save
    rw.export_peft(model, tmp_path / "p")
    tamper(tmp_path / "p" / "adapter_model.safetensors", "classifier.weight", lambda t: t.to(torch.int32))
    with pytest.raises(ValueError, match="classifier.weight.*torch.int32"):
        rw.import_peft(make_tiny_bert(), tmp_path / "p")


# ----------------------------------------------------------------------------- compressed models
@pytest.fixture
def compressed(tmp_path) -> Path:
    model = rw.compress(make_tiny_llama(), "svd", ratio=0.5)
    return save_compressed(model, tmp_path / "m")


def edit_info(path: Path, change) -> None:
    file = path / "rankwise_compressed.json"
    info = json.loads(file.read_text())
    change(info)
    file.write_text(json.dumps(info))


def test_load_compressed_round_trip_still_works(compressed):
    assert load_compressed(compressed).rankwise_compress.method == "svd"


@pytest.mark.parametrize("architecture", ["pipeline", "BertForSequenceClassification", "AutoModel", "os.system"])
def test_load_compressed_builds_only_known_architectures(compressed, architecture):
    edit_info(compressed, lambda info: info.update(architecture=architecture))
    with pytest.raises(ValueError, match="is not a transformers model class"):
        load_compressed(compressed)


@pytest.mark.parametrize("attrs,needle", [
    ({"scaling": 5.0}, "'scaling' of 'model.layers.0.self_attn' may not be set"),
    ({"num_key_value_groups": -1}, "must be a positive integer"),
    ({"num_key_value_groups": "2"}, "must be a positive integer"),
])
def test_load_compressed_sets_only_known_attributes(compressed, attrs, needle):
    """A false ``scaling`` changed the outputs silently."""
    edit_info(compressed, lambda info: info["state"].update(
        resized={"linears": {}, "attributes": {"model.layers.0.self_attn": attrs}}))
    with pytest.raises(ValueError, match=needle):
        load_compressed(compressed)


def test_load_compressed_checks_layers_and_tensors(compressed):
    edit_info(compressed, lambda info: info["factorized"].update({"model.nope": {"rank": 2, "in_features": 4,
                                                                                 "out_features": 4, "bias": False}}))
    with pytest.raises(ValueError, match="'model.nope' is not an nn.Linear"):
        load_compressed(compressed)


def test_load_compressed_refuses_nan_weights(compressed):
    tamper(compressed / "model.safetensors", "embed_tokens", lambda t: torch.full_like(t, float("nan")))
    with pytest.raises(ValueError, match="embed_tokens.*NaN"):
        load_compressed(compressed)
