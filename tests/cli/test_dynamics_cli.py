"""`rankwise train --method <training-dynamics method>`: the loop attaches each method's callbacks / optimizer."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.cli.cli_helpers import needs_assets, run_cli


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from rankwise.models import load_model, tiny_llama

    _, tok = load_model("minilm-l6", task="base")
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=tok.vocab_size, seed=0).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def _train(capsys, model_dir, out, method, *options):
    code, _, err = run_cli(capsys, "train", "--model", str(model_dir), "--data", "stdlib-code", "--method", method,
                           "--r", "2", "--output", str(out), "--max-steps", "2", "--max-length", "32",
                           "--train-limit", "2", "--test-limit", "1", "--no-progress", *options)
    assert code == 0, err
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
@needs_assets
def test_cli_trains_the_dynamics_methods(tmp_path, capsys, tiny_llama_dir):
    lora = _train(capsys, tiny_llama_dir, tmp_path / "lora", "lora")
    # LoRA-Pro's AdamW keeps full-size moments of the equivalent gradient: far more state than LoRA's
    pro = _train(capsys, tiny_llama_dir, tmp_path / "pro", "lora_pro")
    assert pro["result"]["optimizer_state_bytes"] > 4 * lora["result"]["optimizer_state_bytes"]
    # COLA restarting after every step: the saved (last) link has B = 0
    _train(capsys, tiny_llama_dir, tmp_path / "cola", "cola", "--option", "chain_every=1")
    tensors = load_file(tmp_path / "cola" / "adapter" / "rankwise_adapter.safetensors")
    b = [t for k, t in tensors.items() if k.endswith("lora_B")]
    assert b and all(bool((t == 0).all()) for t in b)
    for method, option in (("allora", "eta=2"), ("lora_dropout", "param_dropout=0.2"),
                           ("lora_ggpo", "ggpo_sigma=0.1"), ("fast_forward", "ff_every=1"),
                           ("bilora", "upper_every=2"), ("loft", "damping=1e-6"),
                           ("ba_lora", "lambda1=0.1"), ("riemannlora", "momentum=0.5")):
        record = _train(capsys, tiny_llama_dir, tmp_path / method, method, "--option", option)
        assert record["result"]["steps"] == 2
