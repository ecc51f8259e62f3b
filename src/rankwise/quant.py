"""4-bit quantized bases (QLoRA, Dettmers et al. 2023; LoftQ, Li et al. 2023) through bitsandbytes.

``rw.quantize(model, "nf4")`` replaces the target linear layers (``nn.Linear`` and transformers
``Conv1D``) by bitsandbytes ``Linear4bit`` layers: blockwise 4-bit NormalFloat (``"nf4"``) or
4-bit float (``"fp4"``) codes, one absmax scale per block of 64 weights, and with
``double_quant=True`` (bitsandbytes' ``compress_statistics``) the fp32 block scales quantized
again to 8 bits (QLoRA Sec. 3). The quantization itself is bitsandbytes'; this module only moves
weights in and out of it:

* ``dequantize(module)``: the (out, in) weight a 4-bit layer computes with, in its compute dtype;
* ``requantize_(module, w)``: the one write into a 4-bit layer (quantize ``w``, store the codes and
  the new quantization state in place), returning the relative Frobenius error
  ‖deq(Q(w)) − w‖_F / ‖w‖_F that the write made;
* ``quantize_tensor`` / ``dequantize_tensor``: the same on a bare tensor (LoftQ's alternation).

Adapters read and write a 4-bit base through ``AdapterLayer.base_weight`` and its one write path
(``docs/quantized.md``). Layers that would write into a quantized weight elsewhere (sparse
training, compression, projected optimizers) refuse it (``targets.find_targets(conv1d=False)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .checks import choice
from .targets import Targets, find_targets, is_conv1d, is_factorized, is_linear4bit, linear_weight, replace_module

SCHEMES = ("nf4", "fp4")
BLOCKSIZE = 64
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts (CPU and CUDA)
NESTED_BLOCKSIZE = 256  # double quantization: the 8-bit block scales are scaled again in blocks of 256
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def _hub_kernel_notice(record: logging.LogRecord) -> bool:
    """False for bitsandbytes' notice that it could not fetch its CPU 4-bit GEMM from a model hub (it tries on
    AVX512-BF16 CPUs; rankwise runs offline, ``HF_HUB_OFFLINE=1``): it then uses its own CPU kernel, and the
    notice's advice (``pip install kernels``) does not apply."""
    return "kernels-community" not in record.getMessage()


def require_bnb() -> ModuleType:
    """The ``bitsandbytes`` module, or an ImportError saying how to get it."""
    notices = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _hub_kernel_notice not in notices.filters:
        notices.addFilter(_hub_kernel_notice)
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(
            "4-bit quantized bases (rw.quantize, methods 'qlora' and 'loftq', --quantize) need bitsandbytes: "
            "pip install 'bitsandbytes>=0.45' (it quantizes and runs 4-bit layers on CPU and CUDA)"
        ) from e
    return bitsandbytes


def _compute_dtype(value: Any, default: torch.dtype) -> torch.dtype:
    if value is None:
        return default
    name = str(value).removeprefix("torch.") if isinstance(value, torch.dtype | str) else None
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={value!r} is not allowed; choose one of {[*COMPUTE_DTYPES, None]} "
                         "(or the matching torch.dtype; None: the weight's own dtype)")
    return COMPUTE_DTYPES[name]


@dataclass
class Quantized:
    """A quantized (out, in) weight: bitsandbytes' packed codes and its ``QuantState``."""

    data: torch.Tensor
    state: Any


def quantize_tensor(
    w: torch.Tensor, scheme: str = "nf4", double_quant: bool = True, blocksize: int = BLOCKSIZE
) -> Quantized:
    """Quantize the 2-D tensor ``w`` (kept in its dtype) with bitsandbytes' ``quantize_4bit``, one
    absmax scale per ``blocksize`` consecutive weights."""
    choice("scheme", scheme, SCHEMES)
    choice("blocksize", blocksize, BLOCKSIZES)
    bnb = require_bnb()
    data, state = bnb.functional.quantize_4bit(
        w.detach().contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type=scheme,
    )
    return Quantized(data, state)


def dequantize_tensor(q: Quantized) -> torch.Tensor:
    """The values a ``Quantized`` stands for, shape (out, in), in the dtype it was quantized from."""
    return require_bnb().functional.dequantize_4bit(q.data, q.state)


