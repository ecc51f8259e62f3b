"""Optimizers and optimizer recipes (plain ``torch.optim`` param groups and optimizers)."""

from ..layout import transformer_blocks
from . import checkpoint
from .apollo import APOLLO, APOLLOMini
from .blocks import IST, LISA, BAdam, OwLore, outlier_ratios
from .coap import COAP
from .dct import DCTGaLore
from .factory import OPTIMIZERS, make
from .fira import Fira
from .flora import Flora
from .frugal import FRUGAL
from .galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .galore_plus import GaLorePlus
from .gradnormlorp import GradNormLoRP
from .groups import param_groups
from .guard import GuardedOptimizer, guard
from .layerwise import GradBytesTracker, LayerwiseOptimizer, layerwise
from .loraplus import loraplus_groups
from .natural_galore import NaturalGaLore
from .osd import OnlineSubspaceDescent
from .prealloc import InitReport, init_state
from .projected import ProjectedOptimizer
from .q_galore import QGaLoreAdamW

__all__ = [
    "BAdam",
    "checkpoint",
    "GradBytesTracker",
    "GuardedOptimizer",
    "InitReport",
    "IST",
    "guard",
    "init_state",
    "LISA",
    "LayerwiseOptimizer",
    "OwLore",
    "layerwise",
    "outlier_ratios",
    "transformer_blocks",
    "loraplus_groups",
    "APOLLO",
    "APOLLOMini",
    "COAP",
    "DCTGaLore",
    "FRUGAL",
    "Fira",
    "Flora",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLorePlus",
    "GradNormLoRP",
    "NaturalGaLore",
    "OPTIMIZERS",
    "OnlineSubspaceDescent",
    "ProjectedOptimizer",
    "QGaLoreAdamW",
    "make",
    "param_groups",
]
