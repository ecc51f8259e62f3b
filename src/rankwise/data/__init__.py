"""Offline datasets (BBC News, drug reviews, stdlib code) and token loaders."""

from .datasets import (
    ASSET_PINS,
    DATASETS,
    STDLIB_FILES,
    DatasetInfo,
    MissingAssetError,
    TextClassification,
    asset_dir,
    classification_loader,
    lm_blocks,
    lm_loader,
    load_classification,
    load_text,
    stdlib_files,
    stdlib_root,
    stdlib_sha256,
    stratified_split,
)

__all__ = [
    "ASSET_PINS", "DATASETS", "STDLIB_FILES", "DatasetInfo", "MissingAssetError",
    "TextClassification", "asset_dir", "classification_loader", "lm_blocks", "lm_loader",
    "load_classification", "load_text", "stdlib_files", "stdlib_root", "stdlib_sha256",
    "stratified_split",
]
