"""DDP: the optimizers on 2 CPU processes (gloo) reach the same parameters as 1 process on the same
global batch.

BAdam / LISA / OwLore flip ``requires_grad`` while training, so (as torch documents for parameters
that receive no gradient) the model is wrapped with ``DistributedDataParallel(...,
find_unused_parameters=True)``, *before* the optimizer is built: DDP's reducer only covers the
parameters that require grad when it is constructed. The samplers are seeded identically on every
rank, so all ranks wake the same blocks.

The models are float64: in float32 the all-reduced gradient differs from the one-process gradient by
rounding (~1e-9), and Adam's first step after a block wakes up, ≈ lr·sign(g), turns that into
~1e-4..1e-2 differences on coordinates whose gradient is ~0; in float64 the runs agree to ~1e-14.
"""

from __future__ import annotations

from pathlib import Path

import torch

import rankwise.optim as rwo

from ..launch import torchrun
from .ddp_worker import make_batches, make_model, make_optimizer, train

STEPS = 6
ENGINE = ["galore", "fira", "apollo"]


def methods() -> list[str]:
    names = ["badam", "lisa", "owlore"]
    if hasattr(rwo, "make"):  # the projected engine, once it exists
        names += ENGINE
    return names


def test_ddp_two_processes_match_one_process(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    names = methods()
    torchrun(worker, "ddp", "--dir", str(tmp_path), "--methods", ",".join(names), "--steps", str(STEPS),
             timeout=600, scratch=tmp_path)
    for method in names:
        model = make_model(dtype=torch.float64)
        train(model, make_optimizer(method, model), make_batches(STEPS, batch=4))
        distributed = torch.load(tmp_path / f"{method}_ddp.pt", weights_only=True)
        start = make_model(dtype=torch.float64)
        moved = 0
        for (name, p), p0 in zip(model.named_parameters(), start.parameters(), strict=True):
            assert torch.allclose(distributed[name], p.detach(), atol=1e-6, rtol=0), (method, name)
            moved += not torch.equal(p.detach(), p0.detach())
        assert moved > 0, method  # the comparison is not between two untrained models
