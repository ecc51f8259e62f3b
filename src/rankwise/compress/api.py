"""``rw.compress(model, method, ratio=...)``, recovery fine-tuning, and the compressed-model format.

``ratio`` is the kept fraction of the *targeted weight-matrix entries* (biases, embeddings and
norms are never compressed and not counted). What "kept" means per method:

* ``svd``, ``lord``, ``pela``, ``welore`` — a factorized matrix keeps ``r·(out + in)`` weights, a
  dense one ``out·in``;
* ``loraprune`` — the weights of the shrunk matrices: pruned heads/channels are physically removed
  (smaller ``nn.Linear`` layers, fewer heads; the targets are every block's attention and MLP linears);
* ``slicegpt`` — ``ratio`` is the kept fraction of the hidden width (1 − the slicing fraction); the
  weights reported are those of the shrunk block linears plus the added shortcut matrices;
* ``dsnot`` — the non-zero weights (``⌊(1 − ratio)·in⌋`` entries pruned in every row);
* ``ecoflap`` — the non-zero weights (block sparsities differ, their weighted mean is ``1 − ratio``);
* ``dsee`` — the non-zero weights after magnitude pruning (with ``structure="heads"``, ``1 − ratio``
  is the fraction of heads pruned in each attention block; ``kept_fraction`` still reports the
  non-zero fraction of the targeted weights);
* ``modegpt`` — the weights of the shrunk block linears (every module's inner dimension is ``ratio`` of its
  size: MLP channels, per-head query/key and value widths; layout ``modular`` in the saved file);
* ``spqr`` — quantization keeps every entry: ``ratio`` is not used, the size is
  ``details["bits_per_param"]`` (dequantized weights are stored, see docs/compress.md).

Compressed-model format (``save_compressed``): a directory with the Hugging Face ``config.json``,
``model.safetensors`` (the full state dict, factor pairs as ``<layer>.U`` / ``<layer>.V``),
``rankwise_compressed.json`` (method, ratio, per-layer ranks, architecture class; for ``loraprune``
the ``resized`` layout: each shrunk linear's in/out features and bias, each attention / MLP module's
kept head counts and sizes; for ``slicegpt`` its ``sliced`` widths) and, if given, the tokenizer.
``load_compressed`` rebuilds the architecture from the config, applies the resized layout, swaps in
the factorized layers and loads the tensors (strict), without any hub access.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from .. import catalogue
from ..adapters import DSEEConfig, adapt, adapter_layers, merge_and_unload
from ..batches import LossFn
from ..checks import choice, fraction, integer, known_options, tensors_fit
from ..io import atomic_directory, save_tensors, write_json
from ..layout import find_blocks, module_tensor
from ..targets import Targets, find_targets, replace_module
from .dsee import dsee_finetune
from .dsnot import DSnoTConfig, dsnot
from .ecoflap import ECoFLaPConfig, ecoflap
from .factorized import empty_factorized, factorized_layers
from .finetune import finetune
from .loraprune import LoRAPruneConfig, loraprune, loraprune_recover
from .lord import lord_compress
from .modegpt import MoDeGPTConfig, apply_modular_layout, modegpt
from .pela import PELAConfig, pela_compress, pela_distill
from .resize import apply_layout
from .slicegpt import SliceGPTConfig, apply_sliced_layout, slicegpt
from .spqr import SpQRConfig, spqr
from .svd import SVDCache, factorize_layers, shapes_of, svd_ranks
from .welore import welore_compress, welore_finetune_params

ONE_SHOT = ("svd", "welore", "lord", "slicegpt", "dsnot", "ecoflap", "spqr", "modegpt")
COMPRESSED_CONFIG = "rankwise_compressed.json"
COMPRESSED_WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2  # 2: adds the resized-layer layout (loraprune)


#: Every compression method (name -> catalogue record), DSEE included: a view of the catalogue.
COMPRESS_METHODS: Mapping[str, catalogue.MethodRecord] = catalogue.View(lambda r: r.api == "compress", lambda r: r)


@dataclass
class CompressState:
    """What ``compress`` did; stored as ``model.rankwise_compress``."""

    method: str
    ratio: float
    targets: list[str]
    ranks: dict[str, int | None] = field(default_factory=dict)  # factorized layers; None = kept dense
    weights_before: int = 0  # targeted weight entries before
    weights_after: int = 0  # ... after (factor entries, kept entries of shrunk matrices, or non-zero entries)
    details: dict[str, Any] = field(default_factory=dict)
    resized: dict[str, Any] = field(default_factory=dict)  # loraprune: remove_pruned_units' layout (shapes, heads)

    @property
    def kept_fraction(self) -> float:
        return self.weights_after / max(self.weights_before, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (in-memory extras such as per-step histories are left out)."""
        details = {k: v for k, v in self.details.items() if not k.startswith("_") and k not in ("history", "distill")}
        return {"method": self.method, "ratio": self.ratio, "targets": list(self.targets), "ranks": dict(self.ranks),
                "weights_before": self.weights_before, "weights_after": self.weights_after,
                "kept_fraction": self.kept_fraction, "details": json.loads(json.dumps(details, default=str)),
                "resized": self.resized}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressState:
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in keys})


