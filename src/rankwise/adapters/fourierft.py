"""FourierFT (Gao et al. 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
ICML 2024).

ΔW is learned in the frequency domain (paper Eq. 2–3): n spectral coefficients c at fixed random
2-D frequencies E = {(uₖ, vₖ)} are scattered into an out × in spectrum F (zero elsewhere), and

    ΔW = α · Re(IDFT2(F)) ,   ΔW[p, q] = α/(out·in) · Σₖ cₖ cos(2π(uₖp/out + vₖq/in))

Only c (``fourierft_spectrum``, n values per layer) trains. The frequencies are the first n entries
of a seeded random permutation of the out·in positions (``random_loc_seed``; row = index // in,
column = index % in), regenerated from the seed and not saved; layers of one shape share them, as
the paper's shared entry matrix. They are PEFT 0.21.2's ``indices`` for the same seed, bit for bit.
c starts standard normal (the paper's and PEFT's default, so the model starts slightly away from
the base) or zero (``zero_init``). ΔW is full-rank in general: it merges, it does not export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import positive, rank
from ..rng import layer_generator
from .base import AdapterConfig, AdapterLayer
from .init import InitContext
from .registry import MethodSpec, register

DEFAULT_FREQUENCIES = 1000  # PEFT's default n


@dataclass
class FourierFTConfig(AdapterConfig):
    """FourierFT hyper-parameters (``r`` is not used): ``n_frequency`` trainable coefficients per layer
    (None: 1000, at most the layer's out·in entries), ``scaling`` α, ``random_loc_seed`` (PEFT's
    default 777) for the frequencies, ``zero_init`` to start c at 0 instead of N(0, 1)."""

    n_frequency: int | None = None
    scaling: float = 150.0
    random_loc_seed: int = 777
    zero_init: bool = False

    def validate(self) -> None:
        super().validate()
        if self.n_frequency is not None:
            rank("n_frequency", self.n_frequency)
        positive("scaling", self.scaling)


def frequency_locations(seed: int, out_features: int, in_features: int, n: int) -> torch.Tensor:
    """The (2, n) rows and columns of the first n positions of a seeded permutation of out × in."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features])


def spectral_delta(
    spectrum: torch.Tensor, locations: torch.Tensor, shape: tuple[int, int], scaling: float
) -> torch.Tensor:
    """α·Re(IDFT2(F)) for the coefficients ``spectrum`` scattered at ``locations`` into an all-zero F of
    ``shape`` (computed in float32 at least; returned in the spectrum's dtype)."""
    dtype = torch.promote_types(spectrum.dtype, torch.float32)
    dense = torch.zeros(shape, dtype=dtype, device=spectrum.device)
    dense = dense.index_put((locations[0], locations[1]), spectrum.to(dtype))
    return (torch.fft.ifft2(dense).real * scaling).to(spectrum.dtype)


class FourierFTLayer(AdapterLayer):
    """Trainable ``fourierft_spectrum`` (n,); the frequencies ``fourierft_locations`` (2, n) are a buffer
    regenerated from the seed."""

    method = "fourierft"

    def __init__(self, base_layer: nn.Module, config: FourierFTConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        entries = self.out_features * self.in_features
        n = min(DEFAULT_FREQUENCIES, entries) if config.n_frequency is None else config.n_frequency
        if n > entries:
            raise ValueError(
                f"n_frequency={n} is more than the {entries} = {self.out_features}×{self.in_features} entries of "
                f"'{ctx.name or 'the layer'}'; choose n_frequency ≤ {entries} (or None)"
            )
        self.identity_at_init = config.zero_init
        w = self.base_weight
        locations = frequency_locations(config.random_loc_seed, self.out_features, self.in_features, n)
        self.register_buffer("fourierft_locations", locations.to(w.device), persistent=False)
        c = torch.zeros(n) if config.zero_init else torch.randn(n, generator=layer_generator(config.seed, ctx.name))
        self.fourierft_spectrum = nn.Parameter(c.to(device=w.device, dtype=self.adapter_dtype))

    def delta_weight(self) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        return spectral_delta(self.fourierft_spectrum, self.fourierft_locations, shape, self.config.scaling)

    def trainable_count(self) -> int:
        return int(self.fourierft_spectrum.numel())

    def extra_repr(self) -> str:
        return (f"method={self.method}, in={self.in_features}, out={self.out_features}, "
                f"n_frequency={self.trainable_count()}, scaling={self.config.scaling:g}")


register(
    MethodSpec(
        "fourierft",
        "adapter",
        "Gao et al. 2024, Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
        FourierFTConfig,
        FourierFTLayer,
        export="none",
        summary="ΔW = α·Re(IDFT2(F)), n trainable spectral coefficients at seeded random frequencies",
    )
)
