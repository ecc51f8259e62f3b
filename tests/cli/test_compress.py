"""``rankwise compress`` on a tiny local model: the report, the saved model, data-aware LoRD only when asked."""

from __future__ import annotations

import argparse

import pytest
import torch

from rankwise.compress import load_compressed


def test_cli_on_tiny_model(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rankwise.cli import compress as cli
    from rankwise.models import ensure_smollm2_cache

    # the SmolLM2 tokenizer, converted from the packaged GGUF once per machine (never skipped)
    tok = AutoTokenizer.from_pretrained(str(ensure_smollm2_cache(verbose=False)), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["compress", "--model", str(tmp_path / "tiny"), "--method", "welore", "--ratio", "0.8",
                              "--eval-blocks", "2", "--block-size", "32", "--recover-steps", "1",
                              "--output", str(tmp_path / "out"), "--no-progress"])
    assert cli.run(args) == 0
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["after"]["perplexity"]) == {"bbc", "stdlib-code"}
    assert report["after"]["kept_fraction"] <= 0.8
    targeted = 2 * (4 * 32 * 32 - 2 * 32 * 16 + 3 * 32 * 64)  # q, o (32x32), k, v (16x32), gate, up, down per block
    assert report["before"]["targeted_weights"] == targeted
    assert abs(report["after"]["targeted_weights"] / targeted - report["after"]["kept_fraction"]) < 1e-4
    assert (tmp_path / "out" / "report.md").read_text().startswith("# rankwise compress")
    loaded = load_compressed(tmp_path / "out" / "model")
    assert loaded.rankwise_compress.method == "welore"
    # data-aware LoRD only when asked for, and only for lord
    base = ["compress", "--model", str(tmp_path / "tiny"), "--ratio", "0.8", "--eval-blocks", "1", "--block-size", "32",
            "--no-progress", "--no-save"]
    args = parser.parse_args([*base, "--method", "lord", "--calibration-batches", "1", "--recover-steps", "1",
                              "--output", str(tmp_path / "lord")])
    assert cli.run(args) == 0
    lord_report = json.loads((tmp_path / "lord" / "report.json").read_text())
    assert lord_report["calibration_batches"] == 1 and lord_report["details"]["decomposition"] == "output-covariance"
    with pytest.raises(ValueError, match="--calibration-batches=1 needs --method lord"):
        cli.run(parser.parse_args([*base, "--method", "svd", "--calibration-batches", "1"]))
    # calibrated methods take the batches the same way; slicegpt's sliced model loads back
    args = parser.parse_args([*base[:-1], "--method", "slicegpt", "--calibration-batches", "1",
                              "--output", str(tmp_path / "slice")])
    assert cli.run(args) == 0
    assert load_compressed(tmp_path / "slice" / "model").model.embed_tokens.weight.shape[1] == 24
    with pytest.raises(ValueError, match="method 'dsnot' needs at least 1"):
        cli.run(parser.parse_args([*base, "--method", "dsnot", "--calibration-batches", "0"]))
