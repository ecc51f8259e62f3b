"""``rankwise train --method pmss / nlora / dota`` on the packaged MiniLM: the run trains the method's own
tensors, saves an adapter that ``rw.load_adapter`` puts back on the base."""

from __future__ import annotations

import json

import pytest

import rankwise as rw

from ..cli.cli_helpers import needs_assets, run_cli

TINY = ["--max-steps", "2", "--batch-size", "4", "--max-length", "24", "--train-limit", "16", "--test-limit", "8",
        "--no-progress"]


@needs_assets
@pytest.mark.parametrize(("method", "options", "param"), [
    ("pmss", [], "core"),
    ("nlora", ["--option", "variant=inttune"], "nlora_M"),
    ("dota", ["--option", "cores=3"], "dota_core_0"),
])
def test_cli_train_saves_an_adapter_that_loads(method, options, param, tmp_path, capsys):
    from rankwise.models import load_model

    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--method", method, "--r", "4", "--targets", "query,value", *options,
                           "--output", str(out), *TINY)
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())
    assert record["metrics"]["accuracy"] >= 0
    base, _ = load_model("minilm-l6", task="seq-cls", num_labels=5)
    model = rw.load_adapter(base, out / "adapter")
    layers = rw.adapter_layers(model)
    assert len(layers) == 12 and all(layer.method == method for _, layer in layers)
    assert {n for n, p in layers[0][1].named_parameters() if p.requires_grad} >= {param}
