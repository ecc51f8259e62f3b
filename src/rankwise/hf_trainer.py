"""The transformers ``Trainer`` path: adapter-only checkpoints, rankwise optimizers, loop callbacks.

``Trainer`` on its own saves an adapted model as the whole model (every frozen base weight too) and
``from_pretrained`` on such a checkpoint silently drops the adapters. :class:`RankwiseTrainer` saves
the adapters only, in two formats side by side:

* the rankwise format (``rankwise_adapter.json`` + ``.safetensors``: every method, exact), which
  resume and ``load_best_model_at_end`` read back into the adapted model;
* the PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``) for every method whose
  delta is a low-rank product, so ``PeftModel.from_pretrained``, ``AutoModel*.from_pretrained``
  (with peft installed) and vLLM load the checkpoint onto the base model.

Optimizers: ``RankwiseTrainer(..., optimizer="galore", optimizer_options={"rank": 64})`` builds any
``rw.optim`` optimizer or sampler with the Trainer's learning rate and weight decay; with a plain
``Trainer`` use ``optimizer_cls_and_kwargs=trainer_optimizer("galore", lr=1e-3, rank=64)``.
Rank controllers and other loop callbacks (``rankwise.callbacks``) run inside the Trainer through
:class:`LoopCallbacks`; their state is saved with each checkpoint and restored on resume.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate.optimizer import AcceleratedOptimizer
from safetensors.torch import load_file
from torch import nn

from . import checks, optim
from .adapters import adapter_layers, get_method
from .adapters.rank_control import with_method_controllers
from .adapters.registry import adapter_names, adapter_state
from .callbacks import TrainState, call
from .checkpoint import trained_tensors
from .io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_tensors, save_adapter, save_tensors
from .optim.factory import names as optimizer_names
from .peft_io import export_peft
from .train import TrainConfig

__all__ = [
    "CALLBACKS_FILE", "LoopCallbacks", "RankwiseTrainer", "load_adapter_checkpoint", "save_adapter_checkpoint",
    "trainer_optimizer",
]

CALLBACKS_FILE = "rankwise_callbacks.pt"
EXTRA_FILE = "rankwise_trained_extra.safetensors"


def _state(model: nn.Module) -> Any:
    """The model's one adapter (the Trainer saves and restores a single adapter per checkpoint)."""
    names = adapter_names(model)
    if not names:
        raise ValueError("the model has no rankwise adapters (call rw.adapt before building the Trainer)")
    if len(names) > 1:
        raise ValueError(f"RankwiseTrainer checkpoints one adapter; the model has {names}: train each adapter "
                         "on a model holding it alone, then combine them with rw.load_adapter(..., name=)")
    return adapter_state(model)


