"""Hugging Face PEFT interop: write a rankwise adapter as a PEFT LoRA/DoRA directory, and read one.

The on-disk layout is the one ``peft`` 0.21.2 writes with ``PeftModel.save_pretrained``:
``adapter_config.json`` (a ``LoraConfig``) and ``adapter_model.safetensors`` with the keys
``base_model.model.<module>.lora_A.weight`` (r×in), ``...lora_B.weight`` (out×r),
``...lora_magnitude_vector`` (out,) for DoRA, and ``base_model.model.<module>.<param>`` for the
``modules_to_save`` (e.g. a classification head). PEFT's LoRA forward is
``y = W₀x + b + scaling·B(Ax)`` with ``scaling = α/r`` (LoRA, Hu et al. 2021, Eq. 3 and Sec. 4.1)
or ``α/√r`` (``use_rslora``, Kalajdzievski 2023), and its DoRA forward is
``y = (m/‖W₀ + scaling·BA‖_row) ⊙ (W₀ + scaling·BA)x + b`` (Liu et al. 2024, Eq. 5; PEFT
``tuners/lora/layer.py`` and ``variants.py``). ``peft`` itself is not imported here.

Export convention: every adapter layer with factors ``(B, A, s)`` is written as ``lora_B = B``,
``lora_A = A`` with a per-layer ``α`` such that PEFT's ``scaling`` equals ``s``; ranks and alphas
that differ from the most common one go to ``rank_pattern`` / ``alpha_pattern``. A layer whose
initialization moved ``s₀·B₀A₀`` out of the frozen base (PiSSA, OLoRA, LoRA-GA) has the delta
``s·BA − s₀·B₀A₀`` relative to the untouched W₀, written at rank 2r as
``lora_B = [B, −(s₀/s)·B₀]``, ``lora_A = [A; A₀]``, so PEFT loads it onto the original base model.

transformers ``Conv1D`` layers (GPT-2; weight stored (in, out)): PEFT wraps them with
``fan_in_fan_out=True`` and keeps ``lora_A`` (r×in), ``lora_B`` (out×r) as for ``nn.Linear``, applying
the transpose only where it merges ``scaling·B·A`` into the stored weight. PEFT sets the flag per
layer from the module type (a Linear gets False, a Conv1D True, with a warning when the config says
otherwise), so the export writes ``fan_in_fan_out=True`` when an adapted layer is a Conv1D (False
otherwise), and the import accepts either value: the factors mean the same (out, in) ΔW.

``nn.Embedding`` layers: PEFT keeps ``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B``
(embedding_dim, r) (keys without ``.weight``) and adds ``embedding(ids, Aᵀ)·Bᵀ·scaling``: the rankwise
``lora_A`` / ``lora_B`` over the (out, in) = (dim, num_embeddings) view, written as they are; DoRA's
``lora_magnitude_vector`` is (dim,). ``nn.Conv1d`` / ``nn.Conv2d``: ``lora_A.weight`` is a conv kernel
(r, in, *k) (the base's kernel, stride and padding), ``lora_B.weight`` a 1×1 conv (out, r, 1[, 1]): the
rankwise matrices reshaped; DoRA's magnitude is (1, out, 1[, 1]). PEFT's ``lora_A`` conv leaves out the
base's dilation, so a dilated convolution is refused both ways (PEFT's forward would not be its merge).

3-D MoE expert parameters (``target_parameters``, ``adapters.experts``): PEFT wraps the experts module in one
``ParamWrapper`` per targeted parameter, in the module's registration order, each wrapping the previous, so
the last parameter's ``lora_A.weight`` / ``lora_B.weight`` sit at ``<module>`` and each earlier one a
``.base_layer`` deeper; ``lora_A`` is (E·r, in) with expert-major rows, ``lora_B`` (out, r·E) with
expert-minor columns (``experts.to_peft`` / ``from_peft``), ranks and alphas keyed ``<module>.<parameter>``.
The export writes ``target_parameters`` (full names) and ``target_modules`` for the other layers ([] if none).

ConvLoRA's AdaBN layers have no LoRA pair: the export writes each BatchNorm with its target statistics as a
``modules_to_save`` module (PEFT restores the buffers with it); ``import_peft`` reads it back as ``lora``
with the BatchNorms as trained modules.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import nn

from .adapters.base import AdapterLayer, with_offset
from .adapters.experts import ExpertLoRALayer, expert_weight, from_peft, peft_nesting, to_peft
from .adapters.registry import (
    REGISTRY,
    AdapterState,
    MethodSpec,
    adapt,
    adapter_layers,
    adapter_state,
    check_new_name,
    get_method,
)
from .checks import tensor_fits
from .io import adapter_dirs, atomic_directory, save_tensors, write_json
from .layout import module_tensor
from .targets import base_modules, find_parameters, kind_label, layer_kind, matrix_shape

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = {  # model class name suffix -> PEFT task_type
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}
# PEFT LoraConfig options that change the forward in a way rankwise's lora/rslora/dora do not.
UNSUPPORTED_OPTIONS = (
    "lora_bias", "use_qalora", "velora_config", "alora_invocation_tokens",
    "monteclora_config", "layer_replication", "use_bdlora", "arrow_config",
    "kasa_config", "trainable_token_indices", "megatron_config",
)
# init_lora_weights values after which the saved A, B apply to the untouched base weight.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


# ---------------------------------------------------------------------------------------- export
def _tidy(x: float) -> float | int:
    """Drop float noise from a computed alpha (16.000000000000004 -> 16) when it is below 1e-12."""
    y = float(f"{x:.12g}")
    y = y if abs(y - x) <= 1e-12 * abs(x) else x
    return int(y) if y == int(y) else y


def _export_pair(layer: AdapterLayer, name: str, dora: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(lora_B, lora_A, scaling)``: ``scaling·lora_B·lora_A`` is the delta relative to the original W₀
    (LoRA export), or the direction update added to W₀ before DoRA's row normalization (DoRA export,
    where the layer holds ``lora_B``, ``lora_A``, ``scale`` and ``magnitude`` as PEFT's DoRA does)."""
    if dora:
        missing = [a for a in ("lora_A", "lora_B", "scale", "magnitude") if not hasattr(layer, a)]
        if missing:
            raise ValueError(f"layer '{name}' ({layer.method}) lacks {missing} needed by PEFT's DoRA format")
        f: tuple[torch.Tensor, torch.Tensor, float] | None = (
            module_tensor(layer, "lora_B"), module_tensor(layer, "lora_A"), cast(float, layer.scale))
    else:  # a rank-allocating layer exports only its kept ranks (``peft_factors``: AdaLoRA, SoRA)
        f = getattr(layer, "peft_factors", layer.factors)()
    if f is None:
        raise ValueError(
            f"layer '{name}' ({layer.method}) has no low-rank factors, so it cannot be written as a "
            "PEFT LoRA pair; use rw.merge / rw.save_adapter instead"
        )
    if float(f[2]) == 0.0:
        raise ValueError(f"layer '{name}' has scale 0; PEFT cannot represent it with lora_alpha > 0")
    b, a, s = with_offset(f, layer.base_offset_factors())  # ΔW relative to W₀ = s·B·A − s₀·B₀·A₀ (rank 2r)
    return b.detach(), a.detach(), s


