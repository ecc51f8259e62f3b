"""A copy of the base weight kept from merge to unmerge, for adapters whose merged weight does not
give the frozen one back by subtracting ΔW (a mask read off the weight itself: LoRS, PST)."""

from __future__ import annotations

import torch

from .base import AdapterLayer


class KeepsBaseOnMerge(AdapterLayer):
    """``merge`` keeps the frozen base weight aside; ``frozen_weight`` returns it while merged and
    ``unmerge`` writes it back exactly."""

    _unmerged: torch.Tensor | None = None

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._unmerged = self.base_weight.detach().clone()
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        self._unmerged = None

    def frozen_weight(self) -> torch.Tensor:
        return self._unmerged if self.merged and self._unmerged is not None else super().frozen_weight()
