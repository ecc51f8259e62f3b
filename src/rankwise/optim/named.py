"""The constructor every named projected optimizer (GaLore, Fira, APOLLO, COAP, ...) shares.

A named optimizer is the ``ProjectedOptimizer`` engine with some strategies fixed and some defaults
changed. Its class states only that: ``takes``, its constructor arguments after ``params`` in order with
their defaults (engine arguments, engine options from ``OPTION_KEYS`` and its own); ``fixed``, the
engine arguments it sets itself (passing one raises TypeError); and ``_engine_args``, which checks its
own arguments and turns them into the engine's. Other keywords go to the engine as they are (its other
arguments, ``OPTION_KEYS``; anything else raises its "unknown option(s)" ValueError). The class's
signature (``inspect.signature``, ``help``) is built from ``takes``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from .projected import ProjectedOptimizer

__all__ = ["ADAFACTOR_ARGS", "ADAMW_ARGS", "NamedProjected"]

#: The inner AdamW's hyper-parameters, the engine's first arguments, with galore-torch's defaults.
ADAMW_ARGS: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "correct_bias": True}
#: Adafactor's options (``inner="adafactor"``) besides ``beta1``, with galore-torch's defaults.
ADAFACTOR_ARGS: dict[str, Any] = {
    "decay_rate": -0.8, "clip_threshold": 1.0, "adafactor_eps": (1e-30, 1e-3), "scale_parameter": False,
}


def _signature(takes: dict[str, Any]) -> inspect.Signature:
    """``(params, <takes with their defaults>, **options)``."""
    arg = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature([
        inspect.Parameter("params", arg),
        *(inspect.Parameter(name, arg, default=default) for name, default in takes.items()),
        inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD),
    ])


class NamedProjected(ProjectedOptimizer):
    """A named projected optimizer: a subclass sets ``takes``, ``fixed`` and (for its own arguments)
    ``_engine_args``; see the module docstring."""

    takes: ClassVar[dict[str, Any]] = ADAMW_ARGS
    fixed: ClassVar[dict[str, Any]] = {}
    _takes_signature: ClassVar[inspect.Signature] = _signature(ADAMW_ARGS)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._takes_signature = _signature(cls.takes)
        # a subclass that keeps ``takes`` but writes its own ``__init__`` (GaLoreAdamW8bit) shows that one
        cls.__signature__ = cls._takes_signature if "takes" in cls.__dict__ else None  # type: ignore[attr-defined]

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], *args: Any, **kwargs: Any):
        bound = self._takes_signature.bind(params, *args, **kwargs)
        bound.apply_defaults()
        named = dict(bound.arguments)
        params, options = named.pop("params"), named.pop("options")
        super().__init__(params, **self._engine_args(named), **self.fixed, **options)

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        """The engine's keyword arguments from the bound ``takes`` (checks the method's own ones)."""
        return args
