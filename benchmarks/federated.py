"""Federated LoRA on MiniLM-L6 + BBC News (issue 14): FedAvg of LoRA, FFA-LoRA, Fed-SB and FedSVD with 4 and
8 clients, against centralized LoRA at the same total number of optimizer steps.

Small on purpose (a busy 2-core CPU: the 17 arms took about 15 CPU-minutes, 5,500 s of wall time on a
machine running a dozen other jobs, as two processes ``--clients 4`` / ``--clients 8``): 48-token inputs,
batch 8, ``--steps`` client steps in all (default 96; centralized LoRA takes the same 96 steps on the
whole training split). A federated run
has ``--rounds`` rounds (default 3), so each client takes steps / (rounds · clients) local steps per round
(8 with 4 clients, 4 with 8). Clients hold disjoint shards of the training split: IID, and label-skewed
(Dirichlet α = ``--skew`` per class, 0.5 by default). Every arm: the same seed, random head, AdamW at a
constant ``--lr``, test accuracy on the whole BBC test split (445 articles). Each federated arm also
records, per round, the relative aggregation error ‖ΔW_global − mean ΔW_client‖_F / ‖mean ΔW_client‖_F
summed over the adapted layers: zero where a paper says aggregation is exact.

Rows are appended to ``results/federated/runs.jsonl`` (an interrupted run resumes at the next arm);
``--report`` writes ``results/federated/report.md``.

    python benchmarks/federated.py            # every arm, then the report
    python benchmarks/federated.py --report
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import torch

import rankwise as rw
from rankwise.data import classification_loader, load_classification
from rankwise.federated import FederatedConfig, Federation, shard_dataset
from rankwise.models import load_model, quiet_transformers
from rankwise.report import Column, append_run, markdown_table, read_runs, write_text
from rankwise.train import TrainConfig, evaluate, train

OUT = Path(__file__).parent / "results" / "federated"
METHODS = ("fedavg", "ffa_lora", "fed_sb", "fedsvd")
#: Fed-SB trains an r×r core: a larger r than LoRA's at far fewer uploaded numbers (the paper's setting).
RANK = {"fed_sb": 24}


def arms(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = [{"arm": "centralized lora", "method": "lora", "clients": 1, "partition": "-"}]
    for partition in ("iid", "skew"):  # the IID arms first: the skewed ones are the extra study
        for clients in args.clients:
            out += [{"arm": f"{m} {clients}c {partition}", "method": m, "clients": clients, "partition": partition}
                    for m in METHODS]
    return out


def _delta(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: layer.delta_weight().detach().double() for n, layer in rw.adapter_layers(model)}


def aggregation_error(fed: Federation, uploads: list[dict[str, torch.Tensor]]) -> float:
    """‖ΔW_global − mean_i ΔW_i‖_F / ‖mean_i ΔW_i‖_F over all adapted layers, for the round just run."""
    mean: dict[str, torch.Tensor] = {}
    for upload in uploads:
        fed.load(fed.global_state)
        fed.load(upload)
        for n, d in _delta(fed.model).items():
            mean[n] = mean.get(n, 0) + d / len(uploads)
    fed.aggregate(uploads)
    glob = _delta(fed.model)
    num = sum(float((glob[n] - mean[n]).pow(2).sum()) for n in mean)
    den = sum(float(mean[n].pow(2).sum()) for n in mean)
    return (num / den) ** 0.5


def run_arm(arm: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model, tok = load_model("minilm-l6", task="seq-cls", num_labels=5)
    train_ds = load_classification("bbc", "train", seed=0)
    test = classification_loader(load_classification("bbc", "test", seed=0), tok, 64, args.max_length,
                                 shuffle=False)
    t0 = time.perf_counter()
    row: dict[str, Any] = {**arm, "steps": args.steps, "seed": args.seed, "lr": args.lr}
    if arm["method"] == "lora":
        rw.adapt(model, "lora", r=args.r)
        loader = classification_loader(train_ds, tok, args.batch_size, args.max_length, seed=args.seed)
        cfg = TrainConfig(lr=args.lr, max_steps=args.steps, schedule="constant", seed=args.seed, device="cpu",
                          progress=False, measure_memory=False)
        train(model, loader, None, cfg)
        row.update(rounds=None, local_steps=args.steps, r=args.r, upload_floats=None, errors=[])
    else:
        skew = args.skew if arm["partition"] == "skew" else None
        shards = shard_dataset(train_ds, arm["clients"], seed=args.seed, skew=skew)
        loaders = [classification_loader(s, tok, args.batch_size, args.max_length, seed=args.seed + k)
                   for k, s in enumerate(shards)]
        local = args.steps // (args.rounds * arm["clients"])
        cfg = FederatedConfig(rounds=args.rounds, local_steps=local, r=RANK.get(arm["method"], args.r), lr=args.lr,
                              seed=args.seed, device="cpu", progress=False)
        fed = Federation(model, arm["method"], loaders, cfg)
        errors = []
        for rnd in range(args.rounds):
            errors.append(aggregation_error(fed, fed.local_round()))
            print(f"  {arm['arm']}: round {rnd + 1}/{args.rounds} client loss "
                  f"{sum(fed.client_losses) / len(fed.client_losses):.3f} aggregation error {errors[-1]:.2e} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        row.update(rounds=args.rounds, local_steps=local, r=cfg.r, upload_floats=fed.floats(fed.uploaded),
                   download_floats=fed.floats(fed.broadcast), errors=errors,
                   shard_sizes=[len(s) for s in shards])
    row.update(evaluate(model, test))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row



def run(args: argparse.Namespace) -> None:
    quiet_transformers()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs.jsonl"
    for arm in arms(args):
        if arm["arm"] in {r["arm"] for r in read_runs(runs)}:  # re-read: several processes may share runs.jsonl
            continue
        print(f"{arm['arm']} ...", flush=True)
        row = run_arm(arm, args)
        row["environment"] = {"torch": torch.__version__, "threads": args.threads,
                              "python": platform.python_version(), "machine": platform.machine()}
        append_run(runs, row)
        print(f"{arm['arm']:<24} accuracy {row['accuracy']:.4f} ({row['seconds']:.0f} s)", flush=True)


def report(out: Path) -> str:
    order = {m: i for i, m in enumerate(("lora", *METHODS))}
    rows = sorted(read_runs(out / "runs.jsonl"), key=lambda r: (r["partition"], r["clients"], order[r["method"]]))
    for r in rows:
        r["max_error"] = max(r["errors"]) if r["errors"] else None
    columns = [Column("arm", "arm", align="<"), Column("clients", "clients"),
               Column("local_steps", "local steps"), Column("r", "r", lambda v: "8" if v is None else str(v)),
               Column("accuracy", "test accuracy", lambda v: f"{v:.4f}"),
               Column("max_error", "max aggregation error", lambda v: "-" if v is None else f"{v:.1e}"),
               Column("upload_floats", "upload / client / round", lambda v: "-" if v is None else f"{v:,}"),
               Column("seconds", "seconds", lambda v: f"{v:.0f}")]
    text = "\n".join([
        "# Federated LoRA on MiniLM-L6 + BBC News", "",
        f"{rows[0]['steps'] if rows else '?'} client optimizer steps in all per arm (centralized: the same steps on "
        "the whole split), batch 8, 48 tokens, AdamW at a constant lr, one seed; test accuracy on the 445 test "
        "articles. Aggregation error: ‖ΔW_global − mean ΔW_client‖_F / ‖mean ΔW_client‖_F, the largest over "
        "the rounds. Upload counts include the classification head (1,925 floats).", "",
        markdown_table(rows, columns), "",
    ])
    write_text(out / "report.md", text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=96, help="client optimizer steps in all per arm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, nargs="+", default=[4, 8],
                   help="client counts (one process per count may run beside another: rows are appended)")
    p.add_argument("--skew", type=float, default=0.5, help="Dirichlet α of the label-skewed partition")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: an oversubscribed machine runs 2 slower)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--report", action="store_true", help="only write the report from runs.jsonl")
    args = p.parse_args()
    if not args.report:
        run(args)
    print(report(Path(args.out)))


if __name__ == "__main__":
    main()