def compressed_state(model: nn.Module) -> CompressState:
    state = getattr(model, "rankwise_compress", None)
    if state is None:
        raise ValueError("model was not compressed with rw.compress")
    return state


def _weights(model: nn.Module, names: Iterable[str]) -> int:
    total = 0
    for name in names:
        module = model.get_submodule(name)
        factors = ("weight",) if isinstance(module, nn.Linear) else ("U", "V")  # nn.Linear or FactorizedLinear
        total += sum(module_tensor(module, f).numel() for f in factors)
    return total


def _check_config(method: str, config: dict[str, Any], allowed_keys: Iterable[str]) -> None:
    known_options(config, allowed_keys, f"method '{method}'")


def compress(
    model: nn.Module,
    method: str,
    ratio: float = 0.5,
    targets: Targets = "all-linear",
    *,
    data: Iterable | None = None,
    steps: int = 0,
    loss_fn: LossFn | None = None,
    cache: SVDCache | None = None,
    progress: bool = False,
    **config: Any,
) -> nn.Module:
    """Compress ``model`` in place with ``method`` so the targeted weights keep ``ratio`` of their
    entries; returns ``model`` (with ``model.rankwise_compress`` describing the result).

    ``svd``/``lord``/``welore``/``pela`` are one-shot factorizations (``rank=`` fixes one rank for
    ``svd``/``lord``/``pela``; ``min_reduction=`` for ``welore``); ``lord`` with ``data`` (and
    ``steps=0``) decomposes the layer outputs on those batches instead of the weights; ``pela`` with ``data`` and
    ``steps > 0`` then runs its distillation stage (options of :class:`~.pela.PELAConfig`).
    ``loraprune`` needs ``data`` and ``steps`` (options of :class:`~.loraprune.LoRAPruneConfig`) and
    returns a physically smaller model (pruned heads and channels removed);
    ``dsee`` trains ``steps`` steps on ``data`` (``steps=0``: prune at once; adapter options of
    :class:`~rankwise.adapters.DSEEConfig` plus ``lr`` and ``prune_at``). ``cache`` reuses SVDs across calls.
    """
    ratio = fraction("ratio", ratio)
    choice("method", method, sorted(COMPRESS_METHODS))
    if getattr(model, "rankwise_compress", None) is not None:
        raise ValueError("model is already compressed (model.rankwise_compress is set)")
    if getattr(model, "rankwise_adapters", None):
        raise ValueError("model has rankwise adapters; merge or unload them (rw.merge_and_unload) before compressing")
    integer("steps", steps, 0)
    if method in ONE_SHOT and steps:
        note = " (data=... makes lord data-aware)" if method == "lord" else ""
        raise ValueError(f"method '{method}' is one-shot: steps must be 0{note}; use recover() to fine-tune")
    if steps > 0 and data is None:
        raise ValueError(f"method '{method}' trains for steps={steps} and needs data=... (an iterable of batches)")
    request = Request(ratio, targets, data, steps, loss_fn, cache if cache is not None else SVDCache(), progress,
                      dict(config))
    state = _runner(method)(model, request)
    model.rankwise_compress = state  # type: ignore[assignment]  # Module attribute
    return model


