"""Adapters: a frozen base layer plus a trainable delta. Importing this package registers every method."""

from . import lora  # noqa: F401  (registers lora, rslora and the LoRA-shaped inits)
from .base import AdapterConfig, AdapterLayer
from .registry import REGISTRY, MethodSpec, adapt, adapter_layers, get_method, register

__all__ = ["AdapterConfig", "AdapterLayer", "MethodSpec", "REGISTRY", "adapt", "adapter_layers", "get_method", "register"]
