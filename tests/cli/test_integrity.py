"""``rankwise train`` / ``demo`` / ``compress`` and their output directories: checked before anything is
loaded, locked while a run writes, another run's directory refused unless ``--overwrite``, resume refusing
changed settings unless ``--allow-change``, and YAML values of the wrong type named in one line."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from rankwise.cli.common import run_command
from rankwise.cli.train import write_run_config
from tests.cli.cli_helpers import needs_assets, one_line, run_cli
from tests.test_run_integrity import hold_lock

TINY = ["--max-steps", "2", "--batch-size", "4", "--max-length", "24", "--train-limit", "16",
        "--test-limit", "8", "--no-progress"]


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model (or running the demo) fails the test: errors must come before."""
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("rankwise.models.load_model", fail)
    monkeypatch.setattr("rankwise.demo.run_demo", fail)


@pytest.fixture
def fake_run(monkeypatch):
    """``rankwise train`` up to the model load: records the settings it would train with."""
    seen: list[tuple[dict, list]] = []

    def record(cfg, tcfg, allow):
        seen.append((cfg, allow))
        write_run_config(cfg)  # as the real run does once the model is built
        return 0

    monkeypatch.setattr("rankwise.cli.train._run", record)
    return seen


def fake_checkpoint(out: Path, step: int = 2) -> None:
    ckpt = out / "checkpoints" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.pt").write_bytes(b"x")


# ----------------------------------------------------------------------------- --output checked first
@pytest.mark.parametrize("command", [["train"], ["demo", "--quick"], ["compress", "--method", "svd"]])
def test_an_output_that_is_a_file_fails_before_loading(tmp_path, capsys, no_load, command):
    (tmp_path / "hostname").write_text("x")
    code, _, err = run_cli(capsys, *command, "--output", tmp_path / "hostname")
    assert one_line(code, err, "hostname", "is not a directory"), err
    code, _, err = run_cli(capsys, *command, "--output", tmp_path / "hostname" / "sub")
    assert one_line(code, err, "is not a directory"), err


@pytest.mark.skipif(os.access("/sys", os.W_OK) and not os.path.isdir("/sys/kernel"), reason="no read-only /sys")
@pytest.mark.parametrize("command", [["train"], ["demo", "--quick"], ["compress", "--method", "svd"]])
def test_an_unwritable_output_fails_before_loading(capsys, no_load, command):
    code, _, err = run_cli(capsys, *command, "--output", "/sys/rankwise-out")
    assert one_line(code, err, "/sys/rankwise-out", "not writable"), err


def test_a_full_disk_is_one_line_naming_the_path(capsys):
    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/a/adapter/x.safetensors")

    assert run_command(full, None) == 2
    err = capsys.readouterr().err
    assert err == "rankwise: error: /runs/a/adapter/x.safetensors: No space left on device\n"


# ----------------------------------------------------------------------------- another run's directory
def test_a_new_run_refuses_another_runs_directory(tmp_path, capsys, fake_run):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", "--output", out)[0] == 0
    assert json.loads((out / "run_config.json").read_text())["settings"]["output"] == str(out)
    fake_checkpoint(out, step=50)
    code, _, err = run_cli(capsys, "train", "--output", out, "--seed", "1")
    assert one_line(code, err, "holds another run", "run_config.json", "checkpoints", "--overwrite", "--resume"), err
    assert (out / "checkpoints" / "checkpoint-50").is_dir() and len(fake_run) == 1
    code, _, err = run_cli(capsys, "train", "--output", out, "--seed", "1", "--overwrite")
    assert code == 0, err
    assert not (out / "checkpoints").exists()  # a kill now cannot resume the old run's weights
    assert json.loads((out / "run_config.json").read_text())["settings"]["seed"] == 1


def test_a_second_concurrent_run_names_the_lock_holder(tmp_path, capsys, fake_run):
    proc = hold_lock(tmp_path / "run")
    try:
        code, _, err = run_cli(capsys, "train", "--output", tmp_path / "run")
        assert one_line(code, err, f"pid {proc.pid}", "in use by another rankwise run"), err
    finally:
        proc.kill()
        proc.wait()
    assert not fake_run
    assert run_cli(capsys, "train", "--output", tmp_path / "run")[0] == 0  # the dead holder's lock is taken over