def _peft_shapes(module: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
    """The shapes PEFT gives ``lora_A``, ``lora_B`` and DoRA's magnitude over ``module`` at rank r."""
    out_features, in_features = matrix_shape(module)
    if layer_kind(module) == "conv":
        weight = module_tensor(module, "weight")
        kernel, ones = tuple(weight.shape[1:]), (1,) * (weight.dim() - 2)
        return {"lora_A": (r, *kernel), "lora_B": (out_features, r, *ones), "magnitude": (1, out_features, *ones)}
    return {"lora_A": (r, in_features), "lora_B": (out_features, r), "magnitude": (out_features,)}


def _peft_keys(module: nn.Module) -> dict[str, str]:
    """The key suffixes of PEFT's tensors for ``module`` (``lora_embedding_A`` / ``_B`` for an embedding)."""
    if layer_kind(module) == "embedding":
        return {"lora_A": ".lora_embedding_A", "lora_B": ".lora_embedding_B", "magnitude": ".lora_magnitude_vector"}
    return {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight", "magnitude": ".lora_magnitude_vector"}


def _check_dilation(module: nn.Module, name: str, what: str) -> None:
    """PEFT's ``lora_A`` conv is built without the base's dilation: refuse a dilated base (no parity)."""
    dilation = tuple(getattr(module, "dilation", ()))
    if layer_kind(module) == "conv" and any(d != 1 for d in dilation):
        raise ValueError(
            f"{what}: layer '{name}' is a {kind_label(module)} with dilation={dilation}; PEFT's LoRA "
            "conv (lora_A) does not use the base's dilation, so its forward would differ from the adapter's "
            "(supported: dilation 1)"
        )


def _original_module_names(model: nn.Module) -> list[str]:
    """Module names as PEFT sees the un-adapted model: adapter internals (base_layer, ...) are hidden."""
    adapted = [n for n, _ in adapter_layers(model)]
    return [
        n for n, _ in model.named_modules()
        if n and not any(n.startswith(a + ".") for a in adapted)
    ]


def _target_modules(model: nn.Module, layers: list[str], saved: list[str]) -> list[str]:
    """Shortest name suffixes that select exactly ``layers`` under PEFT's rules, else the full names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers})
    candidates = [
        n for n in _original_module_names(model)
        if not any(n == m or n.startswith(m + ".") for m in saved)
    ]
    hit = {n for n in candidates if any(n == t or n.endswith("." + t) for t in suffixes)}
    return suffixes if hit == set(layers) else sorted(layers)


def _task_type(model: nn.Module, saved_modules: list[str]) -> str | None:
    """PEFT task_type from the model class. Task heads other than causal LM make PEFT expect the
    head's weights among ``modules_to_save``; without a trained head, no task_type is declared."""
    cls = type(model).__name__
    task = next((t for suffix, t in TASK_TYPES.items() if cls.endswith(suffix)), None)
    return task if task == "CAUSAL_LM" or saved_modules else None


def _exportable(model: nn.Module, name: str | None) -> tuple[AdapterState, MethodSpec]:
    """Adapter ``name``'s state and method; raises unless the method's delta is a LoRA pair."""
    state = adapter_state(model, name)
    spec = get_method(state.method)
    if spec.export == "none":
        instead = ("rw.merge / rw.merge_and_unload or rw.save_adapter" if spec.mergeable
                   else "rw.save_adapter (its update depends on the input, so it cannot be merged either)")
        raise ValueError(
            f"method '{state.method}' cannot be exported as a PEFT LoRA adapter (its delta is not a LoRA pair); use "
            f"{instead} instead"
        )
    return state, spec


def _export_tensors(
    model: nn.Module, layers: list[tuple[str, AdapterLayer]], saved: list[str], dora: bool, use_rslora: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float | int]]:
    """The file's tensors (every layer's lora_A, lora_B [and magnitude], then the ``modules_to_save``)
    and every layer's rank r_l and alpha α_l = s·r_l (s·√r_l with use_rslora)."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float | int] = {}
    for name, layer in layers:
        inside = [m for m in saved if name.startswith(m + ".")]
        if inside:
            raise ValueError(
                f"trainable module '{inside[0]}' contains the adapted layer '{name}'; PEFT cannot "
                "hold both (adapt with trainable= modules that contain no adapted layer)"
            )
        if isinstance(layer, ExpertLoRALayer):
            _export_experts(layer, name, tensors, ranks, alphas, use_rslora)
            continue
        module_state = layer.peft_module_state()
        if module_state is not None:  # a modules_to_save copy of the base module (AdaBN statistics)
            tensors.update({f"{PREFIX}{name}.{key}": t.detach() for key, t in module_state.items()})
            continue
        _check_dilation(layer.base_layer, name, "export_peft")
        b, a, s = _export_pair(layer, name, dora=dora)
        r = a.shape[0]
        ranks[name] = r
        alphas[name] = _tidy(s * (math.sqrt(r) if use_rslora else r))
        shapes, keys = _peft_shapes(layer.base_layer, r), _peft_keys(layer.base_layer)
        tensors[f"{PREFIX}{name}{keys['lora_A']}"] = a.reshape(shapes["lora_A"])
        tensors[f"{PREFIX}{name}{keys['lora_B']}"] = b.reshape(shapes["lora_B"])
        if dora:
            magnitude = module_tensor(layer, "magnitude").detach()
            tensors[f"{PREFIX}{name}{keys['magnitude']}"] = magnitude.reshape(shapes["magnitude"])
    for name in saved:
        for key, t in model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = t
    return tensors, ranks, alphas


def _export_experts(
    layer: ExpertLoRALayer, name: str, tensors: dict[str, torch.Tensor], ranks: dict[str, int],
    alphas: dict[str, float | int], use_rslora: bool,
) -> None:
    """Add an experts layer's tensors in PEFT's ``ParamWrapper`` layout (``experts.to_peft``, nested as
    ``experts.peft_nesting``) and its rank / alpha under each parameter's key ``<module>.<parameter>``."""
    r = layer.config.r
    for p, where in peft_nesting(layer.parameter_names).items():
        a, b = to_peft(layer.lora_A[p].detach(), layer.lora_B[p].detach())
        tensors[f"{PREFIX}{name}{where}.lora_A.weight"] = a
        tensors[f"{PREFIX}{name}{where}.lora_B.weight"] = b
        ranks[f"{name}.{p}"] = r
        alphas[f"{name}.{p}"] = _tidy(layer.scale * (math.sqrt(r) if use_rslora else r))


def _peft_config(
    model: nn.Module,
    state: AdapterState,
    dora: bool,
    use_rslora: bool,
    ranks: dict[str, int],
    alphas: dict[str, float | int],
    base_model_name_or_path: str | None,
) -> dict[str, Any]:
    """``adapter_config.json``: the most common (rank, alpha) pair as ``r`` / ``lora_alpha``, the other
    layers' values in ``rank_pattern`` / ``alpha_pattern``."""
    layers = adapter_layers(model, state.name)
    saved = list(state.trainable_modules) + [n for n, layer in layers if layer.peft_module_state() is not None]
    (r, lora_alpha), _ = Counter((ranks[n], alphas[n]) for n in ranks).most_common(1)[0]
    experts = [f"{n}.{p}" for n, layer in layers if isinstance(layer, ExpertLoRALayer) for p in layer.parameter_names]
    modules = [n for n in ranks if n not in experts]
    name_or_path = base_model_name_or_path
    if name_or_path is None:
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model, saved),
        "base_model_name_or_path": name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": float(getattr(state.config, "dropout", 0.0)),
        "use_rslora": use_rslora,
        "use_dora": dora,
        "target_modules": _target_modules(model, modules, saved) if modules else [],
        "target_parameters": experts or None,
        "modules_to_save": saved or None,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != lora_alpha},
        "bias": "none",
        "fan_in_fan_out": any(layer.base_transposed for _, layer in layers),
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def export_peft(
    model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None, name: str | None = None
) -> Path:
    """Write the model's adapters as a PEFT LoRA (or DoRA) directory that ``PeftModel.from_pretrained``
    loads onto the original base model and reproduces the rankwise outputs.

    ΔW_PEFT = scaling·lora_B·lora_A with scaling = α_l/r_l (α_l/√r_l with use_rslora) = the layer's s.
    ``name``: the adapter to export; None exports every adapter, in PEFT's ``save_pretrained``
    layout when there are several (``default`` at ``path``, each other adapter in ``path/<name>``,
    loaded by ``PeftModel.load_adapter(path/<name>, adapter_name=<name>)``).
    Raises ``ValueError`` for methods whose delta is not a low-rank product (``export="none"``).
    """
    dirs = adapter_dirs(model, path, name)
    files = {}
    for adapter, where in dirs.items():  # everything checked and built before anything is written
        state, spec = _exportable(model, adapter)
        dora = spec.export == "dora"
        use_rslora = bool(getattr(state.config, "use_rslora", False))
        tensors, ranks, alphas = _export_tensors(
            model, adapter_layers(model, adapter), list(state.trainable_modules), dora, use_rslora
        )
        config = _peft_config(model, state, dora, use_rslora, ranks, alphas, base_model_name_or_path)
        files[where.relative_to(path)] = (config, tensors)
    with atomic_directory(path) as tmp:
        for where, (config, tensors) in files.items():
            (tmp / where).mkdir(parents=True, exist_ok=True)
            write_json(tmp / where / PEFT_CONFIG, config)
            save_tensors(tensors, tmp / where / PEFT_WEIGHTS, metadata={"format": "pt"})
    return Path(path)