@dataclass
class Request:
    """What ``compress`` was asked: every method's runner gets the same one."""

    ratio: float
    targets: Targets
    data: Iterable | None
    steps: int
    loss_fn: LossFn | None
    cache: SVDCache
    progress: bool
    config: dict[str, Any]


def _factorized(model: nn.Module, method: str, req: Request,
                factorize: Callable[[list[tuple[str, nn.Linear]]], tuple[Mapping[str, int | None], dict[str, Any]]]
                ) -> CompressState:
    """The state of a factorizing method: ``factorize(targets) -> (ranks, details)`` replaces the layers."""
    found = find_targets(model, req.targets, conv1d=False)
    names = [n for n, _ in found]
    before = _weights(model, names)
    ranks, details = factorize(found)
    ranks = {n: ranks.get(n) for n in names}
    return CompressState(method, req.ratio, names, ranks, before, _weights(model, names), details)


def _svd(model: nn.Module, req: Request) -> CompressState:
    _check_config("svd", req.config, ("rank",))
    return _factorized(model, "svd", req, lambda found: (factorize_layers(
        model, svd_ranks(shapes_of(found), req.ratio, req.config.get("rank")), req.cache, req.progress), {}))


def _welore(model: nn.Module, req: Request) -> CompressState:
    _check_config("welore", req.config, ("min_reduction",))

    def factorize(found):
        plan, ranks = welore_compress(model, req.ratio, req.targets, req.cache, req.progress, **req.config)
        return ranks, {"threshold": plan.threshold, "lrc": plan.lrc, "nlrc": plan.nlrc, "reductions": plan.reductions}

    return _factorized(model, "welore", req, factorize)


def _lord(model: nn.Module, req: Request) -> CompressState:
    _check_config("lord", req.config, ("rank",))
    return _factorized(model, "lord", req, lambda found: (
        lord_compress(model, req.ratio, req.targets, req.cache, req.progress, calibration=req.data, **req.config),
        {"decomposition": "output-covariance" if req.data is not None else "svd"}))


def _pela(model: nn.Module, req: Request) -> CompressState:
    _check_config("pela", req.config, PELAConfig.__dataclass_fields__)
    cfg = PELAConfig(**req.config)

    def factorize(found):
        teacher = copy.deepcopy(model) if (req.steps > 0 and req.data is not None) else None
        ranks = pela_compress(model, req.ratio, req.targets, req.cache, req.progress, rank=cfg.rank)
        if teacher is None:
            return ranks, {}
        kw = {k: v for k, v in asdict(cfg).items() if k != "rank"}
        return ranks, {"distill": pela_distill(model, teacher, req.data, req.steps, progress=req.progress, **kw)}

    return _factorized(model, "pela", req, factorize)


def _loraprune(model: nn.Module, req: Request) -> CompressState:
    if not (isinstance(req.targets, str) and req.targets == "all-linear"):
        raise ValueError(
            "targets must be 'all-linear' for loraprune: it prunes whole heads and MLP channels of every block"
        )
    _check_config("loraprune", req.config, [*LoRAPruneConfig.__dataclass_fields__, "trainable", "on_target"])
    if req.data is None or req.steps < 1:
        raise ValueError("loraprune needs data=... and steps >= 1: importance comes from LoRA gradients while training")
    names = [n for b in find_blocks(model, "LoRAPrune") for n in b.names]
    before = _weights(model, names)
    prune_state, history, layout = loraprune(model, req.data, req.ratio, req.steps, loss_fn=req.loss_fn,
                                             progress=req.progress, **req.config)
    details = {**prune_state.to_dict(), "history": history}
    return CompressState("loraprune", req.ratio, names, {}, before, _weights(model, names), details, layout)


