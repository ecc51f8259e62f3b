"""Quantization helpers for projected optimizers (one job: turn float tensors into small codes and back).

* **8-bit blockwise moments** (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"):
  a tensor is cut into blocks of ``block`` elements; each block is divided by its absmax
  and every value is mapped to the nearest entry of a fixed 256-entry *dynamic* codebook whose levels
  are spaced geometrically (so small moments keep their relative precision). ``quantize_blockwise``
  returns ``(codes uint8, absmax float32)``.
* **INT4 groups** (Q-GaLore, Zhang et al. 2024: projection matrices stored in INT4 with
  asymmetric min-max quantization per group of 256): ``quantize_int4`` returns two 4-bit codes
  packed into each uint8, plus a per-group scale and zero point.
* **Stochastic rounding** (Q-GaLore's F_SR operator): ``stochastic_round(x)`` rounds up with
  probability ``x - floor(x)``, so ``E[F_SR(x)] = x``; ``quantize_int8_stochastic`` uses it for INT8
  weights with asymmetric per-group min-max scales.
"""

from __future__ import annotations

import torch

# ----------------------------------------------------------------------------- 8-bit dynamic codes

_CODE_CACHE: dict[tuple[bool, str], tuple[torch.Tensor, torch.Tensor]] = {}
# The non-zero magnitudes of each codebook: (log10 of the smallest, how many), geometric up to 1.
_GRID = {True: (-6.0, 127), False: (-12.0, 255)}


