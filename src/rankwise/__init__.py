"""rankwise: low-rank and sparse structure for memory-cheap training and fine-tuning."""

from . import compress as compression
from . import federated, optim, sparse
from .adapters import (
    REGISTRY,
    active_adapters,
    adapt,
    adapter_layers,
    adapter_names,
    adapter_state,
    batch_adapters,
    delete_adapter,
    ensemble_batch,
    ensemble_probs,
    get_method,
    lora_ensemble,
    lori_masks,
    merge_adapters,
    set_active,
)
from .adapters.dylora import truncate_rank
from .adapters.eigenlorax import eigenlorax
from .adapters.meteora import meteora
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
from .federated import federate
from .io import load_adapter, load_adapters, save_adapter
from .peft_io import export_peft, import_peft
from .planner import Plan, plan
from .quant import quantize
from .serving import AdapterServer
from .sparse import sparsify

__version__ = "0.1.0"

__all__ = [
    "AdapterServer",
    "Plan",
    "REGISTRY",
    "active_adapters",
    "adapt",
    "adapter_layers",
    "adapter_names",
    "adapter_state",
    "adapters_disabled",
    "compress",
    "batch_adapters",
    "compression",
    "delete_adapter",
    "disable_adapters",
    "eigenlorax",
    "federate",
    "federated",
    "enable_adapters",
    "ensemble_batch",
    "ensemble_probs",
    "export_peft",
    "get_method",
    "import_peft",
    "load_adapter",
    "load_adapters",
    "lora_ensemble",
    "lori_masks",
    "merge",
    "merge_adapters",
    "merge_and_unload",
    "meteora",
    "optim",
    "plan",
    "quantize",
    "save_adapter",
    "set_active",
    "sparse",
    "sparsify",
    "summary",
    "truncate_rank",
    "unload",
    "unmerge",
]