# ---------------------------------------------------------------------------------------- import
def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key k with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_config(cfg: dict[str, Any]) -> None:
    if cfg.get("peft_type") != "LORA":
        raise ValueError(
            f"peft_type={cfg.get('peft_type')!r} is not supported; import_peft reads peft_type 'LORA' "
            "(plain LoRA, rsLoRA via use_rslora, DoRA via use_dora)"
        )
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"bias={cfg.get('bias')!r} is not supported; allowed: 'none'")
    for option in UNSUPPORTED_OPTIONS:
        if cfg.get(option):
            raise ValueError(f"{option}={cfg[option]!r} is not supported by import_peft; allowed: unset/False")
    init = cfg.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise ValueError(
            f"init_lora_weights={init!r} is not supported: PEFT changes the base weights on load for it; "
            f"allowed: {list(PLAIN_INITS)} (convert the adapter with PEFT's "
            "path_initial_model_for_weight_conversion first)"
        )


def _split_keys(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{layer: {"lora_A"|"lora_B"|"magnitude": t}}`` and the remaining (modules_to_save) tensors."""
    parts = {
        ".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "magnitude",
        ".lora_embedding_A": "lora_embedding_A", ".lora_embedding_B": "lora_embedding_B",
    }
    layers: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{PEFT_WEIGHTS}: key '{key}' does not start with '{PREFIX}'")
        key = key[len(PREFIX):]
        if ".lora_" in key and not any(key.endswith(p) for p in parts):
            raise ValueError(
                f"target_modules: tensor '{key}' is not a LoRA pair; import_peft supports lora_A/lora_B "
                "(lora_embedding_A/B for nn.Embedding) + lora_magnitude_vector"
            )
        for suffix, part in parts.items():
            if key.endswith(suffix):
                layers.setdefault(key[: -len(suffix)], {})[part] = t
                break
        else:
            rest[key] = t
    return layers, rest


def _saved_modules(model: nn.Module, wanted: list[str] | None, layers: list[str]) -> list[str]:
    """Top-most modules whose name ends with an entry of ``modules_to_save`` (PEFT's rule)."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if not name or not any(name.endswith(w) for w in wanted or []):
            continue
        if any(name.startswith(f + ".") for f in found):
            continue
        if any(lay == name or lay.startswith(name + ".") for lay in layers):
            raise ValueError(f"modules_to_save entry matches '{name}', which also holds LoRA layers")
        found.append(name)
    return found


def _match_saved_tensors(
    model: nn.Module, saved: list[str], rest: dict[str, torch.Tensor], wanted: Any
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pair every non-LoRA tensor of the file with the modules_to_save tensor it restores."""
    pairs, left = [], dict(rest)
    for name in saved:
        for key, target in model.get_submodule(name).state_dict().items():
            t = left.pop(f"{name}.{key}", None)
            if t is not None:
                try:
                    tensor_fits(f"{name}.{key}", t, target)
                except ValueError as e:
                    raise ValueError(f"modules_to_save: {e}") from None
                pairs.append((target, t))
    if left:
        raise ValueError(
            f"modules_to_save: {PEFT_WEIGHTS} has tensors {sorted(left)[:5]} of no module listed in "
            f"modules_to_save={wanted!r}"
        )
    return pairs


def _read_config(path: Path) -> dict[str, Any]:
    """The checked ``adapter_config.json`` of a PEFT directory that also holds ``adapter_model.safetensors``."""
    cfg_file, weights_file = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: not a PEFT adapter directory")
    if not weights_file.is_file():
        raise ValueError(
            f"{weights_file} not found; import_peft reads {PEFT_WEIGHTS} only "
            "(re-save the adapter with safe_serialization=True)"
        )
    cfg = json.loads(cfg_file.read_text())
    _check_config(cfg)
    return cfg


def _layer_rank(module: nn.Module | None, name: str, parts: dict[str, torch.Tensor], use_dora: bool) -> int:
    """The rank of layer ``name``'s tensors, after checking they fit ``module`` (an nn.Linear or a
    transformers Conv1D, whose factors have the same (out, in) shapes; an nn.Embedding with
    ``lora_embedding_A`` / ``_B``; an nn.Conv1d / nn.Conv2d with conv kernels). ``parts`` is rewritten
    to the rankwise matrices: ``lora_A`` (r, in), ``lora_B`` (out, r), ``magnitude`` (out,)."""
    if module is None:
        raise ValueError(f"target_modules: the adapter has layer '{name}', which the model does not have")
    kind = layer_kind(module)
    if kind is None:
        raise ValueError(
            f"target_modules: layer '{name}' is a {type(module).__name__}; import_peft supports nn.Linear, "
            "transformers Conv1D, nn.Embedding, nn.Conv1d and nn.Conv2d"
        )
    _check_dilation(module, name, "import_peft")
    keys = _peft_keys(module)
    names = {"lora_A": keys["lora_A"][1:], "lora_B": keys["lora_B"][1:], "magnitude": "lora_magnitude_vector"}
    embedding_keys = {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}
    wrong = sorted(p for p in parts if p != "magnitude" and (p in embedding_keys) != (kind == "embedding"))
    if wrong:
        raise ValueError(
            f"{PEFT_WEIGHTS}: layer '{name}' is a {kind_label(module)} but has {wrong}; PEFT writes "
            f"{[names['lora_A'], names['lora_B']]} for it"
        )
    for key, part in embedding_keys.items():
        if key in parts:
            parts[part] = parts.pop(key)
    missing = {"lora_A", "lora_B"} - set(parts) | ({"magnitude"} - set(parts) if use_dora else set())
    if missing:
        raise ValueError(f"{PEFT_WEIGHTS}: layer '{name}' lacks {sorted(missing)}")
    if "magnitude" in parts and not use_dora:
        raise ValueError(f"use_dora=False but layer '{name}' has a lora_magnitude_vector")
    r = int(parts["lora_A"].shape[0]) if parts["lora_A"].dim() else 0
    shapes = _peft_shapes(module, r)
    for part, t in parts.items():
        if tuple(t.shape) != shapes[part]:
            raise ValueError(
                f"{PEFT_WEIGHTS}: {part} of layer '{name}' has shape {tuple(t.shape)}, "
                f"expected {shapes[part]} for this model"
            )
    out_features, in_features = matrix_shape(module)
    matrices = {"lora_A": (r, in_features), "lora_B": (out_features, r), "magnitude": (out_features,)}
    parts.update({part: t.reshape(matrices[part]) for part, t in parts.items()})
    return r


def _ranks_and_alphas(
    model: nn.Module, layers: dict[str, dict[str, torch.Tensor]], cfg: dict[str, Any], use_dora: bool
) -> dict[str, dict[str, Any]]:
    """``{layer: {"r": r_l, "alpha": α_l}}``; each rank is checked against ``r`` / ``rank_pattern``."""
    modules = dict(base_modules(model))  # layers holding other adapters count as their base layer
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    per_layer: dict[str, dict[str, Any]] = {}
    for name, parts in layers.items():
        r = _layer_rank(modules.get(name), name, parts, use_dora)
        expected = _pattern_value(rank_pattern, name, r0)
        if r != expected:
            raise ValueError(
                f"rank_pattern / r: layer '{name}' has rank {r} in the weights but the config gives {expected}"
            )
        per_layer[name] = {"r": r, "alpha": _pattern_value(alpha_pattern, name, alpha0)}
    return per_layer


def _expert_layers(
    model: nn.Module, layers: dict[str, dict[str, torch.Tensor]], cfg: dict[str, Any]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """The file's ``target_parameters`` tensors, taken out of ``layers``: ``{module: {"lora_A.<p>": A,
    "lora_B.<p>": B}}`` in the rankwise per-expert layout (``experts.from_peft``) and ``{module: {"r", "alpha"}}``
    (one rank and alpha per experts module, checked against ``r`` / ``rank_pattern``)."""
    names = cfg.get("target_parameters")
    if not names:
        return {}, {}
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    per_layer: dict[str, dict[str, Any]] = {}
    for module_name, module, parameters in find_parameters(model, names):
        parts[module_name] = {}
        for p, where in peft_nesting(parameters).items():
            pair = layers.pop(module_name + where, {})
            if set(pair) != {"lora_A", "lora_B"}:
                raise ValueError(f"{PEFT_WEIGHTS}: target_parameters '{module_name}.{p}' needs lora_A and lora_B "
                                 f"at '{module_name}{where}', found {sorted(pair)}")
            e, out_features, in_features = (int(n) for n in expert_weight(module, p).shape)
            r = _pattern_value(cfg.get("rank_pattern") or {}, f"{module_name}.{p}", r0)
            expected = {"lora_A": (e * r, in_features), "lora_B": (out_features, r * e)}
            for part, t in pair.items():
                if tuple(t.shape) != expected[part]:
                    raise ValueError(f"{PEFT_WEIGHTS}: {part} of '{module_name}.{p}' has shape {tuple(t.shape)}, "
                                     f"expected {expected[part]} ({e} experts, rank {r}) for this model")
            a, b = from_peft(pair["lora_A"], pair["lora_B"], e)
            parts[module_name].update({f"lora_A.{p}": a, f"lora_B.{p}": b})
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, f"{module_name}.{p}", alpha0)
            if per_layer.setdefault(module_name, {"r": r, "alpha": alpha}) != {"r": r, "alpha": alpha}:
                raise ValueError(f"rank_pattern / alpha_pattern give the parameters of '{module_name}' different "
                                 "ranks or alphas; rankwise adapts one experts module with one rank and alpha")
    return parts, per_layer


def _adapt_options(
    per_layer: dict[str, dict[str, Any]], cfg: dict[str, Any], spec: MethodSpec, use_rslora: bool
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``adapt`` options (the most common rank and alpha, dropout, use_rslora) and the per-layer
    ``overrides`` of the layers that differ from them."""
    (r, alpha), _ = Counter((v["r"], v["alpha"]) for v in per_layer.values()).most_common(1)[0]
    overrides = {n: v for n, v in per_layer.items() if (v["r"], v["alpha"]) != (r, alpha)}
    options: dict[str, Any] = {"r": r, "alpha": alpha, "dropout": float(cfg.get("lora_dropout", 0.0))}
    if use_rslora or "use_rslora" in spec.config_cls.field_names():
        options["use_rslora"] = use_rslora
    return options, overrides


