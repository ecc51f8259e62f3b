"""Method registry (name -> config class, layer class, defaults) and ``adapt()``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import catalogue, checks
from ..layout import CLASSIFIER_NAMES
from ..quant import keep_exact
from ..targets import Targets, find_parameters, find_targets, matrix_shape, replace_module
from .base import AdapterConfig, AdapterLayer, check_base
from .experts import check_expert_config
from .gradients import estimate_gradients
from .init import InitContext
from .named import AdapterStack, install_batch_hook, layers_of, target_modules

EXPORTS = ("lora", "dora", "none")  # what export_peft writes for a method
_CATALOGUE_EXPORTS = {"lora": "peft-lora", "dora": "peft-dora", "none": "merge"}


@dataclass(frozen=True)
class MethodSpec:
    """One adapter method, as the adapter package registers it in the catalogue: its family, paper
    and one-line mechanism (``summary``), a layer class, its config class and config defaults.
    ``api`` is the method's entry point: ``"adapt"``, or ``"compress"`` for a method whose adapter
    layer is one stage of a compression pipeline (DSEE).

    Methods built from the adapters already on the model (EigenLoRAx, MeteoRA) read them per layer
    from ``ctx.extra["held"]`` (``{adapter name: layer}`` of the target); ``check_model(model, config,
    layer names)`` runs before ``adapt`` changes anything (a ValueError leaves the model as it was).
    ``needs_adapters``: ``adapt`` on a model without such adapters is an error (so the generic test
    matrices, which adapt a bare model, leave the method out). ``mergeable=False`` (with
    ``export="none"``): the delta depends on the input (MeteoRA's routing), there is no ΔW to merge
    either, and the catalogue says the result exports to nothing. ``controller``: for a method that
    changes rank while it trains (AdaLoRA, SoRA), ``controller(model, adapter_name, optimizer,
    total_steps)`` builds its ``RankController``; every training loop attaches it
    (``adapters.rank_control``). ``plan``: for a method whose own data pass over ``init_data`` chooses
    each layer's config (EVA's per-layer ranks), ``plan(model, layer_cfgs, init_data, init_batches)``
    returns ``{layer: (config field overrides, data for the init)}``; it runs instead of the gradient
    estimate, layers it leaves out are not adapted, the fields become per-layer ``overrides`` (saved,
    exported as PEFT's ``rank_pattern`` / ``alpha_pattern``) and the data reaches the init as
    ``ctx.extra["plan"]``. ``needs_validation``: the method fits its own choices on held-out data while it
    trains (AutoLoRA's selection variables, Fast Forward's stopping rule: ``train``'s ``val_loader``), so a
    runner must hold some out of the training data (never the test split)."""

    name: str
    family: str
    paper: str
    config_cls: type[AdapterConfig]
    layer_cls: type[AdapterLayer]
    defaults: dict[str, Any] = field(default_factory=dict)
    export: str = "lora"
    summary: str = ""
    api: str = "adapt"
    check_model: Callable[[nn.Module, AdapterConfig, list[str]], None] | None = None
    needs_adapters: bool = False
    mergeable: bool = True
    controller: Callable[..., Any] | None = None
    plan: Callable[..., dict[str, tuple[dict[str, Any], Any]]] | None = None
    needs_validation: bool = False

    def make_config(self, **kwargs: Any) -> AdapterConfig:
        checks.known_options(kwargs, self.config_cls.field_names(), f"method '{self.name}'")
        return self.config_cls(**{**self.defaults, **kwargs})


#: Every method that injects adapter layers: a view of the catalogue (name -> MethodSpec).
REGISTRY: Mapping[str, MethodSpec] = catalogue.View(lambda r: isinstance(r.spec, MethodSpec), lambda r: r.spec)


def _builder(spec: MethodSpec) -> Callable[..., Any]:
    """``build(model, **options)``: ``rw.adapt``, or ``rw.compress`` (imported when called: compress
    itself imports this package)."""
    if spec.api == "adapt":
        return lambda model, **options: adapt(model, spec.name, **options)
    return lambda model, **options: importlib.import_module("rankwise.compress").compress(model, spec.name, **options)


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the method catalogue (the one list of methods)."""
    checks.choice("export", spec.export, EXPORTS)
    checks.choice("api", spec.api, ("adapt", "compress"))
    catalogue.register(catalogue.MethodRecord(
        spec.name, spec.family, spec.paper, spec.summary, api=spec.api, config=spec.config_cls,
        builder=_builder(spec), exports=_CATALOGUE_EXPORTS[spec.export] if spec.mergeable else "none", spec=spec,
    ))
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(REGISTRY)}")
    return REGISTRY[name]


def needs_validation(method: str) -> bool:
    """Whether ``method`` is an adapter that fits its own choices on held-out data while training
    (``MethodSpec.needs_validation``); False for any other name ('none', 'head', an unknown one)."""
    spec = REGISTRY.get(method)
    return spec is not None and spec.needs_validation


@dataclass
class AdapterState:
    """What ``adapt`` did to a model for one named adapter; ``model.rankwise_adapters`` maps each
    adapter name to its state, in the order the adapters were added.

    ``trainable_originals``: a copy of the ``trainable_modules``' state (e.g. the classification
    head) as ``adapt`` found it, ``{module name: state_dict}``, so ``adapters_disabled`` can run the
    original base model (only those small modules are copied)."""

    method: str
    config: AdapterConfig
    layers: list[str]
    trainable_modules: list[str]
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-layer config fields
    trainable_originals: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    name: str = "default"
    active: bool = True  # runs in the forward (``rw.set_active``)


def adapter_states(model: nn.Module) -> dict[str, AdapterState]:
    """``{adapter name: AdapterState}`` of every adapter on ``model`` (empty when there is none)."""
    return getattr(model, "rankwise_adapters", None) or {}


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(adapter_states(model))


def adapter_state(model: nn.Module, name: str | None = None) -> AdapterState:
    """The state of adapter ``name``; ``name=None`` means the model's only adapter."""
    states = adapter_states(model)
    if not states:
        raise ValueError("model has no rankwise adapters (call rw.adapt first)")
    if name is None:
        if len(states) > 1:
            raise ValueError(f"model has several adapters {list(states)}; pass name= one of them")
        return next(iter(states.values()))
    if name not in states:
        raise ValueError(f"adapter name={name!r} is not on the model; its adapters are {list(states)}")
    return states[name]


def adapter_layers(model: nn.Module, name: str | None = None) -> list[tuple[str, AdapterLayer]]:
    """``(target layer name, adapter layer)`` for every adapter layer (of adapter ``name`` only, if
    given). With several adapters on a layer, the target name repeats once per adapter."""
    if name is not None:
        adapter_state(model, name)  # a clear error for an unknown name
    return [
        (target, layer)
        for target, module in target_modules(model)
        for adapter, layer in layers_of(module).items()
        if name is None or adapter == name
    ]


def _trainable_module_names(model: nn.Module, trainable: str | Iterable[str] | None) -> list[str]:
    """Modules trained in full next to the adapters. "auto": a classification head, if any."""
    if trainable is None:
        return []
    if trainable == "auto":
        return [n for n, _ in model.named_children() if n in CLASSIFIER_NAMES]
    wanted = [trainable] if isinstance(trainable, str) else list(trainable)
    found = [n for n, _ in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in wanted)]
    if not found:
        raise ValueError(f"trainable={wanted!r} matched no module of the model")
    return found


