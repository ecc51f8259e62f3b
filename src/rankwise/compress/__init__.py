"""Compression of pretrained models: low-rank factorization (SVD baseline, WeLore, LoRD, PELA),
structured pruning guided by LoRA (LoRAPrune), calibrated one-shot methods (SliceGPT, DSnoT, ECoFLaP,
MoDeGPT's modular decomposition, SpQR's sparse-quantized weights), sparse-plus-low-rank tuning (DSEE, whose adapter
layer lives in the adapter package), and compensation of a compressed model from its original
(EoRA, training-free; INT2.1's LREC, by distillation); LoRA trained on a pruned copy, then
recovered onto the original (LoRAM / QLoRAM).

``rw.compress(model, method, ratio=0.5)`` is the entry point.
"""

from ..adapters import DSEEConfig, DSEELayer, dsee_support
from ..layout import find_blocks
from .api import (
    COMPRESS_METHODS,
    CompressState,
    compress,
    compressed_state,
    load_compressed,
    recover,
    save_compressed,
)
from .dsee import attention_blocks, dsee_finetune, dsee_prune, prune_heads
from .eora import EoRAState, eora, eora_factors
from .evaluate import eval_blocks, evaluate_corpora, perplexity
from .factorized import FactorizedLinear, densify, factorized_layers
from .loram import LoRAMState, loram, recover_factors
from .loraprune import cubic_sparsity, loraprune, loraprune_recover, remove_pruned_units
from .lord import output_grams, second_moments
from .lrec import LRECState, distill_kl, lrec, model_kl
from .pela import pela_distill, pela_losses, weight_perturbation
from .rank import rank_fraction_ranks, uniform_ratio_rank, welore_ranks
from .resize import apply_layout, sliced_linear
from .svd import SVDCache, thin_svd
from .welore import welore_finetune_params, welore_plan

__all__ = [
    "COMPRESS_METHODS", "CompressState", "DSEEConfig", "DSEELayer", "EoRAState", "FactorizedLinear",
    "SVDCache", "apply_layout", "attention_blocks", "compress", "compressed_state", "cubic_sparsity", "densify",
    "dsee_finetune", "dsee_prune", "dsee_support", "eora", "eora_factors", "eval_blocks", "evaluate_corpora",
    "factorized_layers",
    "find_blocks", "LoRAMState", "LRECState", "distill_kl", "lrec", "load_compressed", "model_kl",
    "loram", "loraprune", "loraprune_recover", "output_grams", "pela_distill",
    "pela_losses", "perplexity", "prune_heads", "rank_fraction_ranks", "recover", "recover_factors",
    "remove_pruned_units",
    "save_compressed", "second_moments", "sliced_linear", "thin_svd", "uniform_ratio_rank", "weight_perturbation",
    "welore_finetune_params", "welore_plan", "welore_ranks",
]
