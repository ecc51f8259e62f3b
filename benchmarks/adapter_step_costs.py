"""Training-step cost of every adapter method, relative to LoRA, in the bench's cpu-smoke setting.

MiniLM-L6 on BBC News, batch 8 x 64, each method with the options the ``cpu-smoke`` profile gives it (r = 8 where
it has a rank), trained through ``rankwise.train`` with its controllers, like a bench run. Each method is built
and stepped in turn (one model in memory at a time), so the clock is the CPU time of the timing thread
(``time.thread_time``, one torch thread): other jobs on the machine move it far less than wall time. LoRA is
measured at the start, the middle and the end; each method's ratio is against the median of those. The first
``--warmup`` steps are not timed (lazy state, first-step projections); the median of the next ``--steps``.

    python benchmarks/adapter_step_costs.py          # writes benchmarks/results/adapter_step_costs.{json,md}
    python benchmarks/adapter_step_costs.py --only pst,dota --merge   # re-measure some, keep the other rows

With ``--merge`` the rows of the methods not measured are kept from the existing results; every row keeps the
LoRA time it was measured against (``lora_ref_s``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from rankwise.bench.profiles import PROFILES, builtin_experiments
from rankwise.bench.runner import _build, _prepare
from rankwise.memory import count_params
from rankwise.models import quiet_transformers
from rankwise.train import TrainConfig, train

RESULTS = Path(__file__).parent / "results"


class StepClock:
    """CPU seconds of the timing thread per optimizer step (loop callback); stops the run after ``stop`` steps."""

    def __init__(self, stop: int) -> None:
        self.steps: list[float] = []
        self.stop = stop
        self._t = 0.0

    def on_train_begin(self, state) -> None:  # type: ignore[no-untyped-def]
        self._t = time.thread_time()

    def on_step_end(self, state) -> None:  # type: ignore[no-untyped-def]
        now = time.thread_time()
        self.steps.append(now - self._t)
        self._t = now
        state.should_stop = state.should_stop or len(self.steps) >= self.stop


def step_cost(exp, warmup: int, steps: int) -> dict:
    """Median CPU seconds of ``steps`` timed training steps of experiment ``exp`` (after ``warmup``)."""
    profile = PROFILES["cpu-smoke"]
    task = profile.tasks[0]
    model, _, splits = _build(task, profile, seed=0)
    _prepare(model, exp, splits, seed=0)
    clock = StepClock(warmup + steps)
    # the run is planned at the profile's length (schedules such as IncreLoRA's growth rounds must fit it) and
    # stopped once the timed steps are taken
    cfg = TrainConfig(lr=1e-4, max_steps=max(profile.steps, warmup + steps), schedule="constant",
                      optimizer=exp.optimizer,
                      optimizer_kwargs=dict(exp.optimizer_options), seed=0, device="cpu", progress=False,
                      measure_memory=False)
    try:
        train(model, splits.train, None, cfg, callbacks=[clock], val_loader=splits.val)
    except RuntimeError as exc:  # a controller that refuses a run stopped so early (ElaLoRA) took its steps
        if len(clock.steps) < warmup + steps:
            raise
        print(f"  {exp.name}: {exc}"[:160])
    timed = clock.steps[warmup:]
    return {"median_s": statistics.median(timed), "min_s": min(timed), "max_s": max(timed),
            "trainable_params": count_params(model)[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated experiment names [default: every adapter of cpu-smoke]")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "adapter_step_costs"))
    ap.add_argument("--merge", action="store_true", help="keep the existing rows of the methods not measured")
    args = ap.parse_args()
    torch.set_num_threads(1)
    quiet_transformers()
    experiments = {e.name: e for e in builtin_experiments("cpu-smoke") if e.kind == "adapter"}
    names = args.only.split(",") if args.only else [n for n in experiments if n != "lora"]
    rows, lora = {}, []
    half = len(names) // 2
    for i, name in enumerate(["lora", *names[:half], "lora", *names[half:], "lora"]):
        t0 = time.perf_counter()
        try:
            row = step_cost(experiments[name], args.warmup, args.steps)
        except Exception as exc:  # noqa: BLE001  (a method that fails here is reported, the rest still run)
            row = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"[{i + 1}/{len(names) + 3}] {name}: {row.get('median_s', row.get('error'))} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if name == "lora" and "median_s" in row:
            lora.append(row["median_s"])
        else:
            rows[name] = row
    ref = statistics.median(lora)
    for row in rows.values():
        if "median_s" in row:
            row["vs_lora"], row["lora_ref_s"] = row["median_s"] / ref, ref
    out = Path(args.out)
    if args.merge and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())["methods"]
        rows = {**{k: v for k, v in old.items() if k not in rows}, **rows}
    env = {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
           "lora_runs_s": lora, "warmup": args.warmup, "steps": args.steps}
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "lora_median_s": ref, "methods": rows},
                                                   indent=1))
    ordered = sorted(rows.items(), key=lambda kv: -kv[1].get("vs_lora", float("inf")))
    lines = [
        "# Training-step cost of every adapter method against LoRA (cpu-smoke setting)", "",
        f"MiniLM-L6 on BBC News, batch 8 x 64, the cpu-smoke options of each method; median CPU time of the "
        f"timing thread over {args.steps} steps after {args.warmup} warm-up steps, torch {torch.__version__}, "
        f"1 thread. LoRA (r = 8): {ref * 1e3:.0f} ms per step (runs at the start, middle and end: "
        f"{', '.join(f'{t * 1e3:.0f}' for t in lora)} ms); each ratio is against the LoRA time of its own "
        "run (rows kept by --merge come from earlier runs).", "",
        "| method | ms / step | vs LoRA | trainable params |", "|---|---|---|---|",
    ]
    for name, row in ordered:
        if "median_s" in row:
            lines.append(f"| {name} | {row['median_s'] * 1e3:.0f} | {row['vs_lora']:.2f} | "
                         f"{row['trainable_params']:,} |")
        else:
            lines.append(f"| {name} | failed: {row['error']} | | |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.{{json,md}}")


if __name__ == "__main__":
    main()