def _check_overrides(
    overrides: dict[str, dict[str, Any]] | None, found: list[tuple[str, nn.Module]]
) -> dict[str, dict[str, Any]]:
    """A copy of ``overrides`` (``{}`` for None); raises unless it maps adapted layer names to dicts."""
    if overrides is not None and (
        not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values())
    ):
        raise ValueError(f"overrides={overrides!r} must be a dict {{layer name: {{config field: value}}}}")
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    unknown_layers = sorted(set(overrides) - {n for n, _ in found})
    if unknown_layers:
        raise ValueError(
            f"overrides name layer(s) {unknown_layers[:5]} that are not adapted; "
            f"allowed keys are the adapted layer names, e.g. {[n for n, _ in found][:4]}"
        )
    return overrides


def _check_ranks(found: list[tuple[str, nn.Module]], layer_cfgs: dict[str, AdapterConfig]) -> None:
    """Every layer's rank r <= min(in_features, out_features) of its (out, in) matrix."""
    for name, lin in found:
        limit = min(matrix_shape(lin))
        r = layer_cfgs[name].r
        if r > limit:
            raise ValueError(
                f"r={r} is larger than min(in_features, out_features)={limit} of '{name}'; "
                f"choose r <= {limit}"
            )


def _init_gradients(
    model: nn.Module,
    spec: MethodSpec,
    layer_cfgs: dict[str, AdapterConfig],
    init_data: Iterable | None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    init_batches: int,
) -> dict[str, torch.Tensor]:
    """Estimated gradients of the target weights when the method initializes from them, else ``{}``."""
    if not any(spec.layer_cls.needs_grad(c) for c in layer_cfgs.values()):
        return {}
    if init_data is None:
        raise ValueError(
            f"method '{spec.name}' initializes from gradients and needs init_data "
            "(an iterable of batches, e.g. a DataLoader)"
        )
    return estimate_gradients(model, list(layer_cfgs), init_data, loss_fn=loss_fn, max_batches=init_batches)