def _extra_trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trained tensors outside the adapter format: parameters a method unfroze beside the adapters
    (e.g. ReLoRA's ``train_rest``) and persistent buffers, by ``state_dict`` name."""
    adapter_keys = set(adapter_tensors(model))
    return {k: v.detach() for k, v in trained_tensors(model).items() if k not in adapter_keys}


def save_adapter_checkpoint(model: nn.Module, output_dir: str | os.PathLike) -> list[str]:
    """Write the adapters of ``model`` into ``output_dir`` (rankwise format, and PEFT format when the
    method exports to it) without touching the directory's other files. Returns the file names."""
    state = _state(model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix=".rankwise-save.", dir=out) as tmp:
        parts = [save_adapter(model, Path(tmp) / "rankwise")]
        extra = _extra_trained_tensors(model)
        if extra:
            save_tensors(extra, Path(tmp) / "rankwise" / EXTRA_FILE)
        if get_method(state.method).export != "none":
            parts.append(export_peft(model, Path(tmp) / "peft"))
        for part in parts:
            for f in sorted(part.iterdir()):
                os.replace(f, out / f.name)
                written.append(f.name)
    return written


@torch.no_grad()
def load_adapter_checkpoint(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load the adapter tensors saved by :func:`save_adapter_checkpoint` into the adapted ``model``.

    The method, layers and adapter settings must match the model's; every tensor is checked (shape, dtype, finite).
    Layers whose initialization moved part of W₀ out of the frozen base (PiSSA, LoLDU, ...) get their
    base recomputed from the untouched W₀ and the loaded offset, so the model equals the saved one.
    """
    state = _state(model)
    path = Path(checkpoint)
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: {str(path)!r} is not a rankwise adapter checkpoint")
    saved_cfg = json.loads(cfg_file.read_text())
    if saved_cfg.get("method") != state.method or list(saved_cfg.get("layers", [])) != list(state.layers):
        raise ValueError(
            f"checkpoint {str(path)!r} holds method {saved_cfg.get('method')!r} on {len(saved_cfg.get('layers', []))} "
            f"layers; the model has {state.method!r} on {len(state.layers)} layers"
        )
    saved_options, options = saved_cfg.get("config", {}), state.config.to_dict()
    changed = sorted(k for k in set(saved_options) | set(options) if saved_options.get(k) != options.get(k))
    if changed:
        raise ValueError(
            f"checkpoint {str(path)!r} was trained with other adapter settings: "
            + ", ".join(f"{k}={saved_options.get(k)!r} (the model has {options.get(k)!r})" for k in changed)
        )
    extra_file = path / EXTRA_FILE
    tensors = {**load_file(str(path / ADAPTER_WEIGHTS)), **(load_file(str(extra_file)) if extra_file.is_file() else {})}
    live = {**adapter_tensors(model), **_extra_trained_tensors(model)}
    checks.tensors_fit(tensors, live, f"checkpoint {str(path)!r}")
    offset_layers = [(n, m) for n, m in adapter_layers(model) if m.base_offset_factors() is not None]
    originals = {n: m.original_weight() for n, m in offset_layers}
    for key, t in tensors.items():
        live[key].copy_(t)
    for name, layer in offset_layers:
        layer.base_weight.copy_(originals[name])
        layer.after_load()


def trainer_optimizer(name: str, **options: Any) -> tuple[Any, dict[str, Any]]:
    """``optimizer_cls_and_kwargs`` for a plain ``transformers.Trainer``: the Trainer calls the returned
    factory with the model and ``options`` (include ``lr``), i.e. ``rw.optim.make(name, model, **options)``."""
    checks.choice("optimizer", name, optimizer_names())

    class _Factory:
        def __call__(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
            return optim.make(name, model, **kwargs)

    return _Factory, dict(options)


def _unwrapped(optimizer: Any) -> Any:
    """The optimizer itself, not accelerate's ``AcceleratedOptimizer`` wrapper around it (a rankwise
    ``GuardedOptimizer`` also has an ``optimizer`` attribute, but is the optimizer the user built)."""
    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


class LoopCallbacks(transformers.TrainerCallback):
    """Run rankwise loop callbacks (:mod:`rankwise.callbacks`: rank controllers, ...) inside a Trainer.

    Hook mapping: ``on_train_begin`` → ``on_train_begin``; ``on_pre_optimizer_step`` (gradients
    present, after the Trainer's clipping) → ``on_after_backward``; ``on_optimizer_step`` (weights
    updated, before the scheduler step and ``zero_grad``) → ``on_step_end``; ``on_evaluate``,
    ``on_save`` (the checkpoint folder) and ``on_train_end`` likewise. ``state.should_stop`` stops the
    Trainer; fields a callback puts in ``state.log`` are added to the Trainer's next log record.
    """

    def __init__(self, callbacks: Sequence[Any], make_val_loader: Callable[[], Any] | None = None) -> None:
        self.callbacks = list(callbacks)
        self.make_val_loader = make_val_loader  # the validation batches methods fit their choices on, built lazily
        self.loop_state: TrainState | None = None
        self._pending_log: dict[str, Any] = {}

    def _sync(self, hf_state: Any, kwargs: dict[str, Any], step: int) -> TrainState:
        if self.loop_state is None:
            self.loop_state = TrainState(
                model=kwargs["model"], optimizer=_unwrapped(kwargs["optimizer"]), scheduler=kwargs.get("lr_scheduler"),
                config=TrainConfig.plain(max(int(hf_state.max_steps), 1)), total_steps=int(hf_state.max_steps),
                eval_loader=kwargs.get("eval_dataloader"),
                # the Trainer's eval_dataset (its validation split), for AutoLoRA's α and Fast Forward's stops
                val_loader=self._val_loader(kwargs),
            )
        s = self.loop_state
        s.optimizer = _unwrapped(kwargs.get("optimizer", s.optimizer))
        s.scheduler = kwargs.get("lr_scheduler", s.scheduler)
        s.step, s.epoch = step, int(hf_state.epoch or 0)
        return s

    def _val_loader(self, kwargs: dict[str, Any]) -> Any:
        """The Trainer's eval dataloader when it passes one, else the one ``make_val_loader`` builds (None: none)."""
        loader = kwargs.get("eval_dataloader")
        if loader is None and self.make_val_loader is not None:
            loader = self.make_val_loader()
        return loader

    def _finish(self, control: Any) -> Any:
        s = self.loop_state
        if s is not None:
            self._pending_log.update(s.log)
            s.log = {}
            if s.should_stop:
                control.should_training_stop = True
        return control

    def _run(self, hook: str, args: Any, hf_state: Any, control: Any, kwargs: dict, step: int, *extra: Any) -> Any:
        s = self._sync(hf_state, kwargs, step)
        call(self.callbacks, hook, s, *extra)
        return self._finish(control)

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        return self._run("on_train_begin", args, state, control, kwargs, state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        return self._run("on_after_backward", args, state, control, kwargs, state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        return self._run("on_step_end", args, state, control, kwargs, state.global_step + 1)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # type: ignore[no-untyped-def]
        return self._run("on_evaluate", args, state, control, kwargs, state.global_step, dict(metrics or {}))

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        folder = Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        return self._run("on_save", args, state, control, kwargs, state.global_step, folder)

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        return self._run("on_train_end", args, state, control, kwargs, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if self._pending_log and state.log_history:
            state.log_history[-1].update(self._pending_log)  # the record the Trainer just appended
            self._pending_log = {}
        return control

    def state_dict(self) -> list[Any]:
        return [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks]

    def load_state_dict(self, states: list[Any]) -> None:
        if len(states) != len(self.callbacks):
            raise ValueError(f"checkpoint holds the state of {len(states)} loop callbacks, this Trainer has "
                             f"{len(self.callbacks)}: pass the same callbacks as the first run")
        for cb, st in zip(self.callbacks, states, strict=True):
            if st is not None:
                cb.load_state_dict(st)


class RankwiseTrainer(transformers.Trainer):
    """``transformers.Trainer`` for rankwise-adapted models and rankwise optimizers (module docstring).

    An adapted model is saved as its adapters only; a model without adapters (full-parameter
    training with e.g. GaLore) is saved as the Trainer saves it.

    Extra arguments: ``optimizer`` (a ``rw.optim`` name, built with ``args.learning_rate`` and
    ``args.weight_decay`` plus ``optimizer_options``) and ``loop_callbacks`` (rankwise loop
    callbacks, run through :class:`LoopCallbacks`). Everything else is the Trainer's. The controller of
    a rank-allocating adapter (AdaLoRA, SoRA) is added to the loop callbacks by itself.
    """

    def __init__(
        self,
        *args: Any,
        optimizer: str | None = None,
        optimizer_options: dict[str, Any] | None = None,
        loop_callbacks: Sequence[Any] = (),
        **kwargs: Any,
    ) -> None:
        if optimizer is not None:
            checks.choice("optimizer", optimizer, optimizer_names())
        if optimizer_options is not None and not isinstance(optimizer_options, dict):
            raise ValueError(f"optimizer_options={optimizer_options!r} must be a dict of keyword arguments")
        self.rankwise_optimizer, self.rankwise_optimizer_options = optimizer, dict(optimizer_options or {})
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, nn.Module):  # rank-allocating adapters bring their controller (built at train begin)
            loop_callbacks = with_method_controllers(model, loop_callbacks)
        self.loop_callbacks = LoopCallbacks(loop_callbacks, self._validation_batches) if loop_callbacks else None
        if self.loop_callbacks is not None:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.loop_callbacks]
        super().__init__(*args, **kwargs)

    def _validation_batches(self) -> Any:
        """The ``eval_dataset``'s dataloader (None without one): the validation data of methods that fit their
        own choices while training (``MethodSpec.needs_validation``)."""
        return self.get_eval_dataloader() if self.eval_dataset is not None else None

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.rankwise_optimizer is None or self.optimizer is not None:
            return super().create_optimizer(model)
        options = {"lr": self.args.learning_rate, "weight_decay": self.args.weight_decay,
                   **self.rankwise_optimizer_options}
        target: nn.Module = self.model if model is None else model  # type: ignore[assignment]
        self.optimizer = optim.make(self.rankwise_optimizer, target, **options)
        return self.optimizer

    def _adapted(self) -> bool:
        return bool(adapter_names(self.accelerator.unwrap_model(self.model)))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = str(output_dir if output_dir is not None else self.args.output_dir)
        if not self._adapted():  # full-parameter training (a rankwise optimizer): the Trainer's own save
            super()._save(output_dir, state_dict)
            self._save_loop_callbacks(output_dir)
            return
        if not self.args.should_save:
            return
        save_adapter_checkpoint(self.accelerator.unwrap_model(self.model), output_dir)
        self._save_loop_callbacks(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _save_loop_callbacks(self, output_dir: str) -> None:
        if self.loop_callbacks is not None and self.args.should_save:
            torch.save(self.loop_callbacks.state_dict(), Path(output_dir) / CALLBACKS_FILE)

    def _load_loop_callbacks(self, checkpoint: str) -> None:
        cb_file = Path(checkpoint) / CALLBACKS_FILE
        if self.loop_callbacks is not None and cb_file.is_file():
            self.loop_callbacks.load_state_dict(torch.load(cb_file, weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self._adapted():
            load_adapter_checkpoint(self.accelerator.unwrap_model(self.model if model is None else model),
                                    resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_loop_callbacks(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self._adapted():
            load_adapter_checkpoint(self.accelerator.unwrap_model(self.model), str(self.state.best_model_checkpoint))
        else:
            super()._load_best_model()