def _dsee(model: nn.Module, req: Request) -> CompressState:
    train_keys = ("lr", "prune_at", "trainable")
    config = req.config
    _check_config("dsee", config, [*DSEEConfig.field_names(), *train_keys])
    adapter_cfg = {k: v for k, v in config.items() if k not in train_keys}
    adapt(model, "dsee", targets=req.targets, trainable=config.get("trainable", "auto"), **adapter_cfg)
    layers = adapter_layers(model)
    names = [n for n, _ in layers]
    before = sum(layer.base_weight.numel() for _, layer in layers)
    history = dsee_finetune(model, req.data or [], req.steps, 1.0 - req.ratio, config.get("prune_at", 0.5),
                            config.get("lr", 1e-3), req.loss_fn, req.progress)
    merge_and_unload(model)
    after = sum(int(module_tensor(model.get_submodule(n), "weight").count_nonzero()) for n in names)
    nnz = DSEEConfig(**adapter_cfg).nnz
    return CompressState("dsee", req.ratio, names, {}, before, after, {"nnz": nnz, "history": history})


def _block_linears(model: nn.Module, req: Request, method: str, options: Iterable[str], why: str,
                   needs: str) -> tuple[list[str], int]:
    """The checks of a calibrated method that restructures every block, then its block linears and their
    weight count: ``why`` it needs all of them, what it ``needs`` the data for."""
    if not (isinstance(req.targets, str) and req.targets == "all-linear"):
        raise ValueError(f"targets must be 'all-linear' for {method}: it {why}")
    _check_config(method, req.config, options)
    if req.data is None:
        raise ValueError(f"{method} needs data=...: calibration batches for {needs}")
    names = [n for b in find_blocks(model, method) for n in b.names]
    return names, _weights(model, names)


def _slicegpt(model: nn.Module, req: Request) -> CompressState:
    names, before = _block_linears(model, req, "slicegpt", SliceGPTConfig.__dataclass_fields__,
                                   "slices the hidden width of the whole model", "the PCA of each block's input")
    layout = slicegpt(model, req.data or [], req.ratio, req.progress, **req.config)
    shortcuts = [f"model.layers.{i}.{s}" for i in range(len(layout["dims"])) for s in ("attn_shortcut", "mlp_shortcut")]
    details = {"hidden_size": layout["hidden_size"], "width": layout["width"],
               "shortcut_weights": _weights(model, shortcuts)}
    return CompressState("slicegpt", req.ratio, names, {}, before, _weights(model, names + shortcuts), details,
                         {"sliced": layout})


def _calibrated_pruning(model: nn.Module, req: Request, method: str, options: Iterable[str], needs: str,
                        prune: Callable[[list[str]], dict[str, Any]], dense: bool = False) -> CompressState:
    """The state of a method that prunes (or, ``dense``, quantizes: every entry kept) the targets in
    place on calibration data: ``prune(names) -> details``."""
    _check_config(method, req.config, options)
    if req.data is None:
        raise ValueError(f"{method} needs data=...: calibration batches for {needs}")
    names = [n for n, _ in find_targets(model, req.targets, conv1d=False)]
    before = _weights(model, names)
    details = prune(names)
    after = before if dense else sum(int(module_tensor(model.get_submodule(n), "weight").count_nonzero())
                                     for n in names)
    return CompressState(method, req.ratio, names, {}, before, after, details)


def _dsnot(model: nn.Module, req: Request) -> CompressState:
    return _calibrated_pruning(model, req, "dsnot", DSnoTConfig.__dataclass_fields__,
                               "the input statistics of every layer",
                               lambda names: dsnot(model, req.data or [], req.ratio, set(names), req.progress,
                                                   **req.config))


def _ecoflap(model: nn.Module, req: Request) -> CompressState:
    return _calibrated_pruning(model, req, "ecoflap", ECoFLaPConfig.__dataclass_fields__,
                               "the zeroth-order scores and Wanda",
                               lambda names: ecoflap(model, req.data or [], req.ratio, names, req.progress,
                                                     req.loss_fn, **req.config))


