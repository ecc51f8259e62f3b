"""One set of flag names across the ``rankwise`` subcommands: every option documented, the old
spellings (``--r``, ``--steps``, ``--block-size``, YAML ``r``) as aliases, ``--rank`` routed to the
adapter or the projected optimizer, and one-line errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from rankwise.cli import build_parser, main
from rankwise.cli.common import FLAGS, UsageError, key_aliases
from rankwise.cli.train_config import check_config, resolve_train_config

COMMANDS = ("methods", "train", "demo", "compress", "export", "merge", "plan", "federate", "bench")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def train_config(*argv: str) -> dict:
    return resolve_train_config(build_parser().parse_args(["train", *argv]))


def exit_of(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- help
def test_every_subcommand_is_listed_and_documented(capsys):
    assert set(subparsers()) == set(COMMANDS)
    for name, parser in subparsers().items():
        undocumented = [a.dest for a in parser._actions if not a.help or a.help == argparse.SUPPRESS]
        assert not undocumented, (name, undocumented)
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and f"usage: rankwise {name}" in out
        assert "examples:" in out and f"rankwise {name}" in out.split("examples:")[1]


def test_shared_flags_have_one_spelling_everywhere():
    """A flag spelled in FLAGS is added only through FLAGS: same names, aliases and destination in every
    subcommand that takes it."""
    for name, parser in subparsers().items():
        for action in parser._actions:
            for flag in FLAGS.values():
                if set(action.option_strings) & set(flag.names):
                    assert tuple(action.option_strings) == flag.names and action.dest == flag.dest, (name, action)


@pytest.mark.parametrize("command,alias,canonical,value", [
    ("train", "--r", "--rank", "8"),
    ("demo", "--r", "--rank", "8"),
    ("compress", "--r", "--rank", "8"),
    ("demo", "--steps", "--max-steps", "5"),
    ("compress", "--steps", "--max-steps", "5"),
    ("compress", "--block-size", "--max-length", "64"),
    ("train", "--block-size", "--max-length", "64"),
])
def test_old_spellings_are_aliases(command, alias, canonical, value):
    extra = ["--method", "svd"] if command == "compress" else []
    parse = build_parser().parse_args
    assert vars(parse([command, *extra, alias, value])) == vars(parse([command, *extra, canonical, value]))
    assert getattr(parse([command, *extra, alias, value]), FLAGS[canonical[2:].replace("-", "_")].dest) == int(value)


def test_demo_and_compress_flags_reach_their_settings(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("rankwise.demo.run_demo", lambda settings, **kw: seen.update(settings=settings, **kw))
    assert main(["demo", "--quick", "--steps", "2", "--rank", "3", "--max-length", "16", "--no-progress",
                 "--lr", "lora=3e-3", "--output", str(tmp_path)]) == 0
    s = seen["settings"]
    assert (s.steps, s.r, s.max_length, s.batch_size) == (2, 3, 16, 8)
    assert seen["progress"] is False and seen["lrs"] == {"lora": 3e-3}
    args = build_parser().parse_args(["compress", "--method", "svd", "--steps", "3", "--block-size", "64"])
    assert (args.max_steps, args.max_length, args.progress) == (3, 64, True)


# ----------------------------------------------------------------------------- --rank in train
def test_rank_is_the_adapter_rank_for_adapter_methods():
    for flag in ("--rank", "--r"):
        cfg = train_config("--method", "lora", flag, "8")
        assert cfg["options"] == {"r": 8} and "rank" not in cfg["optimizer_options"]
    cfg = train_config("--method", "lora", "--rank", "8", "--optimizer", "galore", "--optimizer-option", "rank=64")
    assert cfg["options"] == {"r": 8} and cfg["optimizer_options"] == {"rank": 64}
    check_config(cfg)


def test_rank_is_the_optimizer_rank_for_none_and_head():
    cfg = train_config("--method", "none", "--optimizer", "galore", "--rank", "128", "--update-gap", "50")
    assert cfg["options"] == {} and cfg["optimizer_options"] == {"rank": 128, "update_gap": 50}
    check_config(cfg)
    cfg = train_config("--method", "head", "--optimizer", "apollo", "--r", "16")
    assert cfg["optimizer_options"] == {"rank": 16}
    # OwLore samples layers and projects their gradients (GaLore): it takes the rank too (it was refused)
    cfg = train_config("--method", "none", "--optimizer", "owlore", "--rank", "4", "--update-gap", "2")
    assert cfg["optimizer_options"] == {"rank": 4, "update_gap": 2}
    check_config(cfg)


def test_yaml_keys_take_the_old_spellings(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("method: dora\nr: 4\nsteps: 9\nblock-size: 32\n")
    cfg = train_config(str(y))
    assert cfg["options"] == {"r": 4} and cfg["max_steps"] == 9 and cfg["max_length"] == 32
    y.write_text("method: none\noptimizer: galore\nrank: 64\n")
    assert train_config(str(y))["optimizer_options"] == {"rank": 64}
    assert key_aliases() == {"r": "rank", "steps": "max_steps", "block_size": "max_length",
                             "checkpointing": "gradient_checkpointing"}


def test_flags_beat_yaml_for_the_rank(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("method: lora\noptions: {r: 4}\n")
    assert train_config(str(y), "--rank", "16")["options"] == {"r": 16}
    y.write_text("method: lora\nrank: 4\n")
    assert train_config(str(y), "--option", "r=16")["options"] == {"r": 16}


@pytest.mark.parametrize("argv,needles", [
    (["train", "--method", "none", "--optimizer", "galore", "--option", "rank=128"],
     ["apply only to adapter methods", "--rank", "--optimizer-option KEY=VALUE"]),
    (["train", "--method", "none", "--rank", "4"], ["ranks apply only to adapter methods", "--optimizer adamw"]),
    (["train", "--method", "none", "--update-gap", "5"], ["--update-gap apply only to the projected optimizers"]),
    (["train", "--rank", "4", "--option", "r=8"], ["the rank is given twice"]),
    (["compress", "--method", "nope"], ["invalid choice: 'nope'"]),
    (["train", "--rank", "eight"], ["invalid int value: 'eight'"]),
    (["train", "--grad-accum", "0"], ["grad_accum=0 must be an integer >= 1"]),
    (["compress"], ["the following arguments are required: --method"]),
    (["nope"], ["invalid choice"]),
])
def test_mistakes_are_one_line_exit_2(capsys, argv, needles):
    code, err = exit_of(capsys, *argv)
    assert code == 2 and err.startswith("rankwise: error:") and len(err.strip().splitlines()) == 1, err
    assert all(n in err for n in needles), err


def test_yaml_giving_a_setting_twice_is_an_error(tmp_path, capsys):
    y = tmp_path / "run.yaml"
    y.write_text("r: 4\nrank: 8\n")
    code, err = exit_of(capsys, "train", str(y))
    assert code == 2 and "'rank' sets 'rank' a second time" in err


def test_debug_shows_the_traceback():
    env = {**os.environ, "RANKWISE_DEBUG": "1"}
    out = subprocess.run([sys.executable, "-m", "rankwise", "train", "--method", "nope"],
                         capture_output=True, text=True, timeout=120, check=False, env=env)
    assert out.returncode == 1 and "Traceback" in out.stderr and "UsageError" in out.stderr


def test_skip_nonfinite_is_on_by_default_and_can_be_turned_off():
    from rankwise.cli.train import _train_config

    assert _train_config(train_config("--method", "lora")).skip_nonfinite is True
    assert _train_config(train_config("--method", "lora", "--no-skip-nonfinite")).skip_nonfinite is False
    cfg = {**train_config("--method", "lora"), "skip_nonfinite": "no"}  # as a YAML file may give it
    with pytest.raises(UsageError, match=r"skip_nonfinite='no' must be true or false"):
        check_config(cfg)
