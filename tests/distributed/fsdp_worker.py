"""Two-process FSDP2 harness for the optimizer tests (run by ``torchrun``; the tests import its builders).

``torchrun --standalone --nproc_per_node 2 tests/distributed/fsdp_worker.py parity --dir D --specs S.json``:
for every spec ``{"tag", "method", "kwargs", "steps"}`` in ``S.json`` each rank builds the same
float64 tiny Llama, shards it with ``fully_shard`` per decoder layer and at the root on
``init_device_mesh("cpu", (2,))``, builds ``rankwise.optim.make(method, model, **kwargs)`` and
trains ``steps`` steps on its half of every global batch; rank 0 saves the gathered full weights
to ``D/<tag>.pt`` and the optimizer's ``svd_fallbacks`` to ``D/<tag>.json``. :func:`one_process` is
the reference run on the whole batches.

``... fsdp_worker.py dcp-save --dir D --specs S.json --split k``: train ``k`` steps and save model
and optimizer with ``torch.distributed.checkpoint`` (``get_state_dict``: parameter-name keys) to
``D/<tag>_ckpt``, then continue to ``steps`` and save the final weights to ``D/<tag>_straight.pt``.
``... fsdp_worker.py dcp-load ...``: fresh processes and a differently initialised model load
``D/<tag>_ckpt`` (``set_state_dict``) and train steps ``k..steps``; final weights to
``D/<tag>_resumed.pt``.

``... fsdp_worker.py reshape ...``: ``rankwise.train`` of IncreLoRA / Cuttlefish (ranks change while
training) straight, and stopped after the change and resumed from its DCP checkpoint
(:func:`reshape_resume`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rankwise.optim as rwo
from rankwise.optim import checkpoint
from rankwise.optim.sharding import CollectiveLog, full, local_state_bytes

if __package__ in (None, ""):  # run as a script by torchrun: make the tests package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.optim.ddp_worker import VOCAB, make_batches  # noqa: E402  (the DDP tests' batches)

N_LAYERS = 2


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64, **config: Any) -> LlamaForCausalLM:
    """The 2-layer tiny Llama (float64: float32 rounding of the sharded reductions would hide ~1e-6
    differences behind Adam's ≈ lr·sign(g) first steps); ``config``: other ``LlamaConfig`` settings."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **config,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def make_optimizer(method: str, model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """``rw.optim.make(method, model, **kwargs)``; ``"layerwise:<name>"``: the layer-wise mode, one
    ``make(name, [group])`` per parameter of ``param_groups(model, rank=...)`` stepped in backward."""
    if method.startswith("layerwise:"):
        name, kw = method.split(":", 1)[1], dict(kwargs)
        groups = rwo.param_groups(model, rank=kw.pop("rank"))
        return rwo.layerwise(groups, lambda g: rwo.make(name, g, **kw))
    return rwo.make(method, model, **kwargs)


def train(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
    rank: int = 0, world: int = 1, log: CollectiveLog | None = None,
) -> None:
    """One step per batch; with ``world`` > 1 each rank takes its ``rank``-th slice of the batch;
    ``log`` records the collectives of the optimizer steps (not FSDP2's forward / backward)."""
    for batch in batches:
        local = {k: v.chunk(world)[rank] for k, v in batch.items()}
        model(**local).loss.backward()
        with log or contextlib.nullcontext():
            optimizer.step()
        optimizer.zero_grad()


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> full (gathered) weight, detached."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out


def one_process(
    method: str, kwargs: dict[str, Any], steps: int
) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    """The reference: the same model, optimizer and global batches in this process; returns the final
    weights and the optimizer (to check that a refresh / block switch happened)."""
    model = make_model()
    optimizer = make_optimizer(method, model, kwargs)
    train(model, optimizer, make_batches(steps))
    return full_weights(model), optimizer


def structured_model(kind: str, method: str, kwargs: dict[str, Any], seed: int = 0,
                     **config: Any) -> torch.nn.Module:
    """The tiny Llama with ``rw.adapt(model, method, **kwargs)`` (``kind="adapt"``; a method whose
    init needs gradients gets 2 batches as ``init_data``) or ``rw.sparsify`` (``kind="sparsify"``),
    then cast to float64 (adapters are created fp32; the comparison needs float64 everywhere); ``config``:
    other ``LlamaConfig`` settings."""
    import rankwise as rw

    model = make_model(seed, **config)
    if kind == "adapt":
        spec = rw.get_method(method)
        needs = spec.layer_cls.needs_grad(spec.make_config(**{k: v for k, v in kwargs.items() if k != "targets"}))
        rw.adapt(model, method, init_data=make_batches(2, seed=5) if needs else None, **kwargs)
    else:
        rw.sparsify(model, method, **kwargs)
    return model.to(torch.float64)


def structured_one_process(kind: str, method: str, kwargs: dict[str, Any], steps: int) -> dict[str, torch.Tensor]:
    """Reference for the adapter / structured-layer parity: AdamW on the trainable parameters."""
    model = structured_model(kind, method, kwargs)
    train(model, _adamw(model), make_batches(steps))
    return full_weights(model)


#: The structured controllers of ``rw.sparsify`` that ``controlled_run`` builds (``relora_warm``: ReLoRAWarmStart on the
#: dense model): name -> (the ``rw.sparsify`` method, or None for none).
SPARSE_CONTROLLERS = {"cuttlefish": "cuttlefish", "relora": "relora", "relora_warm": None, "sst": "sst", "trp": "trp",
                      "maestro": "maestro", "slope": "slope", "lte": "lte", "refactor_reset": "refactor_reset"}


def sparse_controller(method: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      kwargs: dict[str, Any], steps: int) -> Any:
    """The structured controller ``method`` on ``model`` and ``optimizer`` with options ``kwargs``."""
    from rankwise import sparse

    build = {"cuttlefish": lambda: sparse.Cuttlefish(model, optimizer, **kwargs),
             "relora": lambda: sparse.ReLoRA(model, optimizer, **kwargs),
             "relora_warm": lambda: sparse.ReLoRAWarmStart(model, optimizer, steps, **kwargs),
             "sst": lambda: sparse.SST(model, optimizer, **kwargs),
             "trp": lambda: sparse.TRP(model, **kwargs),
             "maestro": lambda: sparse.Maestro(model, **kwargs),
             "slope": lambda: sparse.SLoPe(model, steps, optimizer, **kwargs),
             "lte": lambda: sparse.LTE(model, **kwargs),
             "refactor_reset": lambda: sparse.RefactorReset(model, optimizer, **kwargs)}
    return build[method]()


def controlled_run(method: str, kwargs: dict[str, Any], steps: int, mesh: Any = None, rank: int = 0,
                   world: int = 1, out: Path | None = None, stop: int | None = None, resume: bool = False,
                   init_seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``rankwise.train`` (AdamW, lr 1e-2) with the method's controller of the float64 tiny Llama adapted
    with ``method``, or, for a structured controller (:data:`SPARSE_CONTROLLERS`), ``rw.sparsify``-ed with
    ``kwargs["sparsify"]`` (Cuttlefish: with attention biases) and the controller built on the optimizer with the
    other ``kwargs``; an adapter without a controller trains with what the loop attaches (its training
    callbacks or optimizer). With ``mesh`` sharded with FSDP2 and trained on this rank's slice of every batch,
    else on the whole batches (the reference). Returns the final full weights (with the buffers) and the loop's
    log (the controllers' rank records), the final trainable shapes and the controller's ``state_dict``.
    ``out``: a checkpoint every 2 steps there (DCP under ``torch.distributed``); ``stop``: stop after that step;
    ``resume``: resume from ``out`` (the fresh model is resized to the checkpoint before it is sharded,
    :func:`rankwise.train.reshape_for_resume`); ``init_seed``: the model's initialisation."""
    import rankwise as rw
    from rankwise.batches import default_loss
    from rankwise.cli.distributed import RankSlices
    from rankwise.train import TrainConfig, reshape_for_resume
    from rankwise.train import train as run

    kwargs = dict(kwargs)
    options, d2 = kwargs.pop("sparsify", {}), kwargs.pop("d2_data", False)
    if method in SPARSE_CONTROLLERS:
        if SPARSE_CONTROLLERS[method] is None:
            model: torch.nn.Module = make_model(init_seed)
        else:  # Cuttlefish with biases: they carry on past the factorization
            model = structured_model("sparsify", SPARSE_CONTROLLERS[method], options, seed=init_seed,
                                     attention_bias=method == "cuttlefish")
    else:
        model = structured_model("adapt", method, kwargs, seed=init_seed)
    batches: Any = make_batches(steps)
    saving = {"checkpoint_every": 2, "output_dir": str(out)} if out is not None else {}
    cfg = TrainConfig(max_steps=steps, lr=1e-2, device=None, progress=False, measure_memory=False, **saving)
    if resume:  # resized to the checkpoint's shapes while still whole, then sharded
        reshape_for_resume(model, str(out), batches, cfg)
    if mesh is not None:
        shard(model, mesh)
        batches = RankSlices(batches, rank, world)
    optimizer, loss_fn, controllers = None, None, []
    if method in SPARSE_CONTROLLERS:  # a callback built on the optimizer (after sharding)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        controllers.append(sparse_controller(method, model, optimizer, kwargs, steps))
        if method == "maestro":  # its objective: full + sampled truncation + group lasso
            loss_fn = lambda m, b: controllers[0].loss(lambda: default_loss(m, b))  # noqa: E731
    elif method == "autolora":  # its selection variables step on validation batches (the same on every rank)
        from rankwise.adapters.autolora import AutoLoRAController

        controllers.append(AutoLoRAController(model, val_data=make_batches(2, seed=9)))
    elif method == "fast_forward":  # its stages on a tiny validation set (the same on every rank)
        from rankwise.adapters.fast_forward import FastForward

        controllers.append(FastForward(model, every=kwargs["ff_every"], val_data=make_batches(1, seed=9)))
    elif d2:  # BiLoRA with a D₂ loader: λ's gradient from its batches (the same on every rank)
        from rankwise.adapters.bilora import BiLoRALevels

        controllers.append(BiLoRALevels(model, d2_data=make_batches(2, seed=9)))
    elif rw.get_method(method).controller is not None:  # the method's controller, passed so the loop uses this one
        controllers.append(rw.get_method(method).controller(model, "default", None, steps))
    elif hasattr(rw.get_method(method).config_cls, "training_callbacks"):  # what the loop would attach, kept here
        from rankwise.adapters.rank_control import MethodControllers

        controllers.append(MethodControllers(model, ["default"]))
    callbacks = [*controllers, *([_StopAt(stop)] if stop else [])]  # the controller first: states pair by position
    result = run(model, batches, config=cfg, callbacks=callbacks, optimizer=optimizer, loss_fn=loss_fn,
                 resume_from=str(out) if resume else None)
    shapes = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    frozen_grads = sorted(n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # index sets, masks, running statistics
    weights = {**full_weights(model), **buffers}
    state = controllers[0].state_dict() if controllers and hasattr(controllers[0], "state_dict") else None
    return weights, {"history": result.history, "shapes": shapes, "frozen_grads": frozen_grads, "controller": state}


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def rsvd_matrix(m: int, n: int) -> torch.Tensor:
    """A float64 m×n matrix with a clear rank-4 gap (singular values 10, 8, 6, 4, then ≤ 1e-3)."""
    g = torch.Generator().manual_seed(11)
    u = torch.linalg.qr(torch.randn(m, 4, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, 4, generator=g, dtype=torch.float64))[0]
    s = torch.tensor([10.0, 8.0, 6.0, 4.0], dtype=torch.float64)
    return (u * s) @ v.T + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64) / (m * n) ** 0.5


#: Matrices of the sharded range finder check: both sides, even and uneven row shards on 2 ranks.
RSVD_SHAPES = ([48, 16], [16, 48], [47, 16], [15, 48])


def sharded_refreshes(G: torch.Tensor) -> dict[str, Any]:
    """Two refreshes of the ``rsvd`` range finder (``projectors.randomized_basis``, rank 4, seeded):
    a cold one, then one warm-started from its basis; for a DTensor G the projections come back
    gathered, with their placements."""
    from rankwise.optim.projectors import randomized_basis

    side = "right" if G.shape[0] >= G.shape[1] else "left"
    P, R = randomized_basis(G, 4, side, torch.Generator().manual_seed(7))
    P2, R2 = randomized_basis(G, 4, side, torch.Generator().manual_seed(8), start=P)
    placements = [str(r.placements) if hasattr(r, "placements") else None for r in (R, R2)]
    return {"P": P, "R": full(R), "P2": P2, "R2": full(R2), "placements": placements}


def available() -> str | None:
    """None when 2-process FSDP2 on gloo can run here, else the reason (for ``pytest.skip``)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "torch.distributed.fsdp.fully_shard (FSDP2) is not available"
    return None


def launch(mode: str, specs: list[dict[str, Any]], out: Path, split: int = 0, timeout: float = 300.0) -> None:
    """Run this script under ``torchrun --standalone --nproc_per_node 2`` on ``specs`` (``tests/launch.py``:
    retried when gloo aborts a worker); raise AssertionError with the workers' report when it fails."""
    from ..launch import torchrun

    spec_file = out / f"specs_{mode}.json"
    spec_file.write_text(json.dumps(specs))
    # a retry starts from what earlier launches left (a dcp-load reads a dcp-save's checkpoints)
    torchrun(Path(__file__), mode, "--dir", str(out), "--specs", str(spec_file), "--split", str(split),
             timeout=timeout, scratch=out)


def shard(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """FSDP2 as ``rankwise train --nproc`` shards: each decoder layer (unless an adapter's tensors cross layers),
    then the root (``cli.distributed.shard_model``)."""
    from rankwise.cli.distributed import shard_model

    return shard_model(model, "cpu", mesh)


def _specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    return json.loads(Path(args.specs).read_text())


def _sharded(mesh: Any, seed: int = 0) -> torch.nn.Module:
    return shard(make_model(seed), mesh)


def run(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    out = Path(args.dir)
    split = args.split
    for spec in _specs(args):
        tag, method, kwargs, steps = spec["tag"], spec["method"], spec["kwargs"], int(spec["steps"])
        batches = make_batches(steps)
        args.split = int(spec.get("split", split))
        mode = spec.get("mode", args.mode)  # one launch may mix modes
        print(f"[rank {rank}] {mode} {tag}", file=sys.stderr, flush=True)  # where a failure happened
        if mode == "structured":  # an adapter / structured layer, then fully_shard; errors recorded
            try:
                model = shard(structured_model(spec["kind"], method, kwargs), mesh)
                train(model, _adamw(model), batches, rank, world)
                weights, error = full_weights(model), None
            except Exception as exc:  # noqa: BLE001  (every rank fails alike: recorded for the test)
                weights, error = {}, f"{type(exc).__name__}: {exc}"[:500]
            if rank == 0:
                torch.save(weights, out / f"{tag}.pt")
                (out / f"{tag}.json").write_text(json.dumps({"error": error}))
        elif mode == "controlled":  # an adapter whose controller changes ranks, trained by rankwise.train
            try:
                weights, info = controlled_run(method, kwargs, steps, mesh, rank, world)
                info["error"] = None
            except Exception as exc:  # noqa: BLE001  (every rank fails alike: recorded for the test)
                weights, info = {}, {"error": f"{type(exc).__name__}: {exc}"[:800], "controller": None}
            if rank == 0:
                torch.save(weights, out / f"{tag}.pt")
                torch.save(info.pop("controller"), out / f"{tag}_controller.pt")
                (out / f"{tag}.json").write_text(json.dumps(info))
        elif mode == "controlled-resume":  # the same, stopped after step 3 and resumed from its DCP checkpoint
            # (a relaunch starts from empty output folders: tests/launch.py removes what a failed launch wrote)
            straight, first = controlled_run(method, kwargs, steps, mesh, rank, world, out=out / f"{tag}_a")
            controlled_run(method, kwargs, steps, mesh, rank, world, out=out / f"{tag}_b", stop=3)
            resumed, info = controlled_run(method, kwargs, steps, mesh, rank, world, out=out / f"{tag}_b",
                                           resume=True, init_seed=1)
            if rank == 0:
                torch.save({"straight": straight, "resumed": resumed, "straight_controller": first["controller"],
                            "resumed_controller": info["controller"]}, out / f"{tag}_resume.pt")
        elif mode == "rsvd":  # the rsvd projector's range finder on a row-sharded matrix (never gathered)
            from torch.distributed.tensor import Shard, distribute_tensor

            bases = {}
            for shape in RSVD_SHAPES:
                G = distribute_tensor(rsvd_matrix(*shape), mesh, [Shard(0)])
                bases[tuple(shape)] = sharded_refreshes(G)
            if rank == 0:
                torch.save(bases, out / f"{tag}.pt")
        elif mode == "zero":  # DDP + ZeroRedundancyOptimizer: torch's own, or sharding.zero_redundancy
            from torch.distributed.optim import ZeroRedundancyOptimizer
            from torch.nn.parallel import DistributedDataParallel

            from rankwise.optim.sharding import zero_redundancy

            inner = make_model()
            model = DistributedDataParallel(inner)
            if spec.get("fixed"):
                optimizer = zero_redundancy(inner, method, **kwargs)
            else:
                whole = rwo.make(method, inner, **kwargs)
                options = {k: v for k, v in kwargs.items() if k not in ("rank", "targets")}
                optimizer = ZeroRedundancyOptimizer([dict(g) for g in whole.param_groups],
                                                    optimizer_class=type(whole), **options)
            train(model, optimizer, batches, rank, world)
            weights = full_weights(inner)
            if rank == 0:
                torch.save(weights, out / f"{tag}.pt")
        elif mode == "parity":
            try:
                model = _sharded(mesh)
                optimizer = make_optimizer(method, model, kwargs)
                log = CollectiveLog()
                train(model, optimizer, batches, rank, world, log)
                weights, error = full_weights(model), None
                gathered = sorted(set(log.gathered_shapes()))
                # projector refreshes that failed over (an op that rejects DTensors would land here)
                fallbacks = getattr(optimizer, "svd_fallbacks", 0)
                memory = local_state_bytes(optimizer)
            except Exception as exc:  # noqa: BLE001  (every rank fails alike: recorded for the test)
                weights, error, fallbacks, memory, gathered = {}, f"{type(exc).__name__}: {exc}"[:500], 0, {}, []
            per_rank: list[Any] = [None] * world
            dist.all_gather_object(per_rank, memory)  # the per-rank memory table of docs/distributed.md
            if rank == 0:
                torch.save(weights, out / f"{tag}.pt")
                (out / f"{tag}.json").write_text(json.dumps(
                    {"svd_fallbacks": fallbacks, "error": error, "state_bytes_per_rank": per_rank,
                     "gathered_in_step": gathered}))
        elif mode == "loop":
            loop_resume(tag, method, kwargs, int(spec["steps"]), mesh, rank, world, out)
        elif mode == "accum":  # gradient accumulation: 2 batches of 2 rows per step == 1 batch of 4 rows
            runs = {k: loop_run(method, kwargs, steps, mesh, rank, world, out / f"{tag}_{k}", batch=4 // k,
                                dropout=0.0, wrap=spec["wrap"], grad_accum=k) for k in (1, 2)}
            weights = {k: full_weights(m.module if spec["wrap"] == "ddp" else m) for k, m in runs.items()}
            if rank == 0:
                torch.save(weights, out / f"{tag}.pt")
        elif mode == "precision":  # mixed precision (float32 weights): straight vs stopped after 2 and resumed
            precision_resume(tag, method, kwargs, steps, mesh, rank, world, out, spec["precision"], spec["wrap"],
                             getattr(torch, spec.get("dtype", "float32")), spec.get("lora", False))
        elif mode == "eval":  # rankwise.evaluate of RankSlices: each rank its rows, the sums added up
            from rankwise.cli.distributed import RankSlices
            from rankwise.train import evaluate

            metrics = evaluate(_sharded(mesh), RankSlices(eval_loader(), rank, world))
            if rank == 0:
                (out / f"{tag}.json").write_text(json.dumps(metrics))
        elif mode == "reshape":
            reshape_resume(tag, method, kwargs, int(spec["steps"]), mesh, rank, out)
        elif mode == "dcp-save":
            dcp_save(tag, method, kwargs, batches, args.split, mesh, rank, world, out, spec.get("api", "rankwise"))
        else:
            dcp_load(tag, method, kwargs, batches, args.split, mesh, rank, world, out, spec.get("api", "rankwise"))
            if (out / f"{tag}_ckpt1").exists():  # saved by one process: load resharded
                dcp_load(tag, method, kwargs, batches, args.split, mesh, rank, world, out,
                         source="_ckpt1", result="_resumed_1to2")
    dist.barrier()
    dist.destroy_process_group()


def _save_state(model, optimizer, path: Path, api: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if api == "torch":  # torch's own API (projected optimizers)
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    else:
        checkpoint.save(model, optimizer, str(path))


def _load_state(model, optimizer, path: Path, api: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if api == "torch":
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        checkpoint.load(model, optimizer, str(path))


class _StopAt:
    """A callback that stops the run after step ``step`` (an interruption)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state: Any) -> None:
        state.should_stop = state.should_stop or state.step == self.step


class _RankNoise:
    """A callback drawing a rank-dependent number of random values each step, so the ranks' RNG
    states differ (a resume must give each rank its own)."""

    def on_step_end(self, state: Any) -> None:
        import torch.distributed as dist

        torch.rand(dist.get_rank() + 1)


def loop_run(method: str, kwargs: dict[str, Any], steps: int, mesh: Any, rank: int, world: int, out: Path,
             init_seed: int = 0, stop: int | None = None, resume: bool = False, batch: int = 4,
             dropout: float = 0.1, wrap: str = "fsdp", dtype: torch.dtype = torch.float64,
             history: list[dict[str, Any]] | None = None, lora: bool = False, **config: Any) -> torch.nn.Module:
    """``rankwise.train`` on the sharded tiny Llama (attention dropout 0.1, and RNG states that differ
    by rank: each rank must resume its own) over a shuffled loader of this rank's slices of ``batch`` rows,
    with a checkpoint every 2 steps in ``out``; ``wrap="ddp"``: DistributedDataParallel instead of FSDP2;
    ``history`` receives the run's per-step logs; ``lora``: :func:`lora_and_norms` of the model."""
    from torch.nn.parallel import DistributedDataParallel

    from rankwise.cli.distributed import RankSlices
    from rankwise.train import TrainConfig
    from rankwise.train import train as run

    model = loop_model(init_seed, dtype, lora)
    model.config.attention_dropout = dropout
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = dropout
    model = shard(model, mesh) if wrap == "fsdp" else DistributedDataParallel(model)
    loader = shuffled_rows(batch)
    cfg = TrainConfig(max_steps=steps, optimizer=method, optimizer_kwargs=kwargs, lr=1e-2, checkpoint_every=2,
                      output_dir=str(out), device=None, progress=False, measure_memory=False, **config)
    callbacks = [_RankNoise(), *([_StopAt(stop)] if stop else [])]
    result = run(model, RankSlices(loader, rank, world), config=cfg, callbacks=callbacks,
                 resume_from=str(out) if resume else None)
    if history is not None:
        history.extend(result.history)
    return model


def rows_of(n: int) -> list[dict[str, torch.Tensor]]:
    """The rows of ``make_batches(n)``, one dict per sequence."""
    return [{k: v[i] for k, v in b.items()} for b in make_batches(n) for i in range(len(b["input_ids"]))]


def shuffled_rows(batch: int) -> Any:
    """The loop tests' loader: the 16 rows of ``make_batches(4)`` in shuffled batches of ``batch`` (seed 0)."""
    from torch.utils.data import DataLoader

    return DataLoader(rows_of(4), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))


def loop_model(seed: int, dtype: torch.dtype, lora: bool) -> torch.nn.Module:
    """The loop tests' tiny Llama in ``dtype`` (``lora``: with :func:`lora_and_norms`)."""
    model = make_model(seed, dtype)
    return lora_and_norms(model) if lora else model


def lora_and_norms(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA (r=4, its factors float32) on every linear layer, and every RMSNorm trained in the model's dtype:
    with a bfloat16 model, two dtypes of trainable parameters in each decoder layer."""
    import rankwise as rw

    rw.adapt(model, "lora", r=4)
    for name, module in model.named_modules():
        if name.endswith("norm"):
            module.requires_grad_(True)
    return model


def eval_loader() -> Any:
    """7 rows of 12 tokens in batches of 3, a few labels -100: the last batch has fewer rows than 2 ranks."""
    from torch.utils.data import DataLoader

    rows = rows_of(2)[:7]
    for i, row in enumerate(rows):
        row["labels"] = row["labels"].clone()
        row["labels"][: i % 4] = -100  # unequal predicted tokens per row
    return DataLoader(rows, batch_size=3)


def loop_one_process(method: str, kwargs: dict[str, Any], steps: int, dtype: torch.dtype = torch.float32,
                     lora: bool = False, **config: Any) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The reference of :func:`loop_run` without dropout: the tiny Llama (``lora``: with
    :func:`lora_and_norms`) trained by ``rankwise.train`` in this process on the same loader (whole batches);
    its final weights and per-step logs."""
    from rankwise.train import TrainConfig
    from rankwise.train import train as run

    model, loader = loop_model(0, dtype, lora), shuffled_rows(4)
    cfg = TrainConfig(max_steps=steps, optimizer=method, optimizer_kwargs=kwargs, lr=1e-2, device=None,
                      progress=False, measure_memory=False, **config)
    result = run(model, loader, config=cfg)
    return full_weights(model), result.history


def loop_resume(tag: str, method: str, kwargs: dict[str, Any], steps: int, mesh: Any, rank: int, world: int,
                out: Path) -> None:
    """``steps`` steps straight vs interrupted after 2 and resumed (fresh processes' state: a model
    initialised otherwise): both final weights to ``<tag>_straight.pt`` / ``<tag>_resumed.pt``; then
    a resume with other optimizer options, whose error goes to ``<tag>.json``."""
    straight = full_weights(loop_run(method, kwargs, steps, mesh, rank, world, out / f"{tag}_a"))
    loop_run(method, kwargs, steps, mesh, rank, world, out / f"{tag}_b", stop=2)
    resumed = full_weights(loop_run(method, kwargs, steps, mesh, rank, world, out / f"{tag}_b", init_seed=1,
                                    resume=True))
    try:
        loop_run(method, {**kwargs, "lr": 5e-3}, steps, mesh, rank, world, out / f"{tag}_b", resume=True)
        error = None
    except ValueError as exc:
        error = str(exc)
    if rank == 0:
        torch.save(straight, out / f"{tag}_straight.pt")
        torch.save(resumed, out / f"{tag}_resumed.pt")
        files = sorted(p.name for p in (out / f"{tag}_b" / "checkpoints" / "checkpoint-2").iterdir())
        (out / f"{tag}.json").write_text(json.dumps({"changed_error": error, "files": files}))


def precision_resume(tag: str, method: str, kwargs: dict[str, Any], steps: int, mesh: Any, rank: int,
                     world: int, out: Path, precision: str, wrap: str, dtype: torch.dtype, lora: bool) -> None:
    """``loop_resume`` of a ``dtype`` model (``lora``: :func:`lora_and_norms`) under ``precision`` (no
    dropout): the straight and the resumed run's final weights to ``<tag>_straight.pt`` / ``<tag>_resumed.pt``,
    every rank's per-step loss scales (fp16) and the straight run's losses to ``<tag>.json``."""
    import torch.distributed as dist

    run = {"dropout": 0.0, "dtype": dtype, "precision": precision, "wrap": wrap, "lora": lora}
    unwrap = (lambda m: m.module) if wrap == "ddp" else (lambda m: m)
    logs: list[dict[str, Any]] = []
    straight = full_weights(unwrap(loop_run(method, kwargs, steps, mesh, rank, world, out / f"{tag}_a",
                                            history=logs, **run)))
    loop_run(method, kwargs, steps, mesh, rank, world, out / f"{tag}_b", stop=2, **run)
    resumed = full_weights(unwrap(loop_run(method, kwargs, steps, mesh, rank, world, out / f"{tag}_b",
                                           init_seed=0 if lora else 1, resume=True, **run)))
    scales: list[Any] = [None] * world
    dist.all_gather_object(scales, [log.get("loss_scale") for log in logs])
    if rank == 0:
        torch.save(straight, out / f"{tag}_straight.pt")
        torch.save(resumed, out / f"{tag}_resumed.pt")
        (out / f"{tag}.json").write_text(json.dumps({"loss_scales": scales,
                                                     "losses": [log["loss"] for log in logs]}))


class _StopNow:
    """A callback that stops the run before its first step (a resume that only loads)."""

    def on_train_begin(self, state: Any) -> None:
        state.should_stop = True


def reshaped_run(method: str, kwargs: dict[str, Any], steps: int, out: Path, init_seed: int = 0,
                 stop: int | None = None, resume: str | None = None, mesh: Any = None,
                 stop_now: bool = False, resize: bool = True) -> torch.nn.Module:
    """``rankwise.train`` of a method whose ranks change while training: ``increlora`` (its controller
    grows the adapter) or ``cuttlefish`` (factorizes every layer once their stable ranks settle), AdamW,
    float64, a checkpoint every 2 steps in ``out`` (through DCP: the world has 2 ranks). Without ``mesh``
    each rank trains an unsharded model on the whole batches, so the ranks take the same steps. ``mesh``:
    the fresh model is resized to the checkpoint (:func:`rankwise.train.reshape_for_resume`), then
    sharded with FSDP2, then resumed, each rank on its half of every batch (the controller's steps run on
    the shards)."""
    import rankwise as rw
    from rankwise.cli.distributed import RankSlices
    from rankwise.sparse.cuttlefish import Cuttlefish
    from rankwise.train import TrainConfig, reshape_for_resume
    from rankwise.train import train as run

    model = make_model(init_seed)
    if method == "cuttlefish":
        rw.sparsify(model, "cuttlefish")
    else:
        rw.adapt(model, method, **kwargs)
    model.to(torch.float64)
    loader = shuffled_rows(4)
    cfg = TrainConfig(max_steps=steps, lr=1e-2, checkpoint_every=2, output_dir=str(out), device=None,
                      progress=False, measure_memory=False)
    callbacks: list[Any] = [*([_StopAt(stop)] if stop else []), *([_StopNow()] if stop_now else [])]
    if mesh is not None:
        if resize:
            reshape_for_resume(model, resume, loader, cfg)
        shard(model, mesh)
        loader = RankSlices(loader, mesh.get_local_rank(), mesh.size())  # each rank trains on its half
    optimizer = None
    if method == "cuttlefish":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        callbacks.insert(0, Cuttlefish(model, optimizer, **kwargs))
    run(model, loader, config=cfg, callbacks=callbacks, resume_from=resume, optimizer=optimizer)
    return model


def reshape_resume(tag: str, method: str, kwargs: dict[str, Any], steps: int, mesh: Any, rank: int,
                   out: Path) -> None:
    """``steps`` steps straight vs stopped after step 3 (its ranks changed at step 2) and resumed by fresh
    processes' state (a model initialised otherwise, at the initial ranks): final weights to
    ``<tag>_straight.pt`` / ``<tag>_resumed.pt``. IncreLoRA also: the checkpoint at step 3 resumed into a
    fresh model resized before ``fully_shard`` (loads, no step: ``<tag>_fsdp.pt`` vs ``<tag>_step3.pt``;
    and trained on to the end, growing on the shards: ``<tag>_fsdp_resumed.pt``), and into one sharded
    without the resize (its error to ``<tag>.json``)."""
    import torch.distributed as dist

    straight = full_weights(reshaped_run(method, kwargs, steps, out / f"{tag}_a"))
    step3 = full_weights(reshaped_run(method, kwargs, steps, out / f"{tag}_b", stop=3))
    if rank == 0:  # a copy of checkpoint-3 for the FSDP2 resumes (they write their own final checkpoint)
        shutil.copytree(out / f"{tag}_b" / "checkpoints" / "checkpoint-3", out / f"{tag}_c" / "checkpoint-3")
    dist.barrier()
    resumed = full_weights(reshaped_run(method, kwargs, steps, out / f"{tag}_b", init_seed=1,
                                        resume=str(out / f"{tag}_b")))
    info: dict[str, Any] = {"ranks": {n: list(t.shape) for n, t in step3.items() if "lora_A" in n or n.endswith(".U")}}
    if method == "increlora":
        fsdp = full_weights(reshaped_run(method, kwargs, steps, out / f"{tag}_d", init_seed=1, mesh=mesh,
                                         resume=str(out / f"{tag}_c"), stop_now=True))
        resumed_fsdp = full_weights(reshaped_run(method, kwargs, steps, out / f"{tag}_f", init_seed=1, mesh=mesh,
                                                 resume=str(out / f"{tag}_c")))
        try:  # sharded at the initial ranks: the load names the tensors that do not fit
            reshaped_run(method, kwargs, steps, out / f"{tag}_e", init_seed=1, mesh=mesh, resume=str(out / f"{tag}_c"),
                         stop_now=True, resize=False)
            info["unresized_error"] = None
        except ValueError as exc:
            info["unresized_error"] = str(exc)
        if rank == 0:
            torch.save(fsdp, out / f"{tag}_fsdp.pt")
            torch.save(resumed_fsdp, out / f"{tag}_fsdp_resumed.pt")
    if rank == 0:
        torch.save(straight, out / f"{tag}_straight.pt")
        torch.save(step3, out / f"{tag}_step3.pt")
        torch.save(resumed, out / f"{tag}_resumed.pt")
        (out / f"{tag}.json").write_text(json.dumps(info))


def dcp_save(tag, method, kwargs, batches, split, mesh, rank, world, out: Path, api: str = "rankwise") -> None:
    """``split`` steps, save to ``<tag>_ckpt``, the remaining steps; final weights to ``<tag>_straight.pt``.
    ``mesh=None``: one process, a plain (unsharded) model, checkpoint ``<tag>_ckpt1``."""
    model = make_model() if mesh is None else _sharded(mesh)
    optimizer = make_optimizer(method, model, kwargs)
    train(model, optimizer, batches[:split], rank, world)
    _save_state(model, optimizer, out / (f"{tag}_ckpt" if mesh is not None else f"{tag}_ckpt1"), api)
    train(model, optimizer, batches[split:], rank, world)
    weights = full_weights(model)
    if rank == 0 and mesh is not None:
        torch.save(weights, out / f"{tag}_straight.pt")


def dcp_load(tag, method, kwargs, batches, split, mesh, rank, world, out: Path, api: str = "rankwise",
             source: str = "_ckpt", result: str = "_resumed") -> dict[str, torch.Tensor]:
    """Fresh model (a different init: everything must come from the checkpoint) and optimizer load
    ``<tag><source>``, train steps ``split..``; rank 0 saves the final weights to ``<tag><result>.pt``.
    ``mesh=None``: one process, a plain model; the weights are returned."""
    model = make_model(seed=1) if mesh is None else _sharded(mesh, seed=1)
    optimizer = make_optimizer(method, model, kwargs)
    _load_state(model, optimizer, out / f"{tag}{source}", api)
    train(model, optimizer, batches[split:], rank, world)
    weights = full_weights(model)
    if rank == 0 and mesh is not None:
        torch.save(weights, out / f"{tag}{result}.pt")
    return weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["parity", "structured", "controlled", "zero", "rsvd", "loop", "reshape",
                                         "dcp-save", "dcp-load", "controlled-resume", "accum",
                                         "precision", "eval"])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--specs", required=True)
    parser.add_argument("--split", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args)


if __name__ == "__main__":
    main()