def _copy_weights(
    model: nn.Module,
    layers: dict[str, dict[str, torch.Tensor]],
    head_tensors: list[tuple[torch.Tensor, torch.Tensor]],
    use_dora: bool,
    adapter: str,
) -> None:
    """Copy the file's LoRA (and DoRA magnitude) tensors into adapter ``adapter``'s layers and the saved
    modules, after checking every one against its model tensor (shape, floating dtype, finite values)."""
    own = dict(adapter_layers(model, adapter))
    copies = [  # "lora_A", "lora_B", "magnitude"; an experts layer's "lora_A.<parameter>", ...
        (f"{name}.{part}", own[name].get_parameter(part) if "." in part else module_tensor(own[name], part), t)
        for name, parts in layers.items() for part, t in parts.items() if part != "magnitude" or use_dora
    ]
    for key, target, t in copies:
        try:
            tensor_fits(key, t, target)
        except ValueError as e:
            raise ValueError(f"{PEFT_WEIGHTS}: {e}") from None
    with torch.no_grad():
        for _, target, t in copies:
            target.copy_(t)
        for target, t in head_tensors:
            target.copy_(t)
    for layer in own.values():
        layer.after_load()


def import_peft(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Load a PEFT LoRA / rsLoRA / DoRA directory onto ``model`` (the original base, or a model with
    other adapters) as the rankwise ``lora`` / ``rslora`` / ``dora`` adapter ``name``; per-layer
    ranks and alphas become ``overrides``.

    Scale per layer: s = α_l/r_l (α_l/√r_l with use_rslora), as PEFT's ``LoraLayer.update_layer``.
    """
    check_new_name(model, name)
    path = Path(path)
    cfg = _read_config(path)
    use_dora, use_rslora = bool(cfg.get("use_dora")), bool(cfg.get("use_rslora"))
    method = "dora" if use_dora else ("rslora" if use_rslora else "lora")
    if method not in REGISTRY:
        raise ValueError("use_dora=True needs the rankwise method 'dora', which is not registered")
    spec = get_method(method)

    weights_file = path / PEFT_WEIGHTS
    layers, rest = _split_keys(load_file(str(weights_file)))
    experts, expert_ranks = _expert_layers(model, layers, cfg)
    if not layers and not experts:
        raise ValueError(f"{weights_file} holds no lora_A/lora_B tensors")
    per_layer = {**_ranks_and_alphas(model, layers, cfg, use_dora), **expert_ranks}
    options, overrides = _adapt_options(per_layer, cfg, spec, use_rslora)
    if experts:
        options["target_parameters"] = list(cfg["target_parameters"])
    saved = _saved_modules(model, cfg.get("modules_to_save"), list(layers) + list(experts))
    head_tensors = _match_saved_tensors(model, saved, rest, cfg.get("modules_to_save"))
    exact = "|".join(re.escape(n) for n in sorted(layers)) or None  # full-match regex: exactly these layers
    adapt(
        model, method, targets=exact, trainable=saved or None,
        overrides=overrides or None, name=name, _skip_init=True, **options,
    )
    _copy_weights(model, {**layers, **experts}, head_tensors, use_dora, name)
    return model
