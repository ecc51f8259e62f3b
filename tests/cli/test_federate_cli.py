"""``rankwise federate``: a run on a tiny local BERT (report, saved adapter) and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from .cli_helpers import needs_assets, one_line, run_cli


@needs_assets
def test_federate_on_a_tiny_model(tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification

    from rankwise.models import load_model

    _, tok = load_model("minilm-l6", task="base")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=5)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    code, out, err = run_cli(capsys, "federate", "--method", "fedsvd", "--model", tmp_path / "tiny", "--clients", 2,
                             "--rounds", 2, "--local-steps", 1, "--rank", 2, "--max-length", 16, "--train-limit", 40,
                             "--test-limit", 8,
                             "--output", tmp_path / "out", "--no-progress", "--device", "cpu")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[:2] == [line for line in lines if line.startswith("round ")]
    summary = json.loads(lines[-1])
    assert summary["method"] == "fedsvd" and summary["clients"] == 2 and "accuracy" in summary["metrics"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["history"]) == 2 and len(report["shard_sizes"]) == 2
    assert (tmp_path / "out" / "rankwise_adapter.safetensors").is_file()


@pytest.mark.parametrize("argv,needles", [
    (["--method", "nope"], ["invalid choice: 'nope'"]),
    (["--method", "ffa_lora", "--rounds", "0"], ["rounds=0"]),
    (["--method", "ffa_lora", "--model", "no-such-model"], ["no-such-model"]),
])
def test_mistakes_are_one_line_exit_2(capsys, argv, needles):
    code, _, err = run_cli(capsys, "federate", *argv)
    assert one_line(code, err, *needles), err
