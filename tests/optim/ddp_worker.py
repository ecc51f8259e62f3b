"""Helper process for the optimizer tests (run as a script; the tests also import its builders).

``python tests/optim/ddp_worker.py resume --dir D --methods badam,lisa --steps 5``: for each method, build a
fresh model and optimizer, load ``D/<method>.pt`` (model + optimizer state, read with
``weights_only=True``), train on the last ``steps`` batches of the shared sequence, save the final
parameters to ``D/<method>_final.pt``.

``torchrun --standalone --nproc_per_node 2 tests/optim/ddp_worker.py ddp --dir D --methods ... --steps N``:
each rank wraps a float64 model in DDP (gloo, CPU) and trains on its half of every global batch;
rank 0 saves the final parameters to ``D/<method>_ddp.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rankwise.optim as rwo

VOCAB = 100
N_LAYERS = 4
# the sampling optimizers change requires_grad while training: DDP needs find_unused_parameters
SAMPLING = ("badam", "lisa", "owlore")


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def make_batches(n: int, batch: int = 4, seq: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def make_optimizer(method: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizers the resume and DDP tests run (K=2, so blocks switch several times)."""
    if method == "badam":
        return rwo.BAdam(model, lr=1e-2, switch_every=2, order="random", seed=3)
    if method == "lisa":
        return rwo.LISA(model, lr=1e-2, n_layers=2, switch_every=2, seed=3)
    if method == "owlore":
        return rwo.OwLore(
            model, lr=1e-2, rank=4, n_layers=2, switch_every=2, update_gap=3,
            ratios=[0.1, 0.2, 0.3, 0.4], seed=3,
        )
    if method in rwo.factory.SAMPLERS:  # any other catalogued sampler, with its defaults
        return rwo.make(method, model, lr=1e-2)
    return rwo.make(method, model, rank=4, lr=1e-2)  # the projected engine (GaLore, Fira, APOLLO, ...)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict]) -> None:
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def resume(args: argparse.Namespace) -> None:
    for method in args.methods.split(","):
        ckpt = torch.load(Path(args.dir) / f"{method}.pt", weights_only=True)
        model = make_model(seed=1)  # a different init: everything must come from the checkpoint
        model.load_state_dict(ckpt["model"])
        optimizer = make_optimizer(method, model)
        optimizer.load_state_dict(ckpt["optimizer"])
        batches = make_batches(args.total)[args.total - args.steps :]
        train(model, optimizer, batches)
        torch.save(params_of(model), Path(args.dir) / f"{method}_final.pt")


def ddp(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for method in args.methods.split(","):
        model = make_model(dtype=torch.float64)  # see tests/optim/test_ddp.py for why float64
        # DDP first, while every parameter still requires grad: its reducer only covers the
        # parameters that require grad at construction.
        wrapped = DistributedDataParallel(model, find_unused_parameters=method in SAMPLING)
        optimizer = make_optimizer(method, wrapped)
        for batch in make_batches(args.steps, batch=2 * world):
            local = {k: v.chunk(world)[rank] for k, v in batch.items()}
            wrapped(**local).loss.backward()
            if method in SAMPLING:  # DDP materializes no gradient for the sleeping parameters
                assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
            optimizer.step()
            optimizer.zero_grad()
        if rank == 0:
            torch.save(params_of(model), Path(args.dir) / f"{method}_ddp.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["resume", "ddp"])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--methods", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--total", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    # resume: the test process's thread count, so that results can match bit for bit
    torch.set_num_threads(args.threads)
    (ddp if args.mode == "ddp" else resume)(args)


if __name__ == "__main__":
    main()
