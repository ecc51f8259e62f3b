"""Flattened parameters (FSDP1 ``use_orig_params=False``, DeepSpeed ZeRO) in a projected group raise
a ValueError that says so, instead of being stepped unprojected."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise.optim as rwo
from rankwise.optim.projected import ProjectedOptimizer

from ..conftest import make_tiny_llama


def test_flattened_weight_in_projected_group_raises():
    weight = make_tiny_llama().model.layers[0].mlp.up_proj.weight
    flat = nn.Parameter(weight.detach().reshape(-1).clone())  # what FSDP1 / ZeRO hand the optimizer
    with pytest.raises(ValueError, match="flattened.*fully_shard"):
        ProjectedOptimizer([{"params": [flat], "rank": 4}])
    with pytest.raises(ValueError, match="flattened"):
        rwo.make("galore", [{"params": [flat], "rank": 4}])


@pytest.mark.parametrize("marker", ["_is_flat_param", "ds_shape"])
def test_flat_parameter_markers_raise(marker):
    """FSDP1's FlatParameter sets ``_is_flat_param``; DeepSpeed ZeRO-3 parameters carry ``ds_shape``
    (their own tensor may look 2-D): both are rejected by the engine and by ``param_groups``."""
    model = make_tiny_llama()
    weight = model.model.layers[0].mlp.up_proj.weight
    setattr(weight, marker, True if marker == "_is_flat_param" else torch.Size(weight.shape))
    with pytest.raises(ValueError, match="flattened"):
        ProjectedOptimizer([{"params": [weight], "rank": 4}])
    with pytest.raises(ValueError, match="param_groups.*flattened"):
        rwo.param_groups(model, rank=4)
    with pytest.raises(ValueError, match="flattened"):
        rwo.make("galore", model, rank=4)
