"""`rankwise train` with a method that fits its own choices on held-out data (AutoLoRA, Fast Forward): the
validation batches are held out of the training data, never the test split the run reports on."""

from __future__ import annotations

import pytest
import torch

from rankwise.cli.train import _build
from rankwise.cli.train_config import TRAIN_DEFAULTS
from tests.cli.cli_helpers import needs_assets, one_line, run_cli
from tests.cli.test_dynamics_cli import tiny_llama_dir  # noqa: F401  (the module fixture)


def _cfg(**kw):
    return {**TRAIN_DEFAULTS, "train_limit": 40, "test_limit": 8, "max_length": 32, "batch_size": 4, **kw}


def _ids(loader) -> list[list[int]]:
    return [ids for ids, _ in loader.dataset]


def _encoded(tok, texts) -> list[list[int]]:
    return [list(i) for i in tok(list(texts), truncation=True, max_length=32, verbose=False)["input_ids"]]


@needs_assets
@pytest.mark.parametrize("method", ["autolora", "fast_forward"])
def test_classification_holds_the_validation_set_out_of_training(method):
    from rankwise.data import load_classification

    _, tok, train_loader, eval_loader, val_loader = _build(_cfg(method=method, val_size=8), "seq-cls")
    full = _encoded(tok, load_classification("bbc", "train", seed=0, limit=40).texts)
    test = _encoded(tok, load_classification("bbc", "test", seed=0, limit=8).texts)
    assert _ids(val_loader) == full[:8] and _ids(train_loader) == full[8:]
    assert _ids(eval_loader) == test and not {tuple(i) for i in _ids(val_loader)} & {tuple(i) for i in test}


@needs_assets
def test_other_methods_train_on_everything():
    _, _, train_loader, _, val_loader = _build(_cfg(method="lora", val_size=8), "seq-cls")
    assert val_loader is None and len(train_loader.dataset) == 40


@needs_assets
def test_causal_lm_holds_out_the_first_blocks(tiny_llama_dir):  # noqa: F811
    cfg = _cfg(method="autolora", val_size=3, model=str(tiny_llama_dir), data="stdlib-code", train_limit=2)
    _, _, train_loader, _, val_loader = _build(cfg, "causal-lm")
    lora_cfg = {**cfg, "method": "lora"}
    _, _, everything, _, _ = _build(lora_cfg, "causal-lm")
    blocks = torch.stack(list(everything.dataset))
    assert torch.equal(torch.stack(list(val_loader.dataset)), blocks[:3])
    assert torch.equal(torch.stack(list(train_loader.dataset)), blocks[3:])


@needs_assets
def test_a_validation_set_that_leaves_no_training_data_is_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--method", "autolora", "--train-limit", "10", "--val-size", "10",
                           "--output", str(tmp_path / "run"))
    assert one_line(code, err, "--val-size 10", "choose --val-size < 10")


def test_a_resume_compares_val_size_only_where_it_shapes_the_training_data():
    from rankwise.cli.train_config import resume_changes

    old = {**TRAIN_DEFAULTS, "val_size": 64}
    assert resume_changes({**old, "method": "lora"}, {**old, "method": "lora", "val_size": 32}, []) == []
    changed = resume_changes({**old, "method": "autolora"}, {**old, "method": "autolora", "val_size": 32}, [])
    assert len(changed) == 1 and "val_size" in changed[0]
