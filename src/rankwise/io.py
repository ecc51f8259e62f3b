"""Atomic file/directory writes and the rankwise adapter format (config JSON + safetensors)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters.registry import adapt, adapter_layers

ADAPTER_CONFIG = "rankwise_adapter.json"
ADAPTER_WEIGHTS = "rankwise_adapter.safetensors"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` in one rename.

    If the body raises, ``path`` is left as it was and the temporary directory is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path``; it replaces ``path`` only when the body succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_file(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors file of contiguous, unshared copies (shared storage is not allowed there)."""
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path), metadata=metadata)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor ``load_adapter`` needs: adapter parameters/persistent buffers and trained modules."""
    state = getattr(model, "rankwise_adapter", None)
    if state is None:
        raise ValueError("model has no rankwise adapters (call rw.adapt first)")
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        for key, t in layer.state_dict().items():
            if not key.startswith("base_layer."):
                out[f"{name}.{key}"] = t
    for name in state.trainable_modules:
        for key, t in model.get_submodule(name).state_dict().items():
            out[f"{name}.{key}"] = t
    return out


def _base_model_name(model: nn.Module) -> str | None:
    """The name or directory the base model was loaded from (a directory as an absolute path)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return os.path.abspath(name) if name and os.path.isdir(name) else name


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``rankwise_adapter.json`` + ``rankwise_adapter.safetensors`` to ``path`` atomically."""
    state = getattr(model, "rankwise_adapter", None)
    if state is None:
        raise ValueError("model has no rankwise adapters to save (call rw.adapt first)")
    tensors = adapter_tensors(model)
    config = {
        "format": "rankwise-adapter",
        "version": FORMAT_VERSION,
        "method": state.method,
        "config": state.config.to_dict(),
        "layers": state.layers,
        "trainable_modules": state.trainable_modules,
        "overrides": state.overrides,
        "base_model": _base_model_name(model),
    }
    with atomic_directory(path) as tmp:
        write_json(tmp / ADAPTER_CONFIG, config)
        save_tensors(tensors, tmp / ADAPTER_WEIGHTS)
    return Path(path)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Inject the adapters saved at ``path`` into ``model`` (the untouched base) and load their tensors."""
    path = Path(path)
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: not a rankwise adapter directory")
    config = json.loads(cfg_file.read_text())
    adapt(
        model,
        config["method"],
        targets=list(config["layers"]),
        trainable=config["trainable_modules"] or None,
        overrides=config.get("overrides") or None,
        _skip_init=True,
        **config["config"],
    )
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    expected = adapter_tensors(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter file does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, t in tensors.items():
            expected[key].copy_(t)
    for _, layer in adapter_layers(model):
        layer.after_load()
    return model