@dataclass(frozen=True)
class QuantConfig:
    """One bitsandbytes 4-bit storage format: ``scheme`` (NF4 / FP4 codes), ``blocksize`` (weights per
    absmax scale) and ``double_quant`` (the scales stored as 8-bit codes with one fp32 scale per 256
    of them, plus one fp32 offset). Written ``"nf4-b64-dq"`` / ``"fp4-b128"`` (``name``, ``parse``)."""

    scheme: str = "nf4"
    blocksize: int = BLOCKSIZE
    double_quant: bool = True

    def __post_init__(self) -> None:
        choice("scheme", self.scheme, SCHEMES)
        choice("blocksize", self.blocksize, BLOCKSIZES)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant={self.double_quant!r} must be True or False")

    @property
    def name(self) -> str:
        return f"{self.scheme}-b{self.blocksize}" + ("-dq" if self.double_quant else "")

    @classmethod
    def parse(cls, name: str, parameter: str = "quant_config") -> QuantConfig:
        """The config written ``"<scheme>-b<blocksize>[-dq]"``; a ValueError names ``parameter`` otherwise."""
        parts = name.split("-") if isinstance(name, str) else []
        ok = (
            len(parts) in (2, 3) and parts[0] in SCHEMES and parts[1][:1] == "b" and parts[1][1:].isdigit()
            and int(parts[1][1:]) in BLOCKSIZES and parts[2:] in ([], ["dq"])
        )
        if not ok:
            raise ValueError(
                f"{parameter}={name!r} is not a quantization config; write '<scheme>-b<blocksize>[-dq]' with "
                f"scheme one of {list(SCHEMES)}, blocksize one of {list(BLOCKSIZES)}, '-dq' for double "
                "quantization (e.g. 'nf4-b64-dq')"
            )
        return cls(parts[0], int(parts[1][1:]), parts[2:] == ["dq"])

    def quantize(self, w: torch.Tensor) -> Quantized:
        """``w`` quantized in this format by bitsandbytes."""
        return quantize_tensor(w, self.scheme, self.double_quant, self.blocksize)

    def storage_bits(self, numel: int) -> int:
        """Exact bits bitsandbytes stores for a matrix of ``numel`` weights in this format: 4-bit codes
        packed two per byte, one scale per block (fp32, or uint8 with double quantization, then also one
        fp32 scale per 256 blocks and one fp32 offset). The codebooks (16 code values, 256 scale values)
        are constants of the format, the same for every matrix, and are not counted."""
        blocks = -(-numel // self.blocksize)
        if not self.double_quant:
            return 8 * (-(-numel // 2)) + 32 * blocks
        return 8 * (-(-numel // 2)) + 8 * blocks + 32 * -(-blocks // NESTED_BLOCKSIZE) + 32


def stored_bits(q: Quantized) -> int:
    """The bits of the per-matrix tensors bitsandbytes actually holds for ``q``: packed codes, block
    scales and, with double quantization, the scales' scales and offset (codebooks excluded)."""
    state = q.state
    tensors = [q.data, state.absmax]
    if state.nested:
        tensors += [state.state2.absmax, torch.as_tensor(state.offset)]
    return sum(8 * t.numel() * t.element_size() for t in tensors)


def _unpack_for_cpu(module: nn.Module) -> None:
    """bitsandbytes repacks a layer's codes for its CPU inference kernel (AVX512-BF16 machines, eval
    mode) and changes the state with it; undo that before reading or writing the codes."""
    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        module.quant_state = w.quant_state


def keep_exact(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking on every 4-bit layer of ``model`` (``model`` itself
    included), unpacking a layer it repacked already. On an AVX512-BF16 CPU bitsandbytes repacks a layer's codes
    on its first eval-mode, no-grad forward: the block scales are rounded to bf16 and double quantization is
    redone (its inverse is "best-effort"), so the weights change, and later forwards run ``gemv_4bit``, which
    has no autograd kernel, so training after an evaluation silently loses the gradient through the layer
    (measured: the first layer's LoRA gradients off by half their size). Inference then dequantizes as training
    does."""
    for module in model.modules():
        if is_linear4bit(module):
            _unpack_for_cpu(module)
            module.support_avx512bf16_for_cpu = False


def layer_compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a 4-bit layer computes in: its ``compute_dtype``, else the dtype it was quantized from."""
    return module.compute_dtype or module.weight.quant_state.dtype


def dequantize(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes ``Linear4bit`` as its forward uses it, in its compute dtype."""
    _unpack_for_cpu(module)
    w = module.weight
    return dequantize_tensor(Quantized(w.data, w.quant_state)).to(layer_compute_dtype(module))


def stash(module: nn.Module) -> Quantized:
    """The layer's current codes and state (to put back bit for bit with ``restore_``)."""
    _unpack_for_cpu(module)
    return Quantized(module.weight.data.clone(), module.weight.quant_state)


def restore_(module: nn.Module, q: Quantized) -> None:
    """Put codes and state from ``stash`` back into the layer."""
    _unpack_for_cpu(module)
    module.weight.data = q.data
    module.weight.quant_state = module.quant_state = q.state


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F in fp32 (0 when both are zero)."""
    a, e = approx.float(), exact.float()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


@torch.no_grad()
def requantize_(module: nn.Module, w: torch.Tensor) -> float:
    """Quantize the (out, in) ``w`` into the 4-bit layer in place (same scheme, block size, double
    quantization, storage dtype; the parameter object is kept); return the relative error
    ‖deq(Q(w)) − w‖_F / ‖w‖_F of this write."""
    _unpack_for_cpu(module)
    p = module.weight
    old = p.quant_state
    q = quantize_tensor(w.to(old.dtype), old.quant_type, bool(p.compress_statistics), old.blocksize)
    p.data = q.data.to(p.quant_storage) if q.data.dtype != p.quant_storage else q.data
    p.quant_state = module.quant_state = q.state
    return relative_error(dequantize_tensor(q), w)


def to_linear4bit(
    module: nn.Module,
    scheme: str = "nf4",
    double_quant: bool = True,
    compute_dtype: Any = None,
    quantized: Quantized | None = None,
) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` computing ``module``'s map (``nn.Linear`` or ``Conv1D``, whose
    (in, out) weight is transposed), with the same bias (copied). ``quantized``: codes already made
    from this layer's weight (LoftQ's Q_T, LQ-LoRA's Q); its own scheme, block size and double
    quantization then override the arguments. Else the weight is quantized here (blocks of 64)."""
    bnb = require_bnb()
    w = linear_weight(module).detach()
    out_features, in_features = w.shape
    bias = module.bias
    dtype = _compute_dtype(compute_dtype, w.dtype)
    blocksize = BLOCKSIZE
    if quantized is not None:  # the codes' own format
        state = quantized.state
        scheme, double_quant, blocksize = state.quant_type, bool(state.nested), state.blocksize
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias is not None, compute_dtype=dtype,
        compress_statistics=double_quant, quant_type=scheme, device="meta",
    )
    q = quantized if quantized is not None else quantize_tensor(w, scheme, double_quant)
    layer.weight = bnb.nn.Params4bit(
        q.data, requires_grad=False, quant_state=q.state, blocksize=blocksize, compress_statistics=double_quant,
        quant_type=scheme, module=layer, bnb_quantized=True,
    )
    layer.quant_state = q.state
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    layer.train(module.training)
    keep_exact(layer)
    return layer


@torch.no_grad()
def dense_linear(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` with the (out, in) ``weight`` (its dtype) and ``module``'s bias."""
    out_features, in_features = weight.shape
    bias = module.bias
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=bias.requires_grad)
    layer.train(module.training)
    return layer


@dataclass
class QuantizedModel:
    """What ``quantize`` did; stored as ``model.rankwise_quantized``."""

    scheme: str
    double_quant: bool
    blocksize: int
    compute_dtype: str | None
    layers: list[str]
    errors: dict[str, float]  # per layer: ‖deq(Q(W)) − W‖_F / ‖W‖_F


@torch.no_grad()
def quantize(
    model: nn.Module,
    scheme: str = "nf4",
    targets: Targets = "all-linear",
    *,
    double_quant: bool = True,
    compute_dtype: Any = None,
) -> nn.Module:
    """Replace the target linear layers of ``model`` by bitsandbytes 4-bit ``Linear4bit`` layers in
    place and return ``model``.

    ``scheme``: "nf4" (QLoRA's NormalFloat) or "fp4"; blocks of 64 weights; ``double_quant``:
    quantize the block scales too (bitsandbytes' ``compress_statistics``). ``targets`` as for
    ``rw.adapt`` ("all-linear" leaves the output head in full precision). ``compute_dtype``: the
    dtype the 4-bit layers dequantize to and compute in ("float32", "bfloat16", "float16" or the
    torch dtype; None: each weight's own dtype). Biases are kept unquantized. The result is recorded
    as ``model.rankwise_quantized`` (a ``QuantizedModel`` with each layer's relative quantization
    error). Quantize before ``rw.adapt``; any adapter method then trains over the 4-bit base.
    """
    choice("scheme", scheme, SCHEMES)
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant={double_quant!r} must be True or False")
    require_bnb()
    if getattr(model, "rankwise_adapters", None):
        raise ValueError("the model has rankwise adapters: call rw.quantize(model) before rw.adapt "
                         "(or use method 'qlora', which quantizes the layers it adapts)")
    found = find_targets(model, targets)
    factorized = [n for n, m in found if is_factorized(m)]
    if factorized:
        raise ValueError(f"layers {factorized[:3]} are factorized (FactorizedLinear from rw.compress); rw.quantize "
                         "quantizes dense linear layers: choose targets without them (or densify first)")
    already = [n for n, m in found if is_linear4bit(m)]
    if already:
        raise ValueError(f"layers {already[:3]} are already 4-bit quantized; quantize a model once")
    dtype = None if compute_dtype is None else _compute_dtype(compute_dtype, torch.float32)
    errors = {}
    for name, module in found:
        layer = to_linear4bit(module, scheme, double_quant, dtype)
        errors[name] = relative_error(dequantize(layer), linear_weight(module).to(layer_compute_dtype(layer)))
        replace_module(model, name, layer)
    model.rankwise_quantized = QuantizedModel(  # type: ignore[assignment]  # Module attribute
        scheme, double_quant, BLOCKSIZE, None if dtype is None else str(dtype).removeprefix("torch."),
        [n for n, _ in found], errors,
    )
    return model


__all__ = [
    "BLOCKSIZE", "BLOCKSIZES", "SCHEMES", "QuantConfig", "Quantized", "QuantizedModel", "dense_linear", "dequantize",
    "dequantize_tensor", "is_conv1d", "is_linear4bit", "keep_exact", "layer_compute_dtype", "quantize",
    "quantize_tensor",
    "relative_error", "requantize_", "require_bnb", "restore_", "stash", "stored_bits", "to_linear4bit",
]
