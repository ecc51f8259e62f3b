"""Offline pretrained models (SmolLM2-135M, all-MiniLM-L6-v2) and tiny test models."""

from .loaders import (
    ALIASES,
    LLAMA_SIZES,
    MODELS,
    TASKS,
    MissingAssetError,
    ModelInfo,
    cache_dir,
    count_parameters,
    ensure_smollm2_cache,
    llama_config,
    load_model,
    quiet_transformers,
    resolve_model_name,
    smollm2_cache_path,
    tiny_bert,
    tiny_llama,
)

__all__ = [
    "ALIASES", "LLAMA_SIZES", "MODELS", "TASKS", "MissingAssetError", "ModelInfo", "cache_dir",
    "count_parameters", "ensure_smollm2_cache", "llama_config", "load_model",
    "quiet_transformers", "resolve_model_name", "smollm2_cache_path", "tiny_bert", "tiny_llama",
]