def _modegpt(model: nn.Module, req: Request) -> CompressState:
    names, before = _block_linears(model, req, "modegpt", MoDeGPTConfig.__dataclass_fields__,
                                   "decomposes every block's modules", "the module correlations")
    modular = modegpt(model, req.data or [], req.ratio, req.progress, **req.config)
    linears = {n: {"in_features": lin.in_features, "out_features": lin.out_features, "bias": False}
               for n in names for lin in [_linear_at(model, n, "modegpt")]}
    details = {name: {"qk_dim": 2 * len(spec["pairs"][0]), "v_dim": spec["v_dim"]} for name, spec in modular.items()}
    return CompressState("modegpt", req.ratio, names, {}, before, _weights(model, names), details,
                         {"linears": linears, "modular": modular})


def _spqr(model: nn.Module, req: Request) -> CompressState:
    return _calibrated_pruning(model, req, "spqr", SpQRConfig.__dataclass_fields__, "the GPTQ Hessians",
                               lambda names: spqr(model, req.data or [], set(names), req.progress, **req.config),
                               dense=True)


Runner = Callable[[nn.Module, Request], CompressState]
_METHODS: tuple[tuple[str, str, str, Runner], ...] = (
    # (name, paper, one-line mechanism, runner); DSEE's record comes from the adapter package (its layer)
    ("svd", "Eckart & Young 1936 (truncated SVD baseline)",
     "every matrix → rank keeping `ratio` of its weights, two SVD factors", _svd),
    ("welore", "Jaiswal et al. 2024, From GaLore to WeLore",
     "heavy-tail rank per matrix from normalized singular values; LRCs factorized, N-LRCs dense", _welore),
    ("lord", "Kaushal et al. 2023, LORD: Low Rank Decomposition of Monolingual Code LLMs",
     "same rank fraction for every matrix; trainable truncated-SVD factor pairs, or output-covariance factors "
     "with data=", _lord),
    ("pela", "Guo et al. 2024, PELA: Learning Parameter-Efficient Models with Low-Rank Approximation",
     "uniform low-rank student + feature distillation from the frozen teacher + weight-perturbation reg.", _pela),
    ("loraprune", "Zhang et al. 2024, LoRAPrune: Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning",
     "iterative head/channel pruning from LoRA weights and gradients during LoRA fine-tuning", _loraprune),
    ("slicegpt", "Ashkboos et al. 2024, SliceGPT: Compress Large Language Models by Deleting Rows and Columns",
     "fold RMSNorm scales, rotate each block into the PCA basis of its input (shortcuts Q_lᵀQ_{l+1}), delete the "
     "trailing rows/columns: a smaller hidden width", _slicegpt),
    ("dsnot", "Zhang et al. 2024, Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs",
     "Wanda/magnitude mask refined per row by prune-and-grow swaps that shrink the expected reconstruction "
     "error Σ W x̄ (growth scaled by 1/Var x); weights keep their values", _dsnot),
    ("ecoflap", "Sung et al. 2024, ECoFLaP: Efficient Coarse-to-Fine Layer-Wise Pruning for Vision-Language Models",
     "block sparsities from forward-only (zeroth-order) gradient × weight scores sharing the global budget, then "
     "Wanda inside each layer at its block's sparsity", _ecoflap),
    ("modegpt", "Lin et al. 2025, MoDeGPT: Modular Decomposition for Large Language Model Compression",
     "per block, backprop-free: MLP channels by ridge leverage + Nyström refit of down, key-query RoPE pairs by "
     "CR scores, value-output by SVD of C_x^1/2 W_v W_o: a smaller inner dimension in every module", _modegpt),
    ("spqr", "Dettmers et al. 2024, SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight "
     "Compression",
     "GPTQ with 3-4-bit groups of 16 and 3-bit quantized scales/zeros; weights whose Hessian-aware error "
     "exceeds a threshold kept as sparse fp16 outliers", _spqr),
)
for _name, _paper, _mechanism, _run in _METHODS:
    catalogue.register(catalogue.MethodRecord(
        _name, "compression", _paper, _mechanism, api="compress", exports="compressed", spec=_run,
        builder=lambda model, _name=_name, **options: compress(model, _name, **options),
    ))


