"""``rankwise plan``: table and JSON output, the budget verdict and exit status, one-line errors."""

from __future__ import annotations

import json

import pytest

from rankwise.cli.plan import parse_memory
from rankwise.models.loaders import tiny_llama
from tests.cli.cli_helpers import one_line, run_cli


@pytest.fixture
def config_json(tmp_path):
    path = tmp_path / "config.json"
    tiny_llama(vocab_size=96, hidden=32, layers=2, heads=4, intermediate=64, seed=0).config.to_json_file(str(path))
    return path


def test_table_and_budget(capsys, config_json):
    code, out, err = run_cli(capsys, "plan", "--model", config_json, "--method", "lora", "--rank", "4",
                             "--batch-size", "2", "--max-length", "16", "--memory", "1GiB")
    assert code == 0, err
    for item in ("weights", "gradients", "optimizer state", "projectors", "refresh, exact SVD", "activations",
                 "logits", "peak", "fits"):
        assert item in out


def test_json_and_does_not_fit_exits_1(capsys, config_json):
    code, out, _ = run_cli(capsys, "plan", "--model", config_json, "--optimizer", "galore", "--rank", "4",
                           "--batch-size", "2", "--max-length", "16", "--memory", "1KiB", "--format", "json")
    data = json.loads(out)
    assert code == 1 and data["fits"] is False and data["projectors"] > 0
    assert data["peak"] == max(data["forward_backward"], data["step_phase"])


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model", "nope"], "unknown model"),
    (["--memory", "12XB"], "--memory"),
    (["--method", "nope"], "nope"),
    (["--optimizer", "nope"], "optimizer"),
    (["--method", "lora", "--option", "bogus=1"], "bogus"),
    (["--quantize", "nf4"], "adapter method"),
    (["--world-size", "0"], "--world-size"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_user_errors_are_one_line(capsys, config_json, argv, needle):
    code, _, err = run_cli(capsys, "plan", "--model", config_json, "--max-length", "8", *argv)
    assert one_line(code, err, needle), err


def test_parse_memory():
    assert parse_memory("24GiB") == 24 * 2**30 and parse_memory("80GB") == 80 * 10**9
    assert parse_memory("16") == 16 * 2**30 and parse_memory("512 MiB") == 512 * 2**20


def test_help_explains(capsys):
    code, out, _ = run_cli(capsys, "plan", "--help")
    assert code == 0 and "meta device" in out and "examples:" in out
