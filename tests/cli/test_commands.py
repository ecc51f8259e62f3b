"""Tests for the rankwise CLI (methods, train, demo) and python -m rankwise."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import rankwise as rw
from rankwise import catalogue
from rankwise.cli import build_parser, main
from rankwise.cli.common import parse_targets
from rankwise.cli.train_config import TRAIN_DEFAULTS, resolve_train_config
from rankwise.demo import COLUMNS, PLOT_PNG, REPORT_MD, RESULTS_JSON, available_entries, select_entries
from tests.cli.cli_helpers import needs_assets, one_line, run_cli


# ----------------------------------------------------------------------------- methods
def test_methods_lists_every_catalogued_method(capsys):
    code, out, _ = run_cli(capsys, "methods", "--format", "json")
    assert code == 0
    rows = json.loads(out)
    done = catalogue.records(status="done")
    assert rows == [r.row() for r in done]
    assert {r["api"] for r in rows} == set(catalogue.APIS)  # every entry point has a done method
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0 and all(r.name in out for r in done)
    assert out.splitlines()[0].split()[:5] == ["name", "family", "status", "api", "exports"]
    code, out, _ = run_cli(capsys, "methods", "--status", "all", "--format", "json")
    assert len(json.loads(out)) == len(catalogue.records()) > len(done)


def test_methods_markdown_and_family_filter(capsys):
    code, out, _ = run_cli(capsys, "methods", "--format", "markdown", "--family", "optimizer")
    assert code == 0 and out.startswith("| name | family |")
    listed = {line.split("|")[1].strip() for line in out.splitlines()[2:] if line.startswith("|")}
    assert listed == {r.name for r in catalogue.records("optimizer", "done")} and "galore" in listed
    code, _, err = run_cli(capsys, "methods", "--family", "nope")
    assert code == 2 and "'rank-allocation'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "methods", "--status", "maybe")
    assert code == 2 and "'planned'" in err


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv,needle", [
    (["train", "--method", "no-such-method"], "unknown method 'no-such-method'"),
    (["train", "--model", "gpt-17"], "unknown model 'gpt-17'"),
    (["train", "--data", "imdb"], "unknown dataset 'imdb'"),
    (["train", "--method", "none", "--r", "4"], "apply only to adapter methods"),
    (["train", "--task", "vision"], "--task 'vision'"),
    (["train", "--method", "vera", "--option", "bogus=1"], "unknown option(s) ['bogus']"),
    (["train", "--r", "0"], "r=0"),
    (["train", "/nonexistent/run.yaml"], "not found"),
    (["train", "--option", "novalue"], "KEY=VALUE"),
    (["demo", "--methods", "lora,zzz"], "unknown demo method 'zzz'"),
    (["train", "--lr", "inf"], "lr=inf must be a finite number > 0"),
    (["train", "--weight-decay", "nan"], "weight_decay=nan must be a finite number >= 0"),
    (["train", "--max-grad-norm", "0"], "max_grad_norm=0.0 must be a finite number > 0 or None"),
    (["train", "--train-limit", "0"], "train_limit=0 must be an integer >= 1"),
    (["train", "--test-limit", "0"], "test_limit=0 must be an integer >= 1"),
    (["train", "--device", "cuda:99"], "device='cuda:99'"),
    (["train", "--max-length", "100000", "--train-limit", "8", "--test-limit", "8"], "--max-length 100000 is more"),
    (["train", "--targets", "re:([", "--train-limit", "8", "--test-limit", "8"], "is not a valid regular expression"),
    (["train", "--dtype", "float8"], "--dtype 'float8'; choose one of ['fp32', 'bf16', 'fp16']"),
    (["train", "--dtype", "fp16"], "--dtype fp16 would train the classification head in fp16"),
    (["train", "--dtype", "float16", "--method", "none", "--data", "stdlib-code"], "would train every weight"),
    (["plan", "--model", "minilm", "--dtype", "fp8"], "--dtype 'fp8'; choose one of ['fp32', 'bf16', 'fp16']"),
    (["train", "--precision", "fp8"], "precision='fp8'"),
])
def test_user_errors_are_one_line_exit_2(capsys, argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --output (runs/<method>) must not depend on what the cwd holds
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert needle in err and err.startswith("rankwise: error:") and len(err.strip().splitlines()) == 1


def test_bad_flag_type_is_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--r", "eight"])
    assert e.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


@pytest.mark.parametrize("argv, unknown, command", [
    (["bench", "gate", "--profile", "cpu-lm"], "--profile", "rankwise bench gate"),
    (["bench", "run", "--nope"], "--nope", "rankwise bench run"),
    (["train", "--bogus"], "--bogus", "rankwise train"),
    (["--nope", "methods"], "--nope", "rankwise"),
])
def test_an_unknown_flag_points_to_the_help_of_the_command_it_was_given_to(capsys, argv, unknown, command):
    code, _, err = run_cli(capsys, *argv)
    assert one_line(code, err, f"unrecognized arguments: {unknown} ", f"(see '{command} --help')")


def test_python_dash_m_rankwise():
    bad = subprocess.run([sys.executable, "-m", "rankwise", "train", "--method", "nope"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "unknown method 'nope'" in bad.stderr


def test_help_has_examples(capsys):
    for cmd in ("methods", "train", "demo"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "examples:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- train config
def test_flags_override_yaml_override_defaults(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("method: dora\nr: 4\nalpha: 8\nlr: 2e-3\nmax-steps: 50\nbatch_size: 4\n"
                 "targets: [query, value]\noptions: {init: pissa}\n")
    args = build_parser().parse_args(["train", str(y), "--r", "16", "--max-steps", "7",
                                      "--option", "init_iters=2"])
    cfg = resolve_train_config(args)
    assert cfg["method"] == "dora" and cfg["lr"] == 2e-3 and cfg["batch_size"] == 4  # from YAML
    assert cfg["max_steps"] == 7  # flag beats YAML
    assert cfg["options"] == {"r": 16, "alpha": 8, "init": "pissa", "init_iters": 2}
    assert cfg["targets"] == ["query", "value"]
    assert cfg["model"] == TRAIN_DEFAULTS["model"] and cfg["data"] == "bbc"  # defaults
    assert cfg["output"].endswith("dora")


def test_default_lr_depends_on_method():
    def parse(*a: str) -> dict:
        return resolve_train_config(build_parser().parse_args(["train", *a]))

    assert parse()["lr"] == 1e-3 and parse()["method"] == "lora"
    assert parse("--method", "none")["lr"] == 5e-5
    assert parse("--method", "head")["lr"] == 5e-3


def test_yaml_unknown_key_is_an_error(tmp_path, capsys):
    y = tmp_path / "run.yaml"
    y.write_text("method: lora\nlearning_rate: 0.1\n")
    code, _, err = run_cli(capsys, "train", str(y))
    assert code == 2 and "unknown key 'learning_rate'" in err


def test_parse_targets():
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets("query,value") == ["query", "value"]
    assert parse_targets("dense") == ["dense"]
    assert parse_targets(r"re:.*\.attention\..*") == r".*\.attention\..*"
    assert parse_targets(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]


# ----------------------------------------------------------------------------- real runs
TINY = ["--max-steps", "2", "--batch-size", "4", "--max-length", "24", "--train-limit", "16",
        "--test-limit", "8", "--no-progress"]


@needs_assets
def test_train_writes_metrics_and_a_loadable_adapter(tmp_path, capsys):
    from rankwise.data import classification_loader, load_classification
    from rankwise.models import load_model

    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--method", "lora", "--r", "4", "--targets", "query,value",
                                "--checkpoint-every", "1", "--output", str(out), *TINY)
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())
    assert record["run"]["options"] == {"r": 4} and record["run"]["task"] == "seq-cls"
    assert set(record["metrics"]) == {"loss", "accuracy", "examples"} and record["metrics"]["examples"] == 8
    res = record["result"]
    assert res["steps"] == 2 and res["optimizer_state_bytes"] > 0 and res["peak_memory_bytes"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]

    # the saved adapter reproduces the trained model's accuracy on the same eval data
    base, tok = load_model("minilm-l6", task="seq-cls", num_labels=5)
    model = rw.load_adapter(base, out / "adapter")
    assert rw.summary(model).trainable == res["trainable_params"]
    ds = load_classification("bbc", "test", seed=0, limit=8)
    from rankwise.train import evaluate

    got = evaluate(model, classification_loader(ds, tok, 32, 24, shuffle=False))
    assert got["loss"] == pytest.approx(record["metrics"]["loss"], rel=1e-5)

    # --resume on the finished run continues from checkpoint-2: nothing left to do
    code, _, err = run_cli(capsys, "train", "--method", "lora", "--r", "4", "--targets", "query,value",
                           "--checkpoint-every", "1", "--output", str(out), "--resume", *TINY)
    assert code == 0, err
    again = json.loads((out / "metrics.json").read_text())
    assert again["metrics"]["loss"] == pytest.approx(record["metrics"]["loss"], rel=1e-6)


@needs_assets
def test_train_head_only_trains_only_the_head(tmp_path, capsys):
    out = tmp_path / "head"
    code, _, err = run_cli(capsys, "train", "--method", "head", "--output", str(out), *TINY)
    assert code == 0, err
    res = json.loads((out / "metrics.json").read_text())["result"]
    assert res["trainable_params"] == 384 * 5 + 5  # MiniLM hidden 384 -> 5 BBC topics
    from safetensors.torch import load_file

    assert sorted(load_file(str(out / "head.safetensors"))) == ["classifier.bias", "classifier.weight"]


@needs_assets
def test_demo_quick_writes_json_markdown_png(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "demo", "--quick", "--output", str(out), "--no-progress")
    assert code == 0, err
    for name in (RESULTS_JSON, REPORT_MD, PLOT_PNG):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / PLOT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / RESULTS_JSON).read_text())
    rows = results["results"]
    labels = [r["method"] for r in rows]
    assert labels == [e.label for e in select_entries()]
    assert labels[:2] == ["head-only", "full-ft"] and len(labels) >= 2 + min(5, len(available_entries()) - 2)
    needed = {c.key for c in COLUMNS} | {"test_loss", "total_params", "peak_memory_kind", "steps"}
    for r in rows:
        assert needed <= set(r), needed - set(r)
        assert r["steps"] == 3 and 0.0 <= r["test_accuracy"] <= 1.0
    by = {r["method"]: r for r in rows}
    assert by["full-ft"]["trainable_params"] == by["full-ft"]["total_params"]
    assert by["head-only"]["trainable_params"] == 384 * 5 + 5
    # exact AdamW state: 2 fp32 moments per trainable value + one fp32 step per tensor
    assert by["head-only"]["optimizer_state_bytes"] == 2 * 4 * (384 * 5 + 5) + 2 * 4
    md = (out / REPORT_MD).read_text()
    assert all(label in md for label in labels) and PLOT_PNG in md
    assert "head-only" in stdout and "test acc" in stdout


def test_demo_selection_prefers_registry_order():
    entries = available_entries()
    labels = [e.label for e in entries]
    assert labels[:3] == ["head-only", "full-ft", "lora"]
    assert all(e.method in rw.REGISTRY or e.method in ("head", "none") for e in entries)
    assert [e.label for e in select_entries(["head", "none", "lora"])] == ["head-only", "full-ft", "lora"]


@needs_assets
def test_train_bf16_weights_mixed_precision_and_accumulation(tmp_path, capsys):
    """`--dtype bfloat16 --precision bf16 --grad-accum 2 --gradient-checkpointing`: MiniLM loaded in bf16, LoRA
    factors trained in fp32 (the saved adapter), 2 optimizer steps of 2 batches each, the settings recorded."""
    out = tmp_path / "bf16"
    code, _, err = run_cli(capsys, "train", "--rank", "2", "--dtype", "bfloat16", "--precision", "bf16",
                           "--grad-accum", "2", "--gradient-checkpointing", "--output", str(out), *TINY)
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())
    assert record["result"]["steps"] == 2 and math.isfinite(record["metrics"]["loss"])
    settings = json.loads((out / "run_config.json").read_text())["settings"]
    # the dtype alias is stored by its short name
    assert (settings["dtype"], settings["precision"], settings["grad_accum"]) == ("bf16", "bf16", 2)
    assert settings["gradient_checkpointing"] is True
    from safetensors.torch import load_file

    tensors = load_file(str(next((out / "adapter").glob("*.safetensors"))))
    lora = {k: v.dtype for k, v in tensors.items() if "lora_" in k}
    assert lora and set(lora.values()) == {torch.float32}
    head = {k: v.dtype for k, v in tensors.items() if "classifier" in k}
    assert head and set(head.values()) == {torch.bfloat16}  # trained in full, in the base's dtype


@needs_assets
@pytest.mark.slow  # torch.compile of a tiny Llama on CPU: about a minute
def test_train_compile_matches_eager_and_saves_the_adapter(tmp_path, capsys):
    """`--compile` compiles the model in place: the run's losses match the eager run's and the saved adapter
    (its names unchanged by compilation) loads back."""
    from rankwise.models import load_model, tiny_llama

    _, tok = load_model("minilm-l6", task="base")
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(vocab_size=tok.vocab_size, seed=0).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    losses = {}
    for flag in ([], ["--compile"]):
        out = tmp_path / ("compiled" if flag else "eager")
        code, _, err = run_cli(capsys, "train", "--model", str(model_dir), "--data", "stdlib-code", "--rank", "2",
                               "--output", str(out), "--max-steps", "3", "--max-length", "32", "--train-limit", "2",
                               "--test-limit", "1", "--no-progress", *flag)
        assert code == 0, err
        record = json.loads((out / "metrics.json").read_text())
        losses[bool(flag)] = [h["loss"] for h in record["result"]["history"]]
        assert record["run"]["compile"] is bool(flag)
        assert rw.load_adapter(tiny_llama(vocab_size=tok.vocab_size, seed=0), str(out / "adapter")) is not None
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@needs_assets
def test_train_causal_lm_on_a_local_model_dir(tmp_path, capsys):
    """The LM path: a tiny Llama saved with MiniLM's tokenizer, trained on stdlib code text."""
    from rankwise.models import load_model, tiny_llama

    _, tok = load_model("minilm-l6", task="base")
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(vocab_size=tok.vocab_size, seed=0).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    out = tmp_path / "lm"
    code, _, err = run_cli(capsys, "train", "--model", str(model_dir),
                                "--data", "stdlib-code", "--method", "lora", "--r", "2", "--output", str(out),
                                "--max-steps", "2", "--max-length", "32", "--train-limit", "2", "--test-limit", "1",
                                "--no-progress")
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())
    assert record["run"]["task"] == "causal-lm"
    m = record["metrics"]
    assert m["tokens"] > 0 and m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-6)