def _runner(method: str) -> Runner:
    """The method's runner: its record's ``spec``, or (DSEE, whose record holds its adapter layer) ``_dsee``."""
    spec = COMPRESS_METHODS[method].spec
    return spec if callable(spec) else _dsee



# ----------------------------------------------------------------------------------- recovery
def recover(
    model: nn.Module,
    data: Iterable,
    steps: int,
    lr: float = 1e-4,
    loss_fn: LossFn | None = None,
    progress: bool = False,
    **config: Any,
) -> list[dict]:
    """A short recovery fine-tune with the method's own trainable part: the factor pairs (``svd``,
    ``lord``, ``pela``) or the LRC factors only (``welore``) — everything else stays frozen and
    bit-identical and the previous ``requires_grad`` flags are restored afterwards — or, for
    ``loraprune``, LoRA on the shrunk block linears, merged at the end (LoRA options in ``config``;
    works on a loaded model too: the pruned units no longer exist, so no masks are needed)."""
    state = compressed_state(model)
    integer("steps", steps, 1)
    if state.method == "dsee":
        raise ValueError("dsee recovers during its own fine-tuning; pass steps=... to rw.compress instead")
    if state.method == "loraprune":
        _check_config("loraprune recovery", config, ("r", "alpha", "dropout", "trainable"))
        return loraprune_recover(model, state.targets, data, steps, loss_fn, progress=progress, lr=lr, **config)
    if config:
        raise ValueError(f"unknown option(s) {sorted(config)} for recovering a '{state.method}' model")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    if state.method == "welore":
        params = welore_finetune_params(model, freeze_others=True)
    else:
        params = [p for _, layer in factorized_layers(model) for p in layer.parameters()]
        keep = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    if not params:
        raise ValueError("the compressed model has no factorized layer to train")
    try:
        return finetune(model, params, data, steps, lr, loss_fn, progress)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None


