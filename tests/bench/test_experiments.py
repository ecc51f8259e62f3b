"""Experiment folders: PEFT adapter_config.json read into the rankwise method with the same trainable set,
training.json checked key by key, budget-relative settings, fingerprints."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rankwise as rw
from rankwise.bench import Experiment, from_peft_config, load_experiment, load_experiments, write_experiment
from rankwise.bench.experiments import resolve_budget

from ..conftest import make_tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_configs():
    import peft

    return {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
        "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True),
        "rslora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True),
        "vera": peft.VeraConfig(r=4, target_modules=TARGETS, d_initial=0.1),
        "hra": peft.HRAConfig(r=4, target_modules=TARGETS),
        "fourierft": peft.FourierFTConfig(n_frequency=24, scaling=50.0, target_modules=TARGETS),
        "c3a": peft.C3AConfig(block_size=8, target_modules=TARGETS),
        "delora": peft.DeloraConfig(r=4, delora_lambda=3.0, target_modules=TARGETS),
        "gralora": peft.GraloraConfig(r=4, alpha=12, gralora_k=2, target_modules=TARGETS),
        "randlora": peft.RandLoraConfig(r=8, randlora_alpha=16, target_modules=TARGETS),
    }


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(["lora", "dora", "rslora", "vera", "hra", "fourierft", "c3a", "delora",
                                         "gralora", "randlora"]))
def test_a_peft_config_file_trains_the_same_parameters(name, tmp_path):
    """The adapter_config.json PEFT writes becomes the rankwise adapter with PEFT's trainable count on the
    same layers (a wrong method, rank or block size changes the count)."""
    import peft

    cfg = _peft_configs()[name]
    base = make_tiny_llama(0)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    pm.save_pretrained(str(tmp_path))
    exp = load_experiment(tmp_path)
    assert sorted(exp.targets) == sorted(TARGETS)
    mine = rw.adapt(copy.deepcopy(base), exp.method, targets=exp.targets, trainable=None, **exp.options)
    assert _trainable(mine) == _trainable(pm)
    assert sorted(n for n, _ in rw.adapter_layers(mine)) == sorted(
        n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "base_layer"))


def test_lora_flags_and_scaling_follow_the_peft_config():
    assert from_peft_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}) == (
        "dora", {"r": 4, "alpha": 8, "dropout": 0.0}, "all-linear")
    method, options, _ = from_peft_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True,
                                           "init_lora_weights": "pissa_niter_4", "target_modules": "all-linear"})
    assert (method, options["use_rslora"], options["init"]) == ("lora", True, "pissa")
    assert from_peft_config({"peft_type": "LORA", "target_modules": r".*\.q_proj"})[2] == r"re:.*\.q_proj"
    with pytest.raises(ValueError, match="peft_type='LOKR'.*allowed"):
        from_peft_config({"peft_type": "LOKR"})
    with pytest.raises(ValueError, match="init_lora_weights='loftq'"):
        from_peft_config({"peft_type": "LORA", "init_lora_weights": "loftq"})


def test_training_json_is_checked_and_merged(tmp_path):
    folder = tmp_path / "galore-r16"
    folder.mkdir()
    (folder / "training.json").write_text(json.dumps(
        {"optimizer": "galore", "optimizer_options": {"rank": 16, "update_gap": "steps/4"}, "lr_grid": [1e-4, 1e-3]}))
    exp = load_experiment(folder)
    assert (exp.name, exp.method, exp.kind, exp.lr_grid) == ("galore-r16", "none", "full", (1e-4, 1e-3))
    assert resolve_budget(exp.optimizer_options, 50) == {"rank": 16, "update_gap": 12}
    assert resolve_budget({"switch_every": "steps/100"}, 50) == {"switch_every": 1}
    (folder / "training.json").write_text(json.dumps({"optimiser": "galore"}))
    with pytest.raises(ValueError, match=r"unknown keys \['optimiser'\]; allowed"):
        load_experiment(folder)
    (folder / "training.json").write_text(json.dumps({"method": "dora"}))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(ValueError, match="method='dora' contradicts adapter_config.json"):
        load_experiment(folder)
    (folder / "training.json").write_text(json.dumps({"lr_grid": [0]}))
    with pytest.raises(ValueError, match="lr_grid"):
        load_experiment(folder)


def test_written_experiments_read_back_and_fingerprints_follow_settings(tmp_path):
    exps = [Experiment("a", "lora", {"r": 4}, note="x"), Experiment("full-galore", "none", optimizer="galore",
                                                                     optimizer_options={"update_gap": "steps/4"})]
    for e in exps:
        write_experiment(e, tmp_path)
    assert load_experiments(tmp_path) == sorted(exps, key=lambda e: e.name)
    assert Experiment("a", "lora", {"r": 4}).fingerprint() == exps[0].fingerprint()  # the note is not a setting
    assert Experiment("a", "lora", {"r": 5}).fingerprint() != exps[0].fingerprint()
    with pytest.raises(ValueError, match="neither"):
        load_experiment(tmp_path / "missing")


def test_every_optimizer_has_bench_settings():
    """cpu-smoke runs full fine-tuning with every optimizer and sampler: a new one needs its knobs here."""
    from rankwise.bench.profiles import FULL_FT_OPTIMIZERS, builtin_experiments
    from rankwise.train import optimizer_names

    assert sorted(FULL_FT_OPTIMIZERS) == sorted(optimizer_names())
    names = {e.name for e in builtin_experiments("cpu-smoke")}
    assert {f"full-{n}" for n in optimizer_names()} | {"head", "lora", "dora", "vera"} <= names


def test_steps_factor_scales_the_budget_and_leaves_default_fingerprints_alone():
    """The equal-updates view: a sampler's steps multiplied, its steps/K knobs resolved against its own steps."""
    exp = Experiment("full-badam-equal-updates", "none", optimizer="badam", steps_factor=6,
                     optimizer_options={"switch_every": "steps/25"})
    assert exp.steps(50) == 300
    assert resolve_budget(exp.optimizer_options, exp.steps(50)) == {"switch_every": 12}
    assert Experiment("a", "lora").fingerprint() != Experiment("a", "lora", steps_factor=2).fingerprint()
    with pytest.raises(ValueError, match="steps_factor=0"):
        Experiment("a", "lora", steps_factor=0)


def test_every_cpu_smoke_controller_fits_the_profile_budget():
    """An adapter whose controller checks its schedule against the run (IncreLoRA's growth rounds, AdaLoRA's
    and ElaLoRA's phases, ...) is built on MiniLM with the cpu-smoke options at cpu-smoke's steps: an option
    set that cannot fit would fail every run of the bench."""
    from rankwise.adapters.rank_control import with_method_controllers
    from rankwise.adapters.registry import get_method
    from rankwise.bench.profiles import PROFILES, builtin_experiments
    from rankwise.models import load_model

    base, _ = load_model("minilm-l6", task="seq-cls", num_labels=5)
    steps = PROFILES["cpu-smoke"].steps
    checked = []
    for exp in builtin_experiments("cpu-smoke"):
        if exp.method in ("none", "head"):
            continue
        spec = get_method(exp.method)
        if spec.controller is None or spec.family == "quantization":
            continue
        model = rw.adapt(copy.deepcopy(base), exp.method, **resolve_budget(exp.options, steps))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        with_method_controllers(model, [], opt, exp.steps(steps))
        checked.append(exp.method)
    assert {"adalora", "increlora", "elalora"} <= set(checked), checked
