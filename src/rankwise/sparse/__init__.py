"""Low-rank and sparse structure for training from scratch.

Structured layers (``layers``): :class:`FactorizedLinear` (W = U V) and :class:`SparseLowRankLinear`
(W = s·B A + S on a fixed support). Methods, applied with :func:`sparsify`:

* ``sltrain`` — SLTrain's sparse + low-rank parameterization (no controller);
* ``sst`` — Sparse Spectral Training, :class:`SST` controller;
* ``trp`` — Trained Rank Pruning, :class:`TRP` controller and :func:`decompose`;
* ``maestro`` — LoD ordered low-rank layers, :class:`Maestro` helper and :func:`truncate`;
* ``relora`` — LoRA merge-and-restart, :class:`ReLoRA` controller and :func:`relora_schedule`;
* ``lte`` — LoRA-the-Explorer's parallel heads, :class:`LTE` controller (merges);
* ``slope`` — N:M-sparse with a double-pruned backward, :class:`SLoPe` controller (lazy adapters);
* ``cuttlefish`` — full-rank until stable ranks settle, then factorized: :class:`Cuttlefish` controller;
* ``refactor_reset`` — W = B A with periodic refactorization and momentum reset: :class:`RefactorReset`.

Controllers are rank controllers (:class:`rankwise.callbacks.RankController`): pass them to
``rankwise.train.train(..., callbacks=[controller])``, or call their ``step()`` after
``optimizer.step()`` in a loop of your own.
"""

from .api import SPARSE_METHODS, SparseMethod, SparseState, densify, sparse_summary, sparsify
from .cuttlefish import Cuttlefish, stable_rank
from .layers import FactorizedLinear, SparseLowRankLinear, random_support
from .lte import LTE, LTELinear
from .maestro import Maestro, MaestroLinear, truncate
from .refactor_reset import RefactorReset
from .relora import ReLoRA, ReLoRAWarmStart, prepare_relora, relora_schedule
from .slope import SLoPe, SLoPeLinear, nm_mask
from .sltrain import SLTrainConfig, sltrain_layer
from .sst import SST, SpectralLinear, sample_active, sampling_probabilities
from .trp import TRP, TRPLinear, decompose, nuclear_subgradient

__all__ = [
    "LTE", "SPARSE_METHODS", "SST", "TRP", "Cuttlefish", "FactorizedLinear", "LTELinear", "Maestro",
    "MaestroLinear", "RefactorReset", "ReLoRA", "ReLoRAWarmStart", "SLoPe", "SLoPeLinear", "nm_mask",
    "SLTrainConfig", "SparseLowRankLinear", "SparseMethod", "SparseState", "SpectralLinear",
    "TRPLinear", "decompose", "densify", "nuclear_subgradient", "prepare_relora", "random_support",
    "relora_schedule", "sample_active", "sampling_probabilities", "sltrain_layer", "sparse_summary",
    "sparsify", "stable_rank", "truncate",
]