# ----------------------------------------------------------------------------- resume
def test_resume_refuses_changed_settings_before_loading(tmp_path, capsys, fake_run):
    out = tmp_path / "run"
    base = ["train", "--output", out, "--rank", "4", "--max-steps", "10"]
    assert run_cli(capsys, *base)[0] == 0
    code, _, err = run_cli(capsys, *base, "--resume")
    assert one_line(code, err, "no checkpoint"), err
    fake_checkpoint(out)
    for flags, needles in [(["--lr", "2e-3"], ["lr: 0.001 -> 0.002", "--allow-change"]),
                           (["--seed", "3"], ["seed: 0 -> 3"]),
                           (["--batch-size", "2"], ["batch_size: 8 -> 2"]),
                           (["--grad-accum", "2"], ["grad_accum: 1 -> 2"]),
                           (["--alpha", "32"], ["alpha: None -> 32"]),
                           (["--rank", "8"], ["r: 4 -> 8 (cannot change on resume)"]),
                           (["--max-steps", "5"], ["max_steps: 10 -> 5"])]:
        code, _, err = run_cli(capsys, *base, *flags, "--resume")
        assert one_line(code, err, *needles), (flags, err)
    assert len(fake_run) == 1
    code, _, err = run_cli(capsys, *base, "--rank", "8", "--resume", "--allow-change", "r")
    assert one_line(code, err, "'r' cannot change on resume"), err
    code, _, err = run_cli(capsys, *base, "--resume", "--allow-change", "nope")
    assert one_line(code, err, "--allow-change 'nope'", "'lr'"), err
    # allowed: a new lr (and, always, more steps); progress and device never count
    code, _, err = run_cli(capsys, "train", "--output", out, "--rank", "4", "--max-steps", "20", "--lr", "2e-3",
                           "--resume", "--allow-change", "lr", "--no-progress", "--device", "cpu")
    assert code == 0, err
    assert fake_run[-1][1] == ["lr"] and fake_run[-1][0]["lr"] == 2e-3
    assert json.loads((out / "run_config.json").read_text())["settings"]["lr"] == 2e-3  # the run now has it
    # a run recorded before a setting existed (grad_accum) ran with its default: it resumes
    record = json.loads((out / "run_config.json").read_text())
    del record["settings"]["grad_accum"]
    (out / "run_config.json").write_text(json.dumps(record))
    code, _, err = run_cli(capsys, "train", "--output", out, "--rank", "4", "--max-steps", "20", "--lr", "2e-3",
                           "--resume")
    assert code == 0, err


@needs_assets
def test_resume_with_an_allowed_lr_trains_with_it(tmp_path, capsys):
    """End to end: the new lr used to be silently replaced by the checkpoint's while metrics.json said the new."""
    out = tmp_path / "run"
    args = ["train", "--method", "lora", "--rank", "2", "--targets", "query,value", "--output", out,
            "--checkpoint-every", "1", "--schedule", "constant", *TINY]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, "--lr", "4e-3", "--resume")
    assert one_line(code, err, "lr: 0.001 -> 0.004"), err
    code, _, err = run_cli(capsys, *args, "--lr", "4e-3", "--max-steps", "3", "--resume", "--allow-change", "lr")
    assert code == 0, err
    record = json.loads((out / "metrics.json").read_text())
    assert [h["lr"] for h in record["result"]["history"]] == pytest.approx([1e-3, 1e-3, 4e-3])
    assert record["run"]["lr"] == 4e-3
    for name in ("checkpoint-2", "checkpoint-3"):
        assert (out / "checkpoints" / name).is_dir()


# ----------------------------------------------------------------------------- YAML values
@pytest.mark.parametrize("yaml,needle", [
    ("output: 5", "output=5"),
    ("optimizer_options: [1]", "optimizer_options=[1]"),
    ('progress: "no"', "progress='no' must be true or false"),
    ("lr: fast", "lr='fast'"),
    ("seed: abc", "seed='abc'"),
    ("method: [lora]", "method=['lora']"),
    ("targets: 5", "targets=5"),
    ("options: [1]", "'options' must be a mapping"),
    ("resume: 3", "resume=3"),
    ("epochs: 1.5", "epochs=1.5"),
    ("max_grad_norm: abc", "max_grad_norm='abc'"),
])
def test_yaml_values_of_the_wrong_type_name_the_field(tmp_path, capsys, monkeypatch, no_load, yaml, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml + "\n")
    code, _, err = run_cli(capsys, "train", tmp_path / "run.yaml")
    assert one_line(code, err, needle), err
    assert not (tmp_path / "runs").exists()