def _inject(
    model: nn.Module,
    spec: MethodSpec,
    cfg: AdapterConfig,
    found: list[tuple[str, nn.Module]],
    layer_cfgs: dict[str, AdapterConfig],
    grads: dict[str, torch.Tensor],
    skip_init: bool,
    adapter_name: str,
    planned: dict[str, Any] | None = None,
) -> None:
    """Freeze every parameter, then give each target layer its (initialized) adapter layer: it
    replaces a plain Linear, or joins the layer's other adapters in an ``AdapterStack``."""
    for p in model.parameters():
        p.requires_grad_(False)
    shared = spec.layer_cls.build_shared(cfg, [lin for _, lin in found])
    for name, lin in found:
        ctx = InitContext(
            name=name, grad=grads.pop(name, None), skip=skip_init, extra={"shared": shared}, config=layer_cfgs[name]
        )
        current = model.get_submodule(name)
        held = layers_of(current) if isinstance(current, AdapterLayer | AdapterStack) else {}
        ctx.extra.update(adapter=adapter_name, held=held)
        if planned and name in planned:
            ctx.extra["plan"] = planned[name]
        layer = spec.layer_cls(lin, layer_cfgs[name], ctx)
        layer.adapter_name = adapter_name
        if isinstance(current, AdapterStack):
            current.add(adapter_name, layer)
        elif isinstance(current, AdapterLayer):
            replace_module(model, name, AdapterStack(lin, {current.adapter_name: current, adapter_name: layer}))
        else:
            replace_module(model, name, layer)


def _check_stacking(
    model: nn.Module, spec: MethodSpec, found: list[tuple[str, nn.Module]], layer_cfgs: dict[str, AdapterConfig],
    name: str,
) -> None:
    """Before anything changes: a layer that already holds adapters takes the new one only when both
    can share the base (neither rewrites nor replaces it)."""
    for target, base in found:
        current = model.get_submodule(target)
        if not isinstance(current, AdapterLayer | AdapterStack):
            continue
        held = layers_of(current)
        fixed = [f"'{n}' ({layer.method})" for n, layer in held.items() if not layer.stackable]
        if fixed or not spec.layer_cls.stackable:
            who = fixed[0] if fixed else f"method '{spec.name}'"
            raise ValueError(f"adapter {who} rewrites the base weight of '{target}' and cannot share it with other "
                             f"adapters (adding {name!r})")
        if spec.layer_cls.replaces_base(layer_cfgs[target], base):
            raise ValueError(
                f"method '{spec.name}' replaces the base layer of '{target}' (it quantizes it), which adapters "
                f"{list(held)} share; to put several adapters on a 4-bit base, rw.quantize(model) first and add "
                f"them with plain methods (lora, dora, ...)"
            )


#: (module name, experts module, its targeted 3-D parameter names)
Experts = list[tuple[str, nn.Module, list[str]]]


def parameter_methods() -> list[str]:
    """The methods that adapt 3-D expert parameters (``target_parameters``) with their defaults."""
    return sorted(n for n, s in REGISTRY.items() if s.api == "adapt" and "target_parameters" in
                  s.config_cls.field_names() and s.layer_cls.parameter_layer(s.make_config()) is not None)


def _refuse_parameters(spec: MethodSpec, cfg: AdapterConfig | None = None) -> None:
    """ValueError naming the method and ``target_parameters`` when ``spec`` (with ``cfg``) cannot adapt them."""
    fits = "target_parameters" in spec.config_cls.field_names()
    if fits and cfg is not None and spec.layer_cls.parameter_layer(cfg) is not None:
        return
    raise ValueError(
        f"method '{spec.name}' does not support target_parameters (LoRA on 3-D MoE expert parameters, with "
        f"the default init on a full-precision base); supported methods: {parameter_methods()}"
    )


def _experts(model: nn.Module, spec: MethodSpec, cfg: AdapterConfig) -> Experts:
    """The experts modules and parameters ``cfg.target_parameters`` selects ([] when it is unset)."""
    names = getattr(cfg, "target_parameters", None)
    if names is None:
        return []
    _refuse_parameters(spec, cfg)
    found = find_parameters(model, names)
    for module_name, _, _ in found:
        if isinstance(model.get_submodule(module_name), AdapterLayer | AdapterStack):
            raise ValueError(f"the experts module '{module_name}' already holds an adapter; expert parameters "
                             "take one adapter (delete it first with rw.delete_adapter)")
    return found