def _levels(signed: bool) -> torch.Tensor:
    """The 256-entry codebook on [-1, 1] (signed) or [0, 1] (unsigned), sorted ascending: signed =
    −magnitudes, 0, +magnitudes, and a duplicate 1.0 as padding; unsigned = 0, magnitudes."""
    low, count = _GRID[signed]
    pos = torch.logspace(low, 0.0, count, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    if signed:
        return torch.cat([-pos.flip(0), zero, pos, torch.ones(1, dtype=torch.float64)])
    return torch.cat([zero, pos])


def _thresholds(code: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between consecutive code values (geometric mean inside a sign, else midpoint)."""
    a, b = code[:-1], code[1:]
    same_sign = (a * b) > 0
    geo = torch.sign(a) * torch.sqrt((a * b).clamp_min(0))
    return torch.where(same_sign, geo, (a + b) / 2)


def dynamic_code(signed: bool, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(code, thresholds)`` float32 tensors for the signed (first moment) or unsigned (second moment) map."""
    key = (signed, str(device))
    if key not in _CODE_CACHE:
        code = _levels(signed)
        _CODE_CACHE[key] = (code.float().to(device), _thresholds(code).float().to(device))
    return _CODE_CACHE[key]


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block), pad


def code_index(normed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Nearest-level code (uint8) of values in [-1, 1], as ``searchsorted(thresholds, normed)`` but in
    O(1) per element: the non-zero levels are geometric and the thresholds between same-sign levels
    are their geometric means, so the level is ``round`` of ``log10|x|`` on the level grid; below half
    the smallest level a value maps to the zero code (the threshold there is the arithmetic midpoint).
    Values within float rounding of a threshold may land on either neighbour."""
    low, count = _GRID[signed]
    first = count + 1 if signed else 1  # code index of the smallest positive magnitude
    steps = count - 1
    magnitude = normed.abs()
    k = ((magnitude.clamp_min(1e-30).log10() - low) * (steps / -low)).round_().clamp_(0, steps)
    idx = torch.where(normed < 0, (first - 2) - k, first + k) if signed else first + k
    tiny = 0.5 * 10.0**low  # midpoint between the zero code and the smallest magnitude
    return torch.where(magnitude <= tiny, float(first - 1), idx).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, signed: bool, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise dynamic 8-bit quantization: ``x ≈ code[q] · absmax[block]`` (a block holding ±inf keeps
    absmax = inf; see ``dequantize_blockwise``).

    Returns ``(q, absmax)``: ``q`` uint8 with ``x.numel()`` entries (flat), ``absmax`` float32 with one
    entry per block of ``block`` elements.
    """
    if block <= 0:
        raise ValueError(f"block={block!r} must be a positive int")
    blocks, pad = _blocks(x.float(), block)
    absmax = blocks.abs().amax(dim=1)
    # an inf entry makes its block's absmax inf: dividing by finfo.max instead keeps inf/inf = NaN out of
    # the codes (the block decodes to inf anyway, see dequantize_blockwise)
    normed = blocks / absmax.clamp(min=1e-30, max=torch.finfo(torch.float32).max).unsqueeze(1)
    q = code_index(normed, signed).reshape(-1)
    # without the padding: a slice would keep the whole padded buffer alive in the optimizer state
    return (q[: x.numel()].clone() if pad else q), absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, signed: bool, shape: torch.Size | tuple[int, ...], block: int = 256
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: float32 tensor of ``shape``.

    A block whose absmax overflowed to inf (an Adam second moment of a huge gradient) decodes to inf
    everywhere for the unsigned map and to ±inf / 0 for the signed one (never 0·inf = NaN), so Adam's
    m/(√v + ε) is 0 there, as float32 AdamW's is for an overflowed v.
    """
    code, _ = dynamic_code(signed, q.device)
    numel = q.numel()
    vals, _ = _blocks(code[q.long()], block)
    inf = float("inf")
    vals = (vals * absmax.unsqueeze(1)).nan_to_num_(nan=0.0 if signed else inf, posinf=inf, neginf=-inf)
    return vals.reshape(-1)[:numel].view(shape)


# ----------------------------------------------------------------------------- INT4 packed groups


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack a flat uint8 tensor of values in [0, 15] two per byte (low nibble first)."""
    flat = q.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: flat uint8 tensor of ``numel`` values in [0, 15]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=1).reshape(-1)[:numel]


def _group_minmax(x: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Asymmetric per-group min-max parameters (Q-GaLore's ``_quantize``): returns groups, scale, zero, pad."""
    if group <= 0:
        raise ValueError(f"group_size={group!r} must be a positive int")
    g, pad = _blocks(x.float(), group)
    if pad:  # pad with the group's own first value so padding never widens the range
        last = x.reshape(-1)[-(group - pad) :].float()
        g[-1, group - pad :] = last[0]
    qmax = 2**bits - 1
    lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-5) / qmax
    zero = (-torch.round(lo / scale)).clamp_(0, qmax)
    return g, scale, zero, pad


def quantize_int4(x: torch.Tensor, group: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT4 asymmetric group quantization ``x ≈ scale·(q − zero)``; returns ``(packed uint8, scale, zero)``."""
    g, scale, zero, _ = _group_minmax(x, group, 4)
    q = torch.clamp(torch.round(g / scale) + zero, 0, 15).to(torch.uint8)
    return pack_int4(q.reshape(-1)[: x.numel()]), scale.reshape(-1), zero.reshape(-1)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: torch.Size | tuple[int, ...], group: int = 256
) -> torch.Tensor:
    """Inverse of ``quantize_int4``: float32 tensor of ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    q, _ = _blocks(unpack_int4(packed, numel).float(), group)
    return ((q - zero.unsqueeze(1)) * scale.unsqueeze(1)).reshape(-1)[:numel].view(shape)


# ----------------------------------------------------------------------------- stochastic rounding


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """F_SR(x): ``ceil(x)`` with probability ``x − floor(x)``, else ``floor(x)``; unbiased, E[F_SR(x)] = x."""
    low = torch.floor(x)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return low + (u < (x - low)).to(x.dtype)


def quantize_int8_stochastic(
    w: torch.Tensor, group: int = 256, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT8 asymmetric per-group quantization with stochastic rounding: ``(q uint8 flat, scale, zero)``."""
    g, scale, zero, _ = _group_minmax(w, group, 8)
    q = torch.clamp(stochastic_round(g / scale, generator) + zero, 0, 255).to(torch.uint8)
    return q.reshape(-1)[: w.numel()], scale.reshape(-1), zero.reshape(-1)


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: torch.Size | tuple[int, ...], group: int = 256
) -> torch.Tensor:
    """Inverse of ``quantize_int8_stochastic``: float32 tensor of ``shape``."""
    g, _ = _blocks(q.float(), group)
    numel = q.numel()
    return ((g - zero.unsqueeze(1)) * scale.unsqueeze(1)).reshape(-1)[:numel].view(shape)
