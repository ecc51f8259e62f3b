"""Fuzzing the arguments: every option of every ``rankwise`` subcommand fed bad values (empty, negative,
zero, nan, inf, huge, wrong-type strings, missing paths, a file where a directory is expected and the
reverse) must end as exit status 2 with one ``rankwise: error:`` line naming it, before any model loads;
and the public Python functions (rw.adapt, rw.optim.make, rw.sparsify, rw.compress, TrainConfig) must
raise a ValueError / TypeError naming the parameter.

``python tests/cli/test_fuzz.py`` prints the counts (inputs tried, tracebacks left)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# ----------------------------------------------------------------------------- bad values by kind
POS_INT = ["", "0", "-1", "abc", "1.5", "nan", "inf", "1e999", "9" * 40 + "x"]
NONNEG_INT = ["", "-1", "abc", "1.5", "nan", "inf", "-5"]
ANY_INT = ["", "abc", "1.5", "nan", "1e999"]
POS_FLOAT = ["", "0", "-1", "nan", "inf", "-inf", "1e999", "abc"]
NONNEG_FLOAT = ["", "-1", "nan", "inf", "abc", "-1e-9"]
FRACTION = ["", "0", "-1", "1.5", "nan", "inf", "abc"]
NAME = ["", "nope", "-1", "nan", "NONE!"]
OUT = ["", "{file}", "{file}/sub", "/sys/rankwise-fuzz"]
KEY_VALUE = ["novalue", "=1", " =2"]


def expand(values: list[str], root: Path) -> list[str]:
    return [v.format(file=root / "a-file", dir=root / "a-dir", missing=root / "missing") for v in values]


#: (subcommand with the arguments it needs, option, bad values)
CASES: list[tuple[list[str], str, list[str]]] = [
    (["methods"], "--family", NAME),
    (["methods"], "--status", NAME),
    (["methods"], "--format", NAME),
    *[(["train"], opt, POS_INT) for opt in ("--epochs", "--max-steps", "--batch-size", "--max-length", "--rank",
                                             "--train-limit", "--test-limit")],
    *[(["train"], opt, NONNEG_INT) for opt in ("--warmup-steps", "--eval-every", "--checkpoint-every")],
    (["train"], "--seed", ANY_INT),
    (["train"], "--lr", POS_FLOAT),
    (["train"], "--max-grad-norm", [v for v in POS_FLOAT if v != ""]),
    (["train"], "--weight-decay", NONNEG_FLOAT),
    (["train"], "--alpha", ["", "nan", "inf", "-inf", "abc", "0"]),
    (["train"], "--dropout", ["", "-0.1", "1", "1.5", "nan", "abc"]),
    (["train"], "--init", NAME),
    (["train"], "--method", NAME),
    (["train"], "--model", [*NAME, "{file}", "{dir}", "{missing}/x"]),
    (["train"], "--data", NAME),
    (["train"], "--task", NAME),
    (["train"], "--schedule", NAME),
    (["train"], "--optimizer", NAME),
    (["train"], "--device", ["", "tpu", "cuda:99", "cpu:0x"]),
    (["train"], "--targets", ["", ",", "re:([", "re:", "re:nomatch["]),
    (["train"], "--option", [*KEY_VALUE, "bogus=1", "r=0", "r=abc", "alpha=nan"]),
    (["train"], "--optimizer-option", KEY_VALUE),
    (["train", "--method", "none", "--optimizer", "galore"], "--update-gap", POS_INT),
    (["train", "--method", "none", "--optimizer", "galore"], "--scale", ["", "nan", "inf", "abc", "0", "-1"]),
    (["train", "--method", "none", "--optimizer", "galore"], "--optimizer-option", ["rank=0", "bogus=1"]),
    (["train"], "--output", OUT),
    (["train", "--output", "{dir}"], "--resume", ["", "{missing}", "{file}"]),
    (["train", "--output", "{dir}", "--resume"], "--allow-change", ["nope", "model", "r", "method"]),
    (["train", "--output", "{dir}"], "--allow-change", ["lr"]),  # without --resume
    (["train"], "{yaml}", ["output: 5", "optimizer_options: [1]", 'progress: "no"', "lr: fast", "seed: abc",
                           "targets: 5", "options: 3", "resume: 3", "- a\n- b", "lr: [1]", "model: 3", ": :",
                           "epochs: true", "max_steps: 1.5", "device: 0", "bogus: 1"]),
    (["train"], "{config}", ["{missing}.yaml", "{dir}", "{file}"]),
    *[(["demo", "--quick"], opt, POS_INT) for opt in ("--max-steps", "--batch-size", "--max-length", "--rank",
                                                       "--train-limit", "--test-limit")],
    (["demo", "--quick"], "--seed", ANY_INT),
    (["demo", "--quick"], "--device", ["", "tpu", "cuda:99"]),
    (["demo", "--quick"], "--methods", ["", ",", "zzz", "lora,zzz"]),
    (["demo", "--quick"], "--lr", ["lora", "lora=abc", "lora=-1", "lora=nan", "lora=inf", "zzz=1e-3", "=1"]),
    (["demo", "--quick"], "--output", OUT),
    (["compress"], "--method", NAME),
    (["compress", "--method", "svd"], "--ratio", FRACTION),
    (["compress", "--method", "svd"], "--rank", POS_INT),
    (["compress", "--method", "loraprune"], "--max-steps", NONNEG_INT),
    (["compress", "--method", "svd"], "--max-steps", ["3"]),  # svd is one-shot
    (["compress", "--method", "svd"], "--recover-steps", NONNEG_INT),
    (["compress", "--method", "lord"], "--calibration-batches", NONNEG_INT),
    (["compress", "--method", "svd"], "--calibration-batches", ["2"]),  # lord only
    (["compress", "--method", "svd"], "--lr", POS_FLOAT),
    *[(["compress", "--method", "svd"], opt, POS_INT) for opt in ("--eval-blocks", "--max-length", "--batch-size",
                                                                   "--train-batch-size")],
    (["compress", "--method", "svd"], "--seed", ANY_INT),
    (["compress", "--method", "svd"], "--model", [*NAME, "{file}", "{dir}"]),
    (["compress", "--method", "svd"], "--output", OUT),
    *[([cmd, "{adapter}"], "--output", [*OUT, "{adapter}", "{nonempty}"]) for cmd in ("export", "merge")],
    *[([cmd, "{adapter}", "--output", "{missing}"], "--model", [*NAME, "{file}", "{dir}", "scratch-20m"])
      for cmd in ("export", "merge")],
    *[([cmd, "--output", "{missing}"], "{adapter_arg}", ["", "{missing}", "{file}", "{dir}", "{badjson}"])
      for cmd in ("export", "merge")],
    *[(["plan", "--model", "scratch-20m"], opt, POS_INT) for opt in ("--batch-size", "--max-length", "--world-size")],
    (["plan", "--model", "scratch-20m", "--max-length", "8"], "--rank", ["", "abc", "1.5", "0", "-1"]),
    (["plan", "--model", "scratch-20m", "--max-length", "8"], "--memory",
     ["", "0", "-1", "nan", "inf", "abc", "12XB", "1e999"]),
    (["plan", "--model", "scratch-20m", "--max-length", "8"], "--method", NAME),
    (["plan", "--model", "scratch-20m", "--max-length", "8"], "--optimizer", NAME),
    (["plan", "--model", "scratch-20m", "--max-length", "8"], "--dtype", NAME),
    (["plan", "--model", "scratch-20m", "--max-length", "8"], "--format", NAME),
    (["plan", "--model", "scratch-20m", "--max-length", "8", "--method", "lora"], "--quantize", NAME),
    (["plan", "--model", "scratch-20m", "--max-length", "8"], "--option", [*KEY_VALUE, "bogus=1"]),
    (["plan", "--max-length", "8"], "--model", [*NAME, "{file}", "{dir}", "{missing}/x"]),
    (["nope"], "{command}", [""]),
]


class Reached(Exception):
    """The command got past its checks to the heavy part (a model load or a run)."""


def _stub(monkeypatch: Any) -> None:
    def heavy(*args: Any, **kwargs: Any) -> None:
        raise Reached

    for target in ("rankwise.models.load_model", "rankwise.demo.run_demo", "rankwise.cli.train._run",
                   "rankwise.cli.adapted.load_adapted"):
        monkeypatch.setattr(target, heavy, raising=False)


def _fixtures(root: Path) -> None:
    (root / "a-file").write_text("x")
    (root / "a-dir").mkdir(exist_ok=True)
    (root / "nonempty").mkdir(exist_ok=True)
    (root / "nonempty" / "keep.txt").write_text("x")
    adapter = root / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "rankwise_adapter.json").write_text(json.dumps(
        {"format": "rankwise-adapter", "method": "lora", "config": {"r": 2}, "layers": [], "trainable_modules": [],
         "base_model": "minilm-l6"}))
    bad = root / "badjson"
    bad.mkdir(exist_ok=True)
    (bad / "rankwise_adapter.json").write_text("{not json")


def argv_for(command: list[str], option: str, value: str, root: Path) -> list[str]:
    subs = {"{adapter}": str(root / "adapter"), "{dir}": str(root / "a-dir"), "{missing}": str(root / "missing"),
            "{nonempty}": str(root / "nonempty"), "{file}": str(root / "a-file"), "{badjson}": str(root / "badjson")}

    def sub(text: str) -> str:
        for k, v in subs.items():
            text = text.replace(k, v)
        return text

    args = [sub(a) for a in command]
    value = sub(value)
    if option == "{yaml}":
        (root / "run.yaml").write_text(value + "\n")
        return [*args, str(root / "run.yaml")]
    if option in ("{config}", "{adapter_arg}", "{command}"):
        return [*args, value] if option != "{command}" else args
    return [*args, option, value]


def run_one(argv: list[str]) -> tuple[str, int | None, str]:
    """``(outcome, exit status, stderr)``; outcome is ``ok`` (exit 2, one error line, no traceback),
    ``reached`` (got past the checks), ``traceback`` (any other exception) or ``bad-exit``."""
    from rankwise.cli import main

    err = io.StringIO()
    code: int | None = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Reached:
            return "reached", None, err.getvalue()
        except Exception as e:  # noqa: BLE001  what the fuzz looks for
            return "traceback", None, f"{type(e).__name__}: {e}"
    text = err.getvalue()
    one_line = text.startswith("rankwise: error:") and len(text.strip().splitlines()) == 1
    if code == 2 and one_line and "Traceback" not in text:
        return "ok", code, text
    return "bad-exit", code, text


def all_inputs() -> list[tuple[str, list[str], str, str]]:
    """``(label, command, option, value)`` of every input."""
    return [(f"{' '.join(command)} {option} {value!r}", command, option, value)
            for command, option, values in CASES for value in values]


INPUTS = all_inputs()


@pytest.fixture
def fuzz_root(tmp_path, monkeypatch):
    _stub(monkeypatch)
    monkeypatch.chdir(tmp_path)  # default outputs (runs/<method>, demo-out) land here
    _fixtures(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", range(len(INPUTS)), ids=[i[0] for i in INPUTS])
def test_cli_bad_value_is_one_line_exit_2(fuzz_root, case):
    label, command, option, value = INPUTS[case]
    outcome, code, text = run_one(argv_for(command, option, value, fuzz_root))
    assert outcome == "ok", f"{label}: {outcome} (exit {code}): {text}"


# ----------------------------------------------------------------------------- the Python API
def _tiny():
    from tests.conftest import make_tiny_bert

    return make_tiny_bert()


def _api_cases() -> list[tuple[str, Callable[[], Any], str]]:
    """(label, call, a word the message must contain: the parameter's name)."""
    import rankwise as rw
    from rankwise.train import TrainConfig

    cases: list[tuple[str, Callable[[], Any], str]] = []

    def add(label: str, call: Callable[[], Any], needle: str) -> None:
        cases.append((label, call, needle))

    for value in (0, -1, 1.5, "4", None, True, math.nan, 10**9):
        add(f"adapt r={value!r}", lambda v=value: rw.adapt(_tiny(), "lora", r=v), "r")
    for value in (math.nan, math.inf, "x"):
        add(f"adapt alpha={value!r}", lambda v=value: rw.adapt(_tiny(), "lora", alpha=v), "alpha")
    for value in (-0.1, 1.0, 2, math.nan, "x"):
        add(f"adapt dropout={value!r}", lambda v=value: rw.adapt(_tiny(), "lora", dropout=v), "dropout")
    add("adapt init='nope'", lambda: rw.adapt(_tiny(), "lora", init="nope"), "init")
    add("adapt method='nope'", lambda: rw.adapt(_tiny(), "nope"), "nope")
    add("adapt bogus=1", lambda: rw.adapt(_tiny(), "lora", bogus=1), "bogus")
    for value in (5, [], [3], "re[", ""):
        add(f"adapt targets={value!r}", lambda v=value: rw.adapt(_tiny(), "lora", targets=v), "targets")
    for key, value in (("lr", -1), ("lr", math.nan), ("lr", "x"), ("rank", 0), ("rank", -2), ("update_gap", 0),
                       ("weight_decay", -1), ("betas", (1.5, 0.9)), ("betas", 3), ("scale", math.nan),
                       ("bogus", 1)):
        add(f"optim.make galore {key}={value!r}",
            lambda k=key, v=value: rw.optim.make("galore", _tiny(), **{"rank": 4, k: v}), key)
    add("optim.make 'nope'", lambda: rw.optim.make("nope", _tiny()), "nope")
    for key, value in (("lr", 0), ("lr", math.inf), ("weight_decay", math.nan)):
        add(f"optim.make adamw {key}={value!r}", lambda k=key, v=value: rw.optim.make("adamw", _tiny(), **{k: v}),
            key)
    add("sparsify 'nope'", lambda: rw.sparsify(_tiny(), "nope"), "nope")
    add("sparsify sltrain bogus=1", lambda: rw.sparsify(_tiny(), "sltrain", bogus=1), "bogus")
    add("sparsify targets=5", lambda: rw.sparsify(_tiny(), "sltrain", targets=5), "targets")
    for value in (0, -1, 1.5, math.nan, "0.5", None):
        add(f"compress ratio={value!r}", lambda v=value: rw.compress(_tiny(), "svd", ratio=v), "ratio")
    add("compress 'nope'", lambda: rw.compress(_tiny(), "nope"), "nope")
    add("compress steps=-1", lambda: rw.compress(_tiny(), "svd", steps=-1), "steps")
    add("compress svd rank=0", lambda: rw.compress(_tiny(), "svd", rank=0), "rank")
    add("compress svd bogus=1", lambda: rw.compress(_tiny(), "svd", bogus=1), "bogus")
    for key, value in (("lr", 0), ("lr", math.nan), ("lr", "fast"), ("epochs", 0), ("max_steps", 0),
                       ("batch_size", 0), ("max_length", -1), ("weight_decay", -1), ("warmup_steps", -1),
                       ("schedule", "nope"), ("optimizer", "nope"), ("seed", "abc"), ("seed", 1.5),
                       ("device", "tpu"), ("task", "nope"), ("progress", "no"), ("measure_memory", 1),
                       ("keep_checkpoints", 0), ("optimizer_kwargs", [1]), ("output_dir", 5),
                       ("max_grad_norm", -1), ("eval_every", -1), ("eval_max_batches", 0), ("log_every", 0)):
        add(f"TrainConfig {key}={value!r}", lambda k=key, v=value: TrainConfig(**{k: v}), key)
    return cases


API_CASES = _api_cases()
@pytest.mark.parametrize("case", [pytest.param(i, id=c[0]) for i, c in enumerate(API_CASES)])
def test_api_bad_argument_names_the_parameter(case):
    label, call, needle = API_CASES[case]
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    assert needle in str(e.value), f"{label}: {e.value}"


# ----------------------------------------------------------------------------- the counts
def fuzz_counts() -> dict[str, int]:
    """Run every CLI and API input once; how many were tried and how each ended."""
    counts = {"cli_inputs": 0, "api_inputs": 0, "tracebacks": 0, "not_one_line_exit_2": 0, "not_checked": 0,
              "api_not_naming_parameter": 0}
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        root = Path(tmp)
        _stub(mp)
        mp.chdir(root)
        _fixtures(root)
        for _, command, option, value in INPUTS:
            counts["cli_inputs"] += 1
            outcome, _, _ = run_one(argv_for(command, option, value, root))
            counts["tracebacks"] += outcome == "traceback"
            counts["not_one_line_exit_2"] += outcome == "bad-exit"
            counts["not_checked"] += outcome == "reached"
    for _label, call, needle in API_CASES:
        counts["api_inputs"] += 1
        try:
            call()
            counts["not_checked"] += 1
        except (ValueError, TypeError) as e:
            counts["api_not_naming_parameter"] += needle not in str(e)
        except Exception:  # noqa: BLE001
            counts["tracebacks"] += 1
    return counts


def test_fuzz_counts(capsys):
    counts = fuzz_counts()
    with capsys.disabled():
        print(f"\nfuzz: {counts['cli_inputs']} CLI + {counts['api_inputs']} API inputs tried; "
              f"{counts['tracebacks']} tracebacks, {counts['not_one_line_exit_2']} not one-line exit 2, "
              f"{counts['not_checked']} not checked, {counts['api_not_naming_parameter']} not naming the parameter")
    assert counts["tracebacks"] == counts["not_one_line_exit_2"] == counts["not_checked"] == 0, counts
    assert counts["api_not_naming_parameter"] == 0, counts


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    print(json.dumps(fuzz_counts(), indent=2))