def _companions(model: nn.Module, spec: MethodSpec, cfg: AdapterConfig) -> list[tuple[str, nn.Module, type]]:
    """The method's layers beside its targets (``AdapterLayer.companions``), checked to hold no adapter yet."""
    found = spec.layer_cls.companions(model, cfg)
    for module_name, _, _ in found:
        if isinstance(model.get_submodule(module_name), AdapterLayer | AdapterStack):
            raise ValueError(f"method '{spec.name}' adapts '{module_name}', which already holds an adapter "
                             "(delete it first with rw.delete_adapter)")
    return found


def _module_targets(targets: Targets | None, experts: Experts) -> Targets | None:
    """``targets`` without the experts modules (a saved adapter lists them among its layers); None when
    nothing is left beside ``target_parameters`` (``targets=[]`` or None selects no module)."""
    if not experts:
        return targets
    if targets is None or isinstance(targets, str):
        return targets
    left = [t for t in targets if t not in {n for n, _, _ in experts}]
    return left or None


def _inject_experts(
    model: nn.Module, spec: MethodSpec, experts: Experts, cfgs: dict[str, AdapterConfig], skip: bool, name: str
) -> None:
    """Replace each experts module by its per-expert LoRA layer (``adapters.experts``)."""
    for module_name, module, parameters in experts:
        layer_cls = spec.layer_cls.parameter_layer(cfgs[module_name])
        if layer_cls is None:
            _refuse_parameters(spec, cfgs[module_name])
        ctx = InitContext(name=module_name, skip=skip, config=cfgs[module_name])
        layer = layer_cls(module, cfgs[module_name], ctx, parameters)  # type: ignore[misc, call-arg]
        layer.adapter_name = name
        replace_module(model, module_name, layer)


def check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or name == "__base__" or "." in name or "/" in name:
        raise ValueError(
            f"name={name!r} is not a valid adapter name; use a non-empty string without '.' or '/' "
            "(and not '__base__', which means the base model in adapter_names)"
        )
    if name in adapter_states(model):
        raise ValueError(
            f"the model already has an adapter named {name!r}; choose another name= or call "
            f"rw.delete_adapter(model, {name!r}) first (adapters: {adapter_names(model)})"
        )


