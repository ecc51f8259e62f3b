"""Bench experiments: what one arm of ``rankwise bench`` trains, read from a folder users can write by hand.

An experiment folder holds up to two JSON files:

* ``adapter_config.json`` — a PEFT config as ``PeftConfig.save_pretrained`` writes it (``peft_type`` LORA,
  with ``use_dora`` / ``use_rslora`` / ``init_lora_weights``; VERA, ADALORA, HRA, FOURIERFT, C3A, DELORA,
  GRALORA, RANDLORA), so a PEFT method-comparison config runs unchanged; it is translated to the rankwise
  method of the same forward (:func:`from_peft_config`). Absent: full fine-tuning (or ``method`` below).
* ``training.json`` — the rest: ``method`` and ``options`` (any rankwise adapter, ``none`` = full
  fine-tuning, ``head``, or a ``rw.sparsify`` method, its controller built from the other options),
  ``targets``, ``optimizer`` and ``optimizer_options`` (any ``rw.optim.make`` name), ``lr_grid`` (the
  learning rates the sweep tries), ``note`` (why the method's knobs are set so).

Settings that should follow the budget are written ``"steps/K"`` (an integer: the profile's step count
divided by K, at least 1), e.g. GaLore's ``update_gap`` or BAdam's ``switch_every``, and are resolved
by the runner (:func:`resolve_budget`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PEFT_CONFIG = "adapter_config.json"
TRAINING = "training.json"
TRAINING_KEYS = ("method", "options", "targets", "optimizer", "optimizer_options", "lr_grid", "steps_factor", "note")
FULL_FINETUNE, HEAD_ONLY = "none", "head"
_BUDGET = re.compile(r"steps/(\d+)")


@dataclass(frozen=True)
class Experiment:
    """One bench arm: ``method`` (an adapter, ``none`` or ``head``) with ``options`` on ``targets``,
    trained by ``optimizer`` with ``optimizer_options``; ``lr_grid`` (None: the profile's grid for its
    kind) is what the validation sweep tries; ``steps_factor`` multiplies the profile's step count (the
    equal-updates view of a block sampler: each weight then gets as many updates as under AdamW);
    ``note`` states how the method's own knobs were set."""

    name: str
    method: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)
    targets: Any = "all-linear"
    optimizer: str = "adamw"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    lr_grid: tuple[float, ...] | None = None
    steps_factor: float = 1.0
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", self.name):
            raise ValueError(f"experiment name {self.name!r} must be letters, digits, '_', '.', '+' or '-'")
        for key in ("options", "optimizer_options"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"experiment {self.name!r}: {key}={getattr(self, key)!r} must be a JSON object")
        if self.lr_grid is not None:
            grid = tuple(self.lr_grid)
            if not grid or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in grid):
                raise ValueError(f"experiment {self.name!r}: lr_grid={self.lr_grid!r} must be a non-empty list "
                                 "of positive learning rates")
            object.__setattr__(self, "lr_grid", grid)
        factor = self.steps_factor
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 1000:
            raise ValueError(f"experiment {self.name!r}: steps_factor={factor!r} must be a number in (0, 1000]")

    @property
    def kind(self) -> str:
        """``adapter``, ``full`` (every weight trains), ``head`` or ``structured`` (a ``rw.sparsify`` method):
        which default lr grid applies."""
        from ..sparse.api import SPARSE_METHODS

        if self.method in SPARSE_METHODS:
            return "structured"
        return {FULL_FINETUNE: "full", HEAD_ONLY: "head"}.get(self.method, "adapter")

    def steps(self, profile_steps: int) -> int:
        """This experiment's optimizer steps under a profile of ``profile_steps``."""
        return max(1, round(profile_steps * self.steps_factor))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lr_grid"] = list(self.lr_grid) if self.lr_grid is not None else None
        return out

    def fingerprint(self) -> str:
        """A short hash of every setting (not the note): rows of a changed experiment never mix with new ones."""
        settings = {k: v for k, v in self.to_dict().items() if k not in ("name", "note")}
        if self.steps_factor == 1:
            del settings["steps_factor"]  # the default leaves fingerprints of earlier runs unchanged
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve_budget(options: dict[str, Any], steps: int) -> dict[str, Any]:
    """``options`` with every ``"steps/K"`` value replaced by ``max(1, steps // K)``."""
    out = {}
    for key, value in options.items():
        match = _BUDGET.fullmatch(value) if isinstance(value, str) else None
        if match is not None:
            if int(match.group(1)) < 1:
                raise ValueError(f"{key}={value!r}: K in 'steps/K' must be at least 1")
            value = max(1, steps // int(match.group(1)))
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------ PEFT configs
def _lora(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    init = cfg.get("init_lora_weights", True)
    inits = {True: "default", "pissa": "pissa", "olora": "olora", "eva": "eva", "orthogonal": "orthogonal"}
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        init = "pissa"
    if init not in inits:
        raise ValueError(f"init_lora_weights={init!r} is not supported by rankwise bench; allowed: "
                         f"{[k for k in inits]} (or 'pissa_niter_N')")
    method = "dora" if cfg.get("use_dora") else "lora"
    options: dict[str, Any] = {"r": cfg.get("r", 8), "alpha": cfg.get("lora_alpha", 8),
                               "dropout": cfg.get("lora_dropout", 0.0)}
    if cfg.get("use_rslora"):
        options["use_rslora"] = True
    if inits[init] != "default":
        options["init"] = inits[init]
    return method, options


#: PEFT config fields that carry over under the same name, per peft_type (besides ``r``).
_SAME_NAME = {
    "VERA": ("r", "d_initial"),
    "ADALORA": ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                "total_step"),
    "HRA": ("r", "apply_GS"),
    "FOURIERFT": ("n_frequency", "scaling", "random_loc_seed"),
    "C3A": ("block_size",),
    "DELORA": ("r", "delora_lambda"),
    "GRALORA": ("r", "alpha", "gralora_k", "hybrid_r"),
    "RANDLORA": ("r",),
}
#: PEFT fields renamed on the way (peft_type -> {PEFT field: rankwise option}).
_RENAMED = {
    "VERA": {"vera_dropout": "dropout"},
    "ADALORA": {"lora_alpha": "alpha", "lora_dropout": "dropout"},
    "RANDLORA": {"randlora_alpha": "alpha", "randlora_dropout": "dropout"},
    "GRALORA": {"gralora_dropout": "dropout"},
    "DELORA": {"module_dropout": "dropout"},
}


def from_peft_config(cfg: dict[str, Any]) -> tuple[str, dict[str, Any], Any]:
    """``(method, options, targets)`` of the rankwise adapter with the forward of PEFT config ``cfg``."""
    peft_type = cfg.get("peft_type")
    allowed = ["LORA", *_SAME_NAME]
    if peft_type not in allowed:
        raise ValueError(f"peft_type={peft_type!r} is not supported by rankwise bench; allowed: {allowed}")
    targets = cfg.get("target_modules") or "all-linear"
    if targets == "all-linear" or targets == ["all-linear"]:
        targets = "all-linear"
    elif isinstance(targets, str):
        targets = "re:" + targets  # PEFT: a string is a full-match regex over module names
    if peft_type == "LORA":
        method, options = _lora(cfg)
        return method, options, targets
    options = {k: cfg[k] for k in _SAME_NAME[peft_type] if k in cfg and cfg[k] is not None}
    options.update({ours: cfg[k] for k, ours in _RENAMED.get(peft_type, {}).items() if k in cfg})
    if peft_type == "HRA" and cfg.get("init_weights") is False:
        raise ValueError("HRA init_weights=False (a non-identity start) is not supported by rankwise bench")
    return peft_type.lower(), options, targets


# ------------------------------------------------------------------------------------------ folders
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def load_experiment(path: str | os.PathLike) -> Experiment:
    """The experiment of folder ``path`` (its name is the folder's): ``adapter_config.json`` and/or
    ``training.json``; a ValueError names the file and key at fault."""
    path = Path(path)
    peft_file, training_file = path / PEFT_CONFIG, path / TRAINING
    if not peft_file.is_file() and not training_file.is_file():
        raise ValueError(f"{path} is not an experiment folder: it has neither {PEFT_CONFIG} nor {TRAINING}")
    training = _read_json(training_file) if training_file.is_file() else {}
    unknown = sorted(set(training) - set(TRAINING_KEYS))
    if unknown:
        raise ValueError(f"{training_file}: unknown keys {unknown}; allowed: {list(TRAINING_KEYS)}")
    settings: dict[str, Any] = {}
    if peft_file.is_file():
        try:
            method, options, targets = from_peft_config(_read_json(peft_file))
        except ValueError as e:
            raise ValueError(f"{peft_file}: {e}") from None
        if "method" in training and training["method"] != method:
            raise ValueError(f"{training_file}: method={training['method']!r} contradicts {PEFT_CONFIG} "
                             f"(a {method} adapter); leave method out of {TRAINING}")
        settings = {"method": method, "options": {**options, **training.pop("options", {})}, "targets": targets}
    settings.update(training)
    settings.setdefault("method", FULL_FINETUNE)
    try:
        return Experiment(name=path.name, **settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def load_experiments(root: str | os.PathLike) -> list[Experiment]:
    """Every experiment folder under ``root`` (itself one, or its sub-folders), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--experiments {str(root)!r} is not a directory")
    if (root / PEFT_CONFIG).is_file() or (root / TRAINING).is_file():
        return [load_experiment(root)]
    found = [load_experiment(d) for d in sorted(root.iterdir())
             if d.is_dir() and ((d / PEFT_CONFIG).is_file() or (d / TRAINING).is_file())]
    if not found:
        raise ValueError(f"--experiments {str(root)!r} holds no experiment folder (with {PEFT_CONFIG} or {TRAINING})")
    return found


def write_experiment(exp: Experiment, root: str | os.PathLike) -> Path:
    """Write ``exp`` as folder ``root/<name>`` holding ``training.json`` (the form :func:`load_experiment` reads)."""
    from ..io import write_json

    folder = Path(root) / exp.name
    folder.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in exp.to_dict().items() if k != "name" and v not in (None, "", {})}
    write_json(folder / TRAINING, data)
    return folder
