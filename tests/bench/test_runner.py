"""The bench runner: the lr is chosen on validation only, seeds follow at it, runs resume and shard without
repeats or gaps, a folder never mixes budgets or changed experiments; one real run's measurements."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rankwise.bench import Bench, Experiment, read_rows, runner
from rankwise.bench.runner import chosen_lr

from ..cli.cli_helpers import needs_assets

EXPS = [Experiment("lora", "lora", {"r": 2}), Experiment("full-adamw", "none")]


def _fake_run(calls):
    """A run_one stand-in whose validation metric peaks at lr 1e-3 and test metric at lr 1e-2."""
    def run_one(profile, task, exp, lr, seed, device="auto"):
        calls.append((task.name, exp.name, lr, seed))
        val = {1e-3: 0.9, 1e-2: 0.5, 1e-4: 0.7}[lr]
        test = {1e-3: 0.6, 1e-2: 0.95, 1e-4: 0.7}[lr]
        return {"val_metric": val, "test_metric": test + seed / 100, "loss_curve": [1.0, 0.5]}
    return run_one


def test_lr_is_chosen_on_validation_never_on_test(tiny_profile, tmp_path, monkeypatch):
    """The sweep trains seed 0 at every lr; the other seeds run at the lr with the best validation metric
    (1e-3 here), although another lr (1e-2) scores better on test."""
    calls: list = []
    monkeypatch.setattr(runner, "run_one", _fake_run(calls))
    Bench(tiny_profile, EXPS[:1], tmp_path, tiny_profile.tasks, seeds=3).run(say=lambda _: None)
    assert calls == [("bbc", "lora", 1e-3, 0), ("bbc", "lora", 1e-2, 0), ("bbc", "lora", 1e-3, 1),
                     ("bbc", "lora", 1e-3, 2)]
    rows = read_rows(tmp_path)
    assert [r["role"] for r in rows] == ["sweep", "sweep", "seed", "seed"]
    assert chosen_lr(rows, higher=True) == 1e-3
    assert chosen_lr(rows, higher=False) == 1e-2  # a lower-is-better metric (perplexity) picks the other end


def test_a_rerun_resumes_and_shards_split_the_work(tiny_profile, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(runner, "run_one", _fake_run(calls))
    profile = dataclasses.replace(tiny_profile, lr_grids={"adapter": (1e-3, 1e-2), "full": (1e-4, 1e-3)})
    for shard in ((0, 2), (1, 2)):
        Bench(profile, EXPS, tmp_path, profile.tasks, seeds=2, shard=shard).run(say=lambda _: None)
    assert sorted({(t, e) for t, e, _, _ in calls}) == [("bbc", "full-adamw"), ("bbc", "lora")]
    assert len(calls) == len(set(calls)) == 6
    assert sorted(p.name for p in tmp_path.glob("runs*.jsonl")) == ["runs.shard-0-of-2.jsonl",
                                                                  "runs.shard-1-of-2.jsonl"]
    calls.clear()
    Bench(profile, EXPS, tmp_path, profile.tasks, seeds=2).run(say=lambda _: None)  # nothing left to do
    assert calls == []
    log = tmp_path / "runs.shard-1-of-2.jsonl"  # an interrupted shard: its last run never finished
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:-1]))
    Bench(profile, EXPS, tmp_path, profile.tasks, seeds=2, shard=(1, 2)).run(say=lambda _: None)
    assert len(calls) == 1


def test_a_folder_never_mixes_budgets_or_changed_experiments(tiny_profile, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run_one", _fake_run([]))
    Bench(tiny_profile, EXPS[:1], tmp_path, tiny_profile.tasks, seeds=1).run(say=lambda _: None)
    longer = dataclasses.replace(tiny_profile, steps=tiny_profile.steps + 1)
    with pytest.raises(ValueError, match=r"other settings \(steps\); use another --out"):
        Bench(longer, EXPS[:1], tmp_path, tiny_profile.tasks, seeds=1).run()
    changed = [Experiment("lora", "lora", {"r": 4})]
    with pytest.raises(ValueError, match="experiment 'lora' changed since its runs"):
        Bench(tiny_profile, changed, tmp_path, tiny_profile.tasks, seeds=1).run()
    with pytest.raises(ValueError, match="needs an lr_grid.*grids for"):
        Bench(tiny_profile, [Experiment("sl", "sltrain")], tmp_path, tiny_profile.tasks, seeds=1)


def test_a_failing_method_is_recorded_not_fatal(tiny_profile, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(runner, "run_one", broken)
    Bench(tiny_profile, EXPS[:1], tmp_path, tiny_profile.tasks, seeds=2).run(say=lambda _: None)
    rows = read_rows(tmp_path)
    assert [(r["status"], r["error"]) for r in rows] == [("failed", "RuntimeError: boom")] * 2  # no seeds follow


@needs_assets
def test_one_real_run_measures_what_the_report_needs(tiny_profile, tmp_path):
    """A real (tiny) run: the step count, the tokens seen, sizes and counts match the setup."""
    from rankwise.bench import run_one

    task = tiny_profile.tasks[0]
    row = run_one(tiny_profile, task, Experiment("lora", "lora", {"r": 2}), 1e-2, seed=0, device="cpu")
    assert row["steps"] == tiny_profile.steps and len(row["loss_curve"]) == tiny_profile.steps
    assert 0 < row["tokens"] <= tiny_profile.tokens_per_run()
    assert 0.0 <= row["val_metric"] <= 1.0 and 0.0 <= row["test_metric"] <= 1.0
    # tiny BERT, hidden 32, 2 layers, every linear adapted at r=2 (q, k, v, o: 32x32; up 64x32; down 32x64;
    # the pooler 32x32), the 5-class head trained
    lora = 2 * (4 * 2 * (32 + 32) + 2 * 2 * (32 + 64)) + 2 * (32 + 32)
    assert row["trained_params"] == row["trainable_params"] == lora + 32 * 5 + 5
    assert row["updates_per_param"] == pytest.approx(tiny_profile.steps)
    assert row["saved_bytes"] > 4 * lora
    # one more step's exact tensor peak: at least the fp32 weights + trained gradients + AdamW's two moments
    assert row["tensor_peak_bytes"] > 4 * row["total_params"] + 3 * 4 * row["trainable_params"]
    json.dumps(row)


def test_a_grown_grid_reuses_the_runs_at_the_lrs_it_keeps(tiny_profile, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(runner, "run_one", _fake_run(calls))
    Bench(tiny_profile, EXPS[:1], tmp_path, tiny_profile.tasks, seeds=2).run(say=lambda _: None)
    assert calls == [("bbc", "lora", 1e-3, 0), ("bbc", "lora", 1e-2, 0), ("bbc", "lora", 1e-3, 1)]
    calls.clear()
    wider = dataclasses.replace(tiny_profile, lr_grids={**tiny_profile.lr_grids, "adapter": (1e-4, 1e-3)})
    Bench(wider, EXPS[:1], tmp_path, wider.tasks, seeds=2).run(say=lambda _: None)
    assert calls == [("bbc", "lora", 1e-4, 0)]  # 1e-3 stays the best on validation: its seeds are reused
    assert json.loads((tmp_path / "bench.json").read_text())["profile"]["lr_grids"]["adapter"] == [1e-4, 1e-3]


@pytest.mark.parametrize(("peak", "extensions"), [(1e-1, [1e-1, 1.0]), (1e2, [1e-1, 1.0]), (3e-2, [1e-1]),
                                                  (1e-5, [1e-5, 1e-6]), (2e-3, [])])
def test_the_grid_grows_past_its_edge_while_the_best_lies_there(tiny_profile, tmp_path, monkeypatch, peak,
                                                                extensions):
    """Grid 1e-4, 1e-3, 1e-2 (ratio 10), at most 2 extensions: a validation optimum beyond the top (or bottom)
    adds 1e-1, then 1 (1e-5, then 1e-6) until the best is inside the grid or the extensions are used up; the
    seeds run at the best of the grown grid and the report chooses the same lr."""
    import math

    from rankwise.bench.summary import summarise

    calls: list = []

    def run_one(profile, task, exp, lr, seed, device="auto"):
        calls.append((lr, seed))
        val = -abs(math.log10(lr) - math.log10(peak))
        return {"val_metric": val, "test_metric": val, "loss_curve": [1.0]}

    monkeypatch.setattr(runner, "run_one", run_one)
    profile = dataclasses.replace(tiny_profile, lr_grids={"adapter": (1e-4, 1e-3, 1e-2)}, lr_extend=2)
    Bench(profile, EXPS[:1], tmp_path, profile.tasks, seeds=2).run(say=lambda _: None)
    swept = [lr for lr, seed in calls if seed == 0]
    assert swept == [1e-4, 1e-3, 1e-2, *extensions]
    grid = sorted([1e-4, 1e-3, 1e-2, *extensions])
    best = max(grid, key=lambda lr: -abs(math.log10(lr) - math.log10(peak)))
    assert [lr for lr, seed in calls if seed == 1] == [best]
    entry = summarise(read_rows(tmp_path), {"bbc": True}, {"adapter": [1e-4, 1e-3, 1e-2]}, extend=2)[0]
    assert entry["lr"] == best and entry["sweep_done"] == f"{len(grid)}/{len(grid)}"
    assert entry["lr_at_grid_edge"] == (best in (grid[0], grid[-1]))


def test_a_tie_at_the_edge_does_not_grow_the_grid(tiny_profile, tmp_path, monkeypatch):
    """A flat validation curve (every run predicting the majority class, say) picks the first lr of the grid,
    but says nothing about the lrs beyond it: no extension."""
    calls: list = []

    def run_one(profile, task, exp, lr, seed, device="auto"):
        calls.append((lr, seed))
        return {"val_metric": 0.5 if lr < 1e-2 else 0.4, "test_metric": 0.5, "loss_curve": [1.0]}

    monkeypatch.setattr(runner, "run_one", run_one)
    profile = dataclasses.replace(tiny_profile, lr_grids={"adapter": (1e-4, 1e-3, 1e-2)}, lr_extend=2)
    Bench(profile, EXPS[:1], tmp_path, profile.tasks, seeds=2).run(say=lambda _: None)
    assert calls == [(1e-4, 0), (1e-3, 0), (1e-2, 0), (1e-4, 1)]

