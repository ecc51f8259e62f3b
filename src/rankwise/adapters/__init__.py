"""Adapters: a frozen base layer plus a trainable delta. Importing this package registers every method.

The names below are the package's public API; the other packages (sparse, compress) use only them."""

# The import order is the catalogue's order: LoRA first, then its inits, then the others.
# isort: off
from . import lora  # noqa: F401  (registers lora, rslora and the LoRA-shaped inits)
from . import lora_inits  # noqa: F401  (pissa, olora, lora_ga, loraplus)
from . import eva  # noqa: F401  (data-driven init with its own pass over init_data)
from . import lq_lora  # noqa: F401
from . import core  # noqa: F401  (lora_xs, lora_sb, loldu, svfit, pmss)
from . import sorsa  # noqa: F401  (SVD split with the orthonormal regulariser)
from . import nlora  # noqa: F401  (SLoRA / NLoRA / IntTune: B·M·A, Nyström init)
from . import dota  # noqa: F401  (MPO cores of W₀, QDoTA on a 4-bit residual)
from . import dora  # noqa: F401
from . import vera  # noqa: F401
from . import randlora  # noqa: F401
from . import bone  # noqa: F401
from . import hra  # noqa: F401  (Householder reflections, PEFT parity)
from . import fourierft  # noqa: F401
from . import c3a  # noqa: F401
from . import delora  # noqa: F401
from . import gralora  # noqa: F401
from . import dsee  # noqa: F401  (the adapter stage of rw.compress(model, "dsee"))
from . import lori  # noqa: F401
from . import eigenlorax  # noqa: F401
from . import meteora  # noqa: F401
from . import convlora  # noqa: F401
from . import sora  # noqa: F401  (rank allocation: SoRA and AdaLoRA bring controllers every loop attaches)
from . import adalora  # noqa: F401
from . import increlora  # noqa: F401  (grows rank: top-scored modules get new components)
from . import dylora  # noqa: F401  (one training for every rank b <= r)
from . import drs_lora  # noqa: F401  (continual learning: per-task rank selection, merged after each task)
from . import prilora  # noqa: F401  (ranks rising with depth, A pruned by |w|·‖x‖)
from . import gora  # noqa: F401  (ranks and init from the estimated gradient)
from . import elalora  # noqa: F401  (ranks pruned and expanded by importance)
from . import autolora  # noqa: F401  (bi-level: selection variables on validation batches)
from . import ard_lora  # noqa: F401  (per-head rank r₀·α with ℓ1 + TV proximal steps on α)
from . import plop  # noqa: F401  (adapter placement by module type, scored before training)
from . import allora  # noqa: F401  (training dynamics)
from . import roselora  # noqa: F401  (sparse+low-rank)
from . import lors  # noqa: F401  (sparse+low-rank)
from . import pst  # noqa: F401  (sparse+low-rank)
from . import lora_pro  # noqa: F401
from . import lora_dropout  # noqa: F401
from . import cola  # noqa: F401
from . import lora_ggpo  # noqa: F401
from . import fast_forward  # noqa: F401
from . import bilora  # noqa: F401
from . import loft  # noqa: F401
from . import ba_lora  # noqa: F401
from . import mora  # noqa: F401  (issue 14: adapters without a PEFT counterpart)
from . import melora  # noqa: F401
from . import singlora  # noqa: F401
from . import nola  # noqa: F401
from . import curlora  # noqa: F401
from . import lt_sft  # noqa: F401  (sparse fine-tuning: a sparse delta on the top-K phase-1 changes)
from . import spiel  # noqa: F401  (sparse fine-tuning: indices dropped and regrown while training)
from . import s2ft  # noqa: F401  (sparse fine-tuning: co-permuted heads / channels trained as dense blocks)
from . import paca  # noqa: F401  (sparse fine-tuning: random input columns trained in place)
from . import lamda  # noqa: F401  (issue 14, part 2)
from . import edora  # noqa: F401
from . import lotr  # noqa: F401
from . import reslora  # noqa: F401
from . import riemannlora  # noqa: F401
from . import lora_mini  # noqa: F401
from . import denselora  # noqa: F401
# isort: on
from .base import AdapterConfig, AdapterLayer
from .combine import lora_from_factors, merge_adapters  # (registers seq_merge, lora_lego)
from .dsee import HEAD_SCORES, DSEEConfig, DSEELayer, dsee_support
from .ensembles import ensemble_batch, ensemble_probs, lora_ensemble  # (registers lora_ensembles)
from .init import InitContext
from .lora import LoRALayer
from .lori import lori_masks
from .named import AdapterStack, batch_adapters
from .ops import active_adapters, delete_adapter, merge_and_unload, set_active
from .registry import (
    REGISTRY,
    MethodSpec,
    adapt,
    adapter_layers,
    adapter_names,
    adapter_state,
    get_method,
    register,
)

__all__ = [
    "HEAD_SCORES", "REGISTRY", "AdapterConfig", "AdapterLayer", "AdapterStack", "DSEEConfig", "DSEELayer",
    "InitContext", "LoRALayer", "MethodSpec", "active_adapters", "adapt", "adapter_layers", "adapter_names",
    "adapter_state", "batch_adapters", "delete_adapter", "dsee_support", "ensemble_batch", "ensemble_probs",
    "get_method", "lora_ensemble", "lora_from_factors", "lori_masks", "merge_adapters",
    "merge_and_unload", "register", "set_active",
]
