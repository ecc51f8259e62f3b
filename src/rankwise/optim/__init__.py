"""Optimizers and optimizer recipes (plain ``torch.optim`` param groups and optimizers)."""

from .loraplus import loraplus_groups

__all__ = ["loraplus_groups"]
