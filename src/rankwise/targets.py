"""Which modules to touch: name suffixes, a regex, or ``"all-linear"``; and module replacement.

Target conventions (the same as PEFT's ``target_modules``):

* ``"all-linear"``: every linear layer except the output head(s): ``nn.Linear`` and transformers'
  ``Conv1D`` (GPT-2's projections, a linear map whose weight is stored transposed, (in, out));
* ``"all-conv"``: every ``nn.Conv1d`` / ``nn.Conv2d`` outside the output head(s) (adapters only);
* a ``str``: a regular expression that must match the *full* module name;
* a list/tuple of ``str``: a module matches when its name equals an entry or ends with ``"." + entry``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any, Literal, cast, overload

import torch
from torch import nn

from .layout import CLASSIFIER_NAMES, head_module_names

ALL_LINEAR = "all-linear"
ALL_CONV = "all-conv"  # every nn.Conv1d / nn.Conv2d (adapters only: find_targets(layer_types=True))

Targets = str | Sequence[str]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with W stored (in, out).
    Read without importing transformers: a model holding one has imported its module already."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit ``Linear4bit`` (``rw.quantize``; a subclass of
    ``nn.Linear`` whose weight holds packed codes). Read without importing bitsandbytes."""
    modules = sys.modules.get("bitsandbytes.nn.modules")
    return modules is not None and isinstance(module, modules.Linear4bit)


def is_factorized(module: nn.Module) -> bool:
    """Whether ``module`` is a factorized linear layer ``y = U(Vx) + b`` (``rankwise.sparse.layers.
    FactorizedLinear``, what ``rw.compress`` leaves). Read without importing the sparse package."""
    layers = sys.modules.get("rankwise.sparse.layers")
    return layers is not None and isinstance(module, layers.FactorizedLinear)


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer an adapter can wrap: ``nn.Linear`` (a bitsandbytes
    ``Linear4bit`` included), transformers ``Conv1D`` or a factorized layer (``is_factorized``, a
    read-only base: its weight is the product U·V)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_factorized(module)


#: what each base-layer kind of an adapter is called in messages
KIND_LABELS = {
    "linear": "nn.Linear / transformers Conv1D", "embedding": "nn.Embedding", "conv": "nn.Conv1d / nn.Conv2d",
}


