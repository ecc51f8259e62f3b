"""transformers ``Trainer`` (``RankwiseTrainer``) with a rankwise optimizer, one process or under
``accelerate launch --config_file configs/accelerate_fsdp2.yaml`` (FSDP2, 2 CPU processes).

``python tests/distributed/trainer_worker.py OUT METHOD`` trains the float64 tiny Llama of
``fsdp_worker`` for 4 steps on 16 fixed sequences (global batch 4, no shuffling) with
``RankwiseTrainer(optimizer=METHOD)`` and writes the full final weights to ``OUT/weights.pt``
(rank 0) and ``OUT/info.json`` (FSDP version seen, parameter type).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.fsdp_worker import full_weights, make_batches, make_model  # noqa: E402

OPTIONS = {"galore": {"rank": 4, "update_gap": 2}, "apollo": {"rank": 4, "update_gap": 2},
           "badam": {"switch_every": 2, "order": "ascending"}}


class _Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        batches = make_batches(4)
        self.rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(4)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def main() -> None:
    import torch.distributed as dist
    from transformers import TrainingArguments

    from rankwise.hf_trainer import RankwiseTrainer

    out, method = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    import os

    world = int(os.environ.get("WORLD_SIZE", world))
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=4 // world, max_steps=4,
        learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_drop_last=True, disable_tqdm=True,
    )
    trainer = RankwiseTrainer(model=make_model(), args=args, train_dataset=_Rows(), optimizer=method,
                              optimizer_options=OPTIONS.get(method, {}))
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    model = trainer.model
    weights = full_weights(model)
    fsdp = type(model).__name__
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(weights, out / "weights.pt")
        from rankwise.optim.sharding import is_dtensor

        p = next(model.parameters())
        (out / "info.json").write_text(json.dumps({
            "model_type": fsdp, "dtensor": is_dtensor(p), "world": world, "fsdp": bool(trainer.is_fsdp_enabled),
            "distributed_type": str(trainer.accelerator.distributed_type),
            "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        }))


if __name__ == "__main__":
    main()
