"""rankwise: low-rank and sparse structure for memory-cheap training and fine-tuning."""

from . import compress as compression
from . import optim, sparse
from .adapters import REGISTRY, adapt, adapter_layers, get_method
from .adapters.ops import (
    adapters_disabled,
    disable_adapters,
    enable_adapters,
    merge,
    merge_and_unload,
    summary,
    unload,
    unmerge,
)
from .compress import compress
from .io import load_adapter, save_adapter
from .peft_io import export_peft, import_peft
from .quant import quantize
from .sparse import sparsify

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "adapt",
    "adapter_layers",
    "adapters_disabled",
    "compress",
    "compression",
    "disable_adapters",
    "enable_adapters",
    "export_peft",
    "get_method",
    "import_peft",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "optim",
    "quantize",
    "save_adapter",
    "sparse",
    "sparsify",
    "summary",
    "unload",
    "unmerge",
]