# ----------------------------------------------------------------------------------- save / load
def save_compressed(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write a compressed model (see the module docstring for the format) atomically to ``path``."""
    state = compressed_state(model)
    info = {
        "format": "rankwise-compressed",
        "version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "factorized": {
            name: {"rank": layer.rank, "in_features": layer.in_features, "out_features": layer.out_features,
                   "bias": layer.bias is not None}
            for name, layer in factorized_layers(model)
        },
        "state": state.to_dict(),
    }
    with atomic_directory(path) as tmp:
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError("save_compressed needs a Hugging Face model (model.config)")
        config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        save_tensors(model.state_dict(), tmp / COMPRESSED_WEIGHTS)
        write_json(tmp / COMPRESSED_CONFIG, info)
    return Path(path)


#: Module attributes a saved layout may set (LoRAPrune's kept head / channel counts), each a positive int.
LAYOUT_ATTRIBUTES = ("num_key_value_groups", "num_attention_heads", "all_head_size", "intermediate_size")
#: Model classes ``load_compressed`` builds: transformers task classes with these name endings.
ARCHITECTURE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForSequenceClassification", "Model")


def _architecture(transformers: Any, name: Any, config: Any, info_file: Path) -> Any:
    """The transformers model class ``name``, only if it is a known kind of model class for ``config``."""
    from transformers import PreTrainedModel

    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    known = (isinstance(cls, type) and issubclass(cls, PreTrainedModel) and name.endswith(ARCHITECTURE_SUFFIXES)
             and isinstance(config, getattr(cls, "config_class", None) or ()))
    if not known:
        raise ValueError(f"architecture={name!r} in {info_file} is not a transformers model class for this "
                         f"{type(config).__name__} (allowed: classes ending in {list(ARCHITECTURE_SUFFIXES)})")
    return cls


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}={value!r} must be a positive integer")
    return value


def _linear_at(model: nn.Module, name: Any, where: str) -> nn.Linear:
    try:
        module = model.get_submodule(name) if isinstance(name, str) and name else None
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{where}: {name!r} is not an nn.Linear of this model")
    return module


def _linear_spec(spec: Any, where: str, rank: bool = False) -> dict[str, Any]:
    keys = ("in_features", "out_features", "bias", *(("rank",) if rank else ()))
    if not isinstance(spec, dict) or set(spec) != set(keys):
        raise ValueError(f"{where}={spec!r} must give exactly {list(keys)}")
    for key in keys:
        if key == "bias":
            if not isinstance(spec[key], bool):
                raise ValueError(f"{where}.bias={spec[key]!r} must be true or false")
        else:
            _positive_int(spec[key], f"{where}.{key}")
    return spec


def _check_layout(model: nn.Module, info: dict[str, Any], info_file: Path) -> None:
    """Every layer and attribute the file would change exists and gets an allowed, well-typed value."""
    where = str(info_file)
    state = info.get("state")
    if not isinstance(state, dict):
        raise ValueError(f"{where}: 'state' must be a mapping")
    choice(f"{where}: state.method", state.get("method"), sorted(COMPRESS_METHODS))
    resized = state.get("resized") or {}
    factorized = info.get("factorized")
    if not isinstance(resized, dict) or set(resized) - {"linears", "attributes", "sliced", "modular"}:
        raise ValueError(f"{where}: state.resized must be a mapping with 'linears' and 'attributes' (or 'sliced', "
                         "'modular')")
    if not isinstance(factorized, dict):
        raise ValueError(f"{where}: 'factorized' must be a mapping of layer names")
    for name, spec in (resized.get("linears") or {}).items():
        _linear_at(model, name, f"{where}: resized linear")
        _linear_spec(spec, f"{where}: resized.linears[{name!r}]")
    for name, attrs in (resized.get("attributes") or {}).items():
        try:
            module = model.get_submodule(name) if isinstance(name, str) else None
        except AttributeError:
            module = None
        if module is None or not isinstance(attrs, dict):
            raise ValueError(f"{where}: resized attributes of {name!r}: no such module, or not a mapping")
        for key, value in attrs.items():
            if key not in LAYOUT_ATTRIBUTES or not isinstance(getattr(module, key, None), int):
                raise ValueError(f"{where}: attribute {key!r} of {name!r} may not be set (allowed: attributes "
                                 f"{list(LAYOUT_ATTRIBUTES)} that the module has)")
            _positive_int(value, f"{where}: {name}.{key}")
    for name, spec in factorized.items():
        _linear_at(model, name, f"{where}: factorized layer")
        _linear_spec(spec, f"{where}: factorized[{name!r}]", rank=True)


def load_compressed(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by :func:`save_compressed` (offline; strict state-dict load).

    Nothing the file names is trusted: the architecture must be a transformers model class for the
    saved config (:data:`ARCHITECTURE_SUFFIXES`), the layout may only resize existing linears and set
    :data:`LAYOUT_ATTRIBUTES` to positive integers, and every tensor must fit the rebuilt model exactly
    (shape, floating dtype, finite values)."""
    import transformers

    path = Path(path)
    info_file = path / COMPRESSED_CONFIG
    if not info_file.is_file():
        raise FileNotFoundError(f"{info_file} not found: not a rankwise compressed-model directory")
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{info_file} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != "rankwise-compressed":
        raise ValueError(f"{info_file} is not a rankwise compressed-model file")
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    cls = _architecture(transformers, info.get("architecture"), config, info_file)
    model = cls(config)
    _check_layout(model, info, info_file)
    state = CompressState.from_dict(info["state"])
    apply_layout(model, state.resized)
    if "sliced" in state.resized:
        apply_sliced_layout(model, state.resized["sliced"], f"{info_file}: state.resized.sliced")
    if "modular" in state.resized:
        apply_modular_layout(model, state.resized["modular"], f"{info_file}: state.resized.modular")
    for name, spec in info["factorized"].items():
        old = model.get_submodule(name)
        layer = empty_factorized(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"],
                                 old.weight.device, old.weight.dtype)
        replace_module(model, name, layer)
    tensors = load_file(str(path / COMPRESSED_WEIGHTS))
    tensors_fit(tensors, model.state_dict(), str(path / COMPRESSED_WEIGHTS))
    model.load_state_dict(tensors, strict=True)
    model.eval()
    model.rankwise_compress = state
    return model
