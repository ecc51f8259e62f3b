"""Structured models in the bench: ``rw.sparsify`` with the options it takes, and the method's controller built on
the loop's optimizer (and step count) from the rest, acting after every step of the one loop."""

from __future__ import annotations

import pytest

from rankwise.bench import BenchTask, Experiment, Profile, run_one, runner

from ..cli.cli_helpers import needs_assets

STEPS = 4


@pytest.fixture(scope="module")
def lm_profile(tmp_path_factory):
    from rankwise.models import load_model, tiny_llama

    _, tok = load_model("minilm-l6", task="base")
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=tok.vocab_size, seed=0).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return Profile("tiny-lm", "tiny Llama on stdlib code", (BenchTask("code", str(path), "stdlib-code", "causal-lm"),),
                   steps=STEPS, batch_size=2, max_length=16, seeds=1, val_size=4, test_size=4,
                   lr_grids={"structured": (1e-3,)})


CASES = {
    "sltrain": {"rank": 4, "density": 0.1},
    "sst": {"rank": 4, "iteration_steps": "steps/2"},
    "trp": {"energy": 0.9, "period": 2},
    "maestro": {},
    "cuttlefish": {"interval": 1, "window": 2, "tail": 2},
    "lte": {"heads": 2, "rank": 2, "merge_every": 2},
    "slope": {"rank": 2, "lazy_fraction": 0.5},
    "refactor_reset": {"rank": 2, "refactor_every": "steps/2", "reset_every": 2},
    "relora": {"rank": 2, "warm_start": 0.25, "restarts": 0, "restart_warmup": 1},  # dense, switch, one merge
}


@needs_assets
@pytest.mark.parametrize("method", sorted(CASES))
def test_each_structured_method_trains_with_its_controller(method, lm_profile, monkeypatch):
    built = []
    real = runner.structured_controller

    def spy(model, exp, optimizer, steps):
        controllers, loss_fn = real(model, exp, optimizer, steps)
        for c in controllers:
            calls = built.append([]) or built[-1]
            inner = c.step
            c.step = lambda *a, _inner=inner, _calls=calls: (_calls.append(1), _inner(*a))[1]
        return controllers, loss_fn

    monkeypatch.setattr(runner, "structured_controller", spy)
    row = run_one(lm_profile, lm_profile.tasks[0], Experiment(method, method, CASES[method]), 1e-3, 0, "cpu")
    assert row["steps"] == STEPS and row["test_metric"] > 1.0
    assert [len(calls) for calls in built] == ([] if method == "sltrain" else [STEPS])


@needs_assets
def test_relora_starts_dense_then_merges_lora(lm_profile, monkeypatch):
    built = []
    real = runner.structured_controller
    monkeypatch.setattr(runner, "structured_controller",
                        lambda *a: (built.append(real(*a)) or built[-1]))
    run_one(lm_profile, lm_profile.tasks[0], Experiment("relora", "relora", CASES["relora"]), 1e-3, 0, "cpu")
    (controller,), _ = built[0]
    assert controller.switch_at == 1 and controller.relora.merges == 1  # switch after step 1, merge at step 4