def adapt(
    model: nn.Module,
    method: str,
    targets: Targets | None = "all-linear",
    *,
    init_data: Iterable | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    init_batches: int = 8,
    trainable: str | Iterable[str] | None = "auto",
    overrides: dict[str, dict[str, Any]] | None = None,
    name: str = "default",
    _skip_init: bool = False,
    **config: Any,
) -> nn.Module:
    """Inject ``method`` adapters into ``model`` in place, freeze everything else, return ``model``.

    ``name``: the adapter's name. A model can hold several named adapters (any mix of methods,
    each on its own targets); the new one is active and trainable, the earlier ones stay active
    and are frozen (``rw.set_active`` chooses what runs and trains, ``rw.delete_adapter`` removes
    one). Inits that move part of W₀ out of the base (PiSSA, ...) read the base as the earlier
    adapters left it.

    ``targets``: ``"all-linear"`` (output heads excluded), a full-match regex, or a list of name
    suffixes; they select ``nn.Linear`` and transformers ``Conv1D`` layers (GPT-2), which every
    method adapts through the same (out, in) view of the weight (``AdapterLayer.base_weight``).
    Suffixes and regexes may also select ``nn.Embedding``, ``nn.Conv1d`` and ``nn.Conv2d`` layers
    (``"all-linear"`` never does; ``"all-conv"`` selects every convolution) for the methods that support
    them (``AdapterLayer.base_kinds``: lora, rslora, pissa, olora, dora, convlora); any other method is a
    ValueError before the model changes. Some methods adapt further layers themselves
    (``AdapterLayer.companions``: convlora's AdaBN statistics on every BatchNorm).
    ``target_parameters`` (a config field of lora, rslora, loraplus, flora_batched): names or suffixes of
    3-D MoE expert parameters (``["experts.gate_up_proj", "experts.down_proj"]``, PEFT's rule) that get one
    LoRA pair per expert, ΔW[e] = s·B[e]·A[e] (``adapters.experts``); ``targets=[]`` or None then adapts
    no module besides them. Other methods refuse it (ValueError naming the method).
    ``init_data``: batches for data-driven inits (LoRA-GA, LoRA-SB); ``loss_fn(model,
    batch)`` defaults to ``model(**batch).loss``. ``trainable``: modules trained in full beside the
    adapters ("auto" = the classification head ``classifier``/``score`` when the model has one).
    ``overrides``: ``{full layer name: {field: value}}`` config fields for single layers (e.g. a
    per-layer rank ``{"encoder.layer.0.attention.self.query": {"r": 16}}``); shared tensors
    (``build_shared``) are still built from the global config.

    ``adapter_dtype`` (every method's config field): dtype of the adapter tensors, ``torch.float32``
    by default on any base, also over a bf16 / fp16 model (as PEFT's ``autocast_adapter_dtype``):
    the base GEMM runs in the base dtype, the delta in the adapter dtype, and each layer's output
    has the base dtype. ``None`` or ``"base"``: the base layer's dtype; names ("float32",
    "bfloat16", "float16", "float64") or torch dtypes are accepted, anything else is a ValueError.
    A float64 base with the default gets float32 adapters: pass ``adapter_dtype=None`` to keep fp64.
    """
    check_new_name(model, name)
    if any(layer.merged for _, layer in adapter_layers(model)):
        raise ValueError(f"the model's adapters are merged; call rw.unmerge(model) before adding adapter {name!r}")
    spec = get_method(method)
    if config.get("target_parameters") is not None and "target_parameters" not in spec.config_cls.field_names():
        _refuse_parameters(spec)
    cfg = spec.make_config(**config)
    experts = _experts(model, spec, cfg)
    module_targets = _module_targets(targets, experts)
    found = [] if module_targets is None and experts else find_targets(model, module_targets, layer_types=True)
    overrides = _check_overrides(overrides, found + [(n, m) for n, m, _ in experts])
    layer_cfgs = {
        n: spec.make_config(**{**config, **overrides[n]}) if n in overrides else cfg for n, _ in found
    }
    expert_cfgs = {
        n: spec.make_config(**{**config, **overrides[n]}) if n in overrides else cfg for n, _, _ in experts
    }
    for n, module, parameters in experts:
        check_expert_config(expert_cfgs[n], n, module, parameters)
    companions = _companions(model, spec, cfg)
    for n, module in found:  # the method supports every target's layer type, before anything changes
        check_base(spec.layer_cls, layer_cfgs[n], module, n, spec.name)
    _check_stacking(model, spec, found, layer_cfgs, name)
    planned: dict[str, Any] = {}
    if spec.plan is not None and not _skip_init:  # the method's own data pass chooses per-layer fields
        plan = spec.plan(model, layer_cfgs, init_data, init_batches)
        found = [(n, m) for n, m in found if n in plan]
        for n, (fields, data) in plan.items():
            if fields:
                overrides[n] = {**overrides.get(n, {}), **fields}
            planned[n] = data
        overrides = {n: v for n, v in overrides.items() if n in plan or n in expert_cfgs}
        layer_cfgs = {n: spec.make_config(**{**config, **overrides[n]}) if n in overrides else cfg for n, _ in found}
    _check_ranks(found, layer_cfgs)
    if spec.check_model is not None and not _skip_init:
        spec.check_model(model, cfg, [n for n, _ in found])
    trainable_names = _trainable_module_names(model, trainable)
    names = [n for n, _ in found] + [n for n, _, _ in experts]
    own_data = _skip_init or spec.plan is not None
    grads = {} if own_data else _init_gradients(model, spec, layer_cfgs, init_data, loss_fn, init_batches)
    _inject(model, spec, cfg, found, layer_cfgs, grads, _skip_init, name, planned)
    _inject_experts(model, spec, experts, expert_cfgs, _skip_init, name)
    for module_name, module, layer_cls in companions:
        layer = layer_cls(module, cfg, InitContext(name=module_name, skip=_skip_init, config=cfg))
        layer.adapter_name = name
        replace_module(model, module_name, layer)
    for full in trainable_names:
        for p in model.get_submodule(full).parameters():
            p.requires_grad_(True)
    originals = {
        full: {k: t.detach().clone() for k, t in model.get_submodule(full).state_dict().items()}
        for full in trainable_names
    }
    state = AdapterState(method, cfg, names, trainable_names, overrides, originals, name)
    model.rankwise_adapters = {**adapter_states(model), name: state}  # type: ignore[assignment]  # Module attribute
    keep_exact(model)  # its 4-bit layers, ours or from_pretrained's: exact and differentiable after an evaluation
    install_batch_hook(model)
    return model