@needs_assets
@pytest.mark.parametrize("optimizer", ["galore", "apollo", "badam"])
def test_train_full_parameters_with_a_memory_efficient_optimizer(tmp_path, capsys, optimizer):
    """`--method none --optimizer NAME --rank R` trains all weights with a rankwise.optim optimizer,
    keeping less optimizer state than AdamW."""
    from rankwise.models import load_model, tiny_llama

    _, tok = load_model("minilm-l6", task="base")
    model_dir = tmp_path / "tiny-llama"
    tiny_llama(vocab_size=tok.vocab_size, hidden=64, intermediate=128, seed=0).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    states = {}
    for name in ("adamw", optimizer):
        out = tmp_path / name
        extra = ["--optimizer-option", "switch_every=2"] if name == "badam" else (
            ["--rank", "4", "--update-gap", "2"] if name != "adamw" else [])
        code, _, err = run_cli(capsys, "train", "--model", str(model_dir), "--data", "stdlib-code", "--method", "none",
                               "--optimizer", name, *extra, "--output", str(out), "--max-steps", "3",
                               "--max-length", "32", "--train-limit", "2", "--test-limit", "1", "--no-progress")
        assert code == 0, err
        record = json.loads((out / "metrics.json").read_text())
        assert math.isfinite(record["metrics"]["loss"])
        states[name] = record["result"]["optimizer_state_bytes"]
    assert 0 < states[optimizer] < states["adamw"]
