"""``rankwise federate``: federated LoRA fine-tuning of a packaged (or local) classifier, simulated in one
process (``rw.federate``): the training split in disjoint client shards, the test split for accuracy."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import Formatter, UsageError, add_flag, check_model_name, check_writable

DESCRIPTION = """\
Simulate federated fine-tuning with rw.federate: the training split of --data is cut into
--clients disjoint shards (IID, or label-skewed with --skew); every round each client
trains --local-steps steps from the global adapter and the server aggregates with the
method's rule. Prints one line per round and the final test accuracy as JSON; --output
also writes report.json and saves the global adapter (rw.save_adapter) there."""
EPILOG = """\
examples:
  rankwise federate --method ffa_lora --clients 4
  rankwise federate --method fedsvd --clients 8 --rounds 5 --local-steps 4 --skew 0.5
  rankwise federate --method fed_sb --rank 24 --lr 2e-3 --output runs/fed_sb"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``federate`` to the ``rankwise`` subcommands."""
    from ..federated import METHODS

    p = subparsers.add_parser("federate", help="federated LoRA fine-tuning simulated in one process",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=Formatter)
    add_flag(p, "method", f"federated method: {', '.join(METHODS)} (required)", required=True, choices=METHODS)
    add_flag(p, "model", "packaged model name or local HF directory [default: minilm-l6]", default="minilm-l6")
    p.add_argument("--data", default="bbc", choices=["bbc", "drug-reviews"], help="dataset [default: bbc]")
    p.add_argument("--clients", type=int, default=4, metavar="N", help="number of clients [default: 4]")
    p.add_argument("--rounds", type=int, default=5, metavar="N", help="communication rounds [default: 5]")
    p.add_argument("--local-steps", type=int, default=8, metavar="N",
                   help="optimizer steps per client per round [default: 8]")
    p.add_argument("--skew", type=float, default=None, metavar="ALPHA",
                   help="label-skewed shards: Dirichlet concentration per class (smaller = more skew) "
                        "[default: IID shards]")
    add_flag(p, "rank", "adapter rank r [default: 8]", default=8)
    add_flag(p, "lr", "clients' learning rate (AdamW, constant) [default: 2e-3]", default=2e-3)
    add_flag(p, "batch_size", "batch size [default: 8]", default=8)
    add_flag(p, "max_length", "tokens per example [default: 64]", default=64)
    p.add_argument("--train-limit", type=int, default=None, metavar="N",
                   help="training examples shared out to the clients (a seeded subset) [default: all]")
    p.add_argument("--test-limit", type=int, default=None, metavar="N", help="test examples [default: all]")
    add_flag(p, "seed", "seed of the shards, batch order, head and adapter init [default: 0]", default=0)
    add_flag(p, "device", "auto, cpu, cuda or cuda:N [default: auto]", default="auto")
    add_flag(p, "output", "directory for report.json and the global adapter [default: none]")
    add_flag(p, "progress", "no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import classification_loader, load_classification
    from ..federated import FederatedConfig, Federation, shard_dataset
    from ..models import load_model

    check_model_name(args.model)
    if args.output:
        check_writable(args.output)
    cfg = FederatedConfig(rounds=args.rounds, local_steps=args.local_steps, r=args.rank, lr=args.lr, seed=args.seed,
                          device=args.device, progress=args.progress)
    train_ds = load_classification(args.data, "train", seed=args.seed, limit=args.train_limit)
    shards = shard_dataset(train_ds, args.clients, seed=args.seed, skew=args.skew)
    torch.manual_seed(args.seed)  # the new classification head
    model, tok = load_model(args.model, task="seq-cls", num_labels=train_ds.num_labels)
    if args.max_length > model.config.max_position_embeddings:
        raise UsageError(f"--max-length {args.max_length} is more than the {model.config.max_position_embeddings} "
                         "positions of this model")
    loaders = [classification_loader(s, tok, args.batch_size, args.max_length, seed=args.seed + k)
               for k, s in enumerate(shards)]
    test = classification_loader(load_classification(args.data, "test", seed=args.seed, limit=args.test_limit), tok,
                                 max(32, args.batch_size), args.max_length, shuffle=False)

    def show(record: dict[str, float]) -> None:
        print(f"round {record['round']}/{args.rounds}: client loss {record['client_loss']:.4f}", flush=True)

    result = Federation(model, args.method, loaders, cfg).run(test, show)
    report = {**result.to_dict(), "model": args.model, "data": args.data, "skew": args.skew,
              "shard_sizes": [len(s) for s in shards]}
    print(json.dumps({k: report[k] for k in ("method", "clients", "metrics", "upload_floats", "download_floats")}))
    if args.output:
        from ..io import atomic_file, save_adapter

        save_adapter(model, args.output)
        with atomic_file(f"{args.output}/report.json") as f:
            f.write(json.dumps(report, indent=1) + "\n")
    return 0