def layer_kind(module: nn.Module) -> str | None:
    """The kind of base layer an adapter can wrap: ``"linear"`` (``nn.Linear``, 4-bit included, and
    transformers ``Conv1D``), ``"embedding"`` (``nn.Embedding``), ``"conv"`` (``nn.Conv1d`` /
    ``nn.Conv2d``), or None. Each adapter sees the weight as an (out, in) matrix (``weight_view``)."""
    if is_linear(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return "conv"
    return None


def kind_label(module: nn.Module) -> str:
    """``module``'s type as messages name it (``nn.Conv2d``, ``transformers Conv1D``, ...)."""
    if is_conv1d(module):
        return "transformers Conv1D"
    return f"nn.{type(module).__name__}" if type(module).__module__.startswith("torch.nn") else type(module).__name__


def weight_view(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of any base-layer kind: ``linear_weight`` for linear layers, ``weight.T``
    ((embedding_dim, num_embeddings), the map one-hot(id) → vector) for an ``nn.Embedding``,
    ``weight.reshape(out, -1)`` for a convolution (a view of the same storage when contiguous)."""
    weight = module.weight
    if layer_kind(module) == "embedding" and isinstance(weight, torch.Tensor):
        return weight.t()
    if layer_kind(module) == "conv" and isinstance(weight, torch.Tensor):
        return weight.reshape(weight.shape[0], -1)
    return linear_weight(module)


def to_weight_layout(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """An (out, in) matrix in ``module.weight``'s own layout (the inverse of ``weight_view``)."""
    if layer_kind(module) == "embedding" or is_conv1d(module):
        return matrix.t()
    return matrix.reshape(cast(torch.Tensor, module.weight).shape)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear layer: ``nn.Linear.weight`` itself, or the transposed view
    ``Conv1D.weight.T`` (the same storage, so in-place writes to the view land in the Conv1D); for a
    4-bit layer a dequantized copy, for a factorized layer the product U·V (writes to either are lost:
    adapters write through their one path)."""
    if is_linear4bit(module):
        from .quant import dequantize

        return dequantize(module)
    if is_factorized(module):
        return cast(torch.Tensor, module.dense_weight()).detach()  # type: ignore[operator]
    w = module.weight
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no weight tensor")
    return w.t() if is_conv1d(module) else w


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear`` (4-bit included) or ``Conv1D``."""
    if is_linear4bit(module) or is_factorized(module):
        return int(cast(int, module.out_features)), int(cast(int, module.in_features))
    out_features, in_features = linear_weight(module).shape
    return int(out_features), int(in_features)


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of the (out, in) matrix an adapter sees (``weight_view``) for any base-layer kind."""
    if layer_kind(module) == "linear":
        return linear_shape(module)
    out_features, in_features = weight_view(module).shape
    return int(out_features), int(in_features)


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` with every adapter wrapper (a module with ``wraps_base_layer``:
    ``AdapterLayer``, ``AdapterStack``) seen as its base layer under its own name, and its insides
    skipped: the layers a further named adapter can target."""
    found: list[tuple[str, nn.Module]] = []
    skip: str | None = None
    for name, module in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if getattr(module, "wraps_base_layer", False):
            found.append((name, module.base_layer))
            skip = name + "."
        else:
            found.append((name, module))
    return found


def _under_head(name: str, heads: set[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def name_matches(name: str, targets: Targets) -> bool:
    """Whether module ``name`` is selected by ``targets`` (regex string or suffix list)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


@overload
def find_targets(
    model: nn.Module, targets: Targets | None, *, conv1d: Literal[False], layer_types: bool = False
) -> list[tuple[str, nn.Linear]]: ...
@overload
def find_targets(
    model: nn.Module, targets: Targets | None, *, conv1d: bool = True, layer_types: bool = False
) -> list[tuple[str, nn.Module]]: ...
def find_targets(
    model: nn.Module, targets: Targets | None, *, conv1d: bool = True, layer_types: bool = False
) -> list[tuple[str, Any]]:
    """Return ``(name, module)`` for every module selected by ``targets``.

    With ``conv1d=True`` (adapters) the linear layers are ``nn.Linear`` and transformers ``Conv1D``;
    callers that handle ``nn.Linear`` only (sparse, compress, projected optimizers) pass
    ``conv1d=False``, and then ``"all-linear"`` on a model with Conv1D layers (GPT-2) or 4-bit
    quantized layers (``rw.quantize``: their weights cannot be written) is an error naming them (it
    would otherwise skip them silently).

    ``layer_types=True`` (``rw.adapt``): explicit targets (suffixes, regex) may also select
    ``nn.Embedding``, ``nn.Conv1d`` and ``nn.Conv2d`` layers (``layer_kind``); ``"all-linear"`` stays
    linear-only, as PEFT's. Whether a method supports them is checked by ``rw.adapt``.

    Raises ``ValueError`` when ``targets`` is not a valid regular expression, when nothing matches,
    when a matched module is not a linear layer or is part of a classification head (``classifier`` /
    ``score``).
    """
    linear_kinds = "nn.Linear / transformers Conv1D" if conv1d else "nn.Linear"
    kinds = linear_kinds + (" / nn.Embedding / nn.Conv1d / nn.Conv2d" if layer_types else "")

    def linear(m: nn.Module) -> bool:
        return is_linear(m) if conv1d else isinstance(m, nn.Linear) and not is_linear4bit(m)

    def wanted(m: nn.Module) -> bool:
        return linear(m) or (layer_types and layer_kind(m) is not None)

    if isinstance(targets, str) and targets == ALL_CONV:
        heads = head_module_names(model)
        convs = [(n, m) for n, m in base_modules(model) if layer_kind(m) == "conv" and not _under_head(n, heads)]
        if not layer_types or not convs:
            what = "no nn.Conv1d / nn.Conv2d module outside the output head" if layer_types else (
                "convolutions, which only adapters (rw.adapt) target")
            raise ValueError(f"targets='all-conv' selects {what}; use 'all-linear', a list of name suffixes, or a "
                             "full-match regex")
        return convs
    if isinstance(targets, str) and targets != ALL_LINEAR:
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets={targets!r} is not a valid regular expression ({e})") from None
    if isinstance(targets, str) and targets == ALL_LINEAR:
        heads = head_module_names(model)
        refused = (  # layers 'all-linear' would silently skip for callers that take nn.Linear only
            (is_conv1d, "transformers Conv1D layers ({}), which are not supported here (nn.Linear only)"),
            (is_linear4bit, "4-bit quantized layers ({}); this method writes the weights it targets and cannot "
                            "write 4-bit ones (only adapters train over a quantized base)"),
        )
        for kind, what in refused if not conv1d else ():
            skipped = [n for n, m in base_modules(model) if kind(m) and not _under_head(n, heads)]
            if skipped:
                more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
                raise ValueError(f"targets='all-linear': this {type(model).__name__} has "
                                 f"{what.format(f'{skipped[:3]}{more}')}; 'all-linear' would silently skip them")
        linears = [(n, m) for n, m in base_modules(model) if linear(m) and not _under_head(n, heads)]
        if not linears:
            raise ValueError(f"targets='all-linear' matched no {linear_kinds} module outside the output head")
        return linears
    if not isinstance(targets, str | list | tuple) or (
        not isinstance(targets, str) and not all(isinstance(t, str) for t in targets)
    ):
        raise ValueError(
            f"targets must be 'all-linear', a regex string or a list of name suffixes, got {targets!r}"
        )
    classifiers = {h for h in head_module_names(model) if set(h.split(".")) & set(CLASSIFIER_NAMES)}
    found: list[tuple[str, nn.Module]] = []
    for name, module in base_modules(model):
        if not name or not name_matches(name, targets):
            continue
        if _under_head(name, classifiers):
            raise ValueError(
                f"targets={targets!r} matched '{name}', part of the classification head; the head is not a "
                "target (adapter methods train it in full); choose targets that leave it out"
            )
        if not wanted(module) and is_linear4bit(module):
            raise ValueError(
                f"targets={targets!r} matched module '{name}' of type Linear4bit (4-bit quantized); this method "
                "writes the weights it targets and cannot write 4-bit ones (only adapters train over a quantized base)"
            )
        if not wanted(module):
            raise ValueError(
                f"targets={targets!r} matched module '{name}' of type {type(module).__name__}; "
                f"only {kinds} modules can be adapted"
            )
        found.append((name, module))
    if not found:
        examples = [n for n, m in base_modules(model) if wanted(m)][:6]
        raise ValueError(
            f"targets={targets!r} matched no module; adaptable modules ({kinds}) look like {examples} "
            "(use 'all-linear', a list of name suffixes, or a full-match regex)"
        )
    return found


def find_parameters(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module, list[str]]]:
    """``(module name, module, [parameter names])`` for every module holding a 3-D parameter (MoE experts,
    stored (experts, out, in), or (experts, in, out) when the module has ``is_transposed``) selected by
    ``names``: ``f"{module}.{parameter}"`` equals an entry or ends with ``"." + entry`` (PEFT's
    ``target_parameters``). The parameters keep the module's registration order.

    Raises ``ValueError`` when ``names`` is not a non-empty list of strings, when nothing matches, or when
    a match is not 3-D or lies in a classification head."""
    if isinstance(names, str) or not isinstance(names, list | tuple) or not names or not all(
        isinstance(n, str) and n for n in names
    ):
        raise ValueError(
            f"target_parameters={names!r} must be a non-empty list of parameter names or suffixes, e.g. "
            "['experts.gate_up_proj', 'experts.down_proj']"
        )
    classifiers = {h for h in head_module_names(model) if set(h.split(".")) & set(CLASSIFIER_NAMES)}
    found: list[tuple[str, nn.Module, list[str]]] = []
    for module_name, module in base_modules(model):
        hits = [p for p, _ in module.named_parameters(recurse=False) if name_matches(f"{module_name}.{p}", names)]
        for p in hits:
            shape = tuple(getattr(module, p).shape)
            if len(shape) != 3 or _under_head(module_name, classifiers):
                why = f"has shape {shape}; only 3-D (experts, out, in) parameters" if len(shape) != 3 else (
                    "is part of the classification head; no head parameter")
                raise ValueError(f"target_parameters={list(names)!r} matched '{module_name}.{p}', which {why} "
                                 "can be targeted")
        if hits:
            found.append((module_name, module, hits))
    if not found:
        examples = [f"{n}.{p}" for n, m in base_modules(model) for p, t in m.named_parameters(recurse=False)
                    if t.dim() == 3][:4]
        raise ValueError(
            f"target_parameters={list(names)!r} matched no parameter; 3-D parameters of this model look like "
            f"{examples or 'nothing (it has none)'}"
        )
    return found


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Return (parent module, attribute name) for the dotted module ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule ``name`` with ``new``; return the old module."""
    parent, child = get_submodule_parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
