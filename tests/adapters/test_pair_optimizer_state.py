"""The pair optimizers (LoRA-Pro, LoFT, RiemannLoRA) keep their state in float32 whatever the factors' dtype;
``torch.optim.Optimizer.load_state_dict`` casts floating state to each parameter's dtype, so their
``PairOptimizer.load_state_dict`` puts the saved dtypes back: a reloaded optimizer continues exactly as the
original, on float64 factors (LoFT's reprojection would otherwise mix dtypes and fail) and on bfloat16 ones
(the moments would otherwise be rounded to bf16)."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.adapters.loft import loft_optimizer
from rankwise.adapters.lora_pro import lora_pro_optimizer
from rankwise.adapters.riemannlora import riemannlora_optimizer

from ..conftest import lm_batches, make_tiny_llama

BUILD = {"lora_pro": lora_pro_optimizer, "loft": loft_optimizer, "riemannlora": riemannlora_optimizer}


def _step(model, optimizer, batch):
    optimizer.zero_grad()
    model(**batch).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", list(BUILD))
def test_a_reloaded_pair_optimizer_keeps_its_state_dtypes_and_continues_exactly(method, dtype):
    torch.manual_seed(0)
    data = lm_batches(n=4)
    model = rw.adapt(make_tiny_llama(0), method, targets=["q_proj", "v_proj"], r=2,
                     init_data=data if method == "riemannlora" else None)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    optimizer = BUILD[method](model, lr=1e-2)
    for batch in data[:2]:
        _step(model, optimizer, batch)
    saved = copy.deepcopy(optimizer.state_dict())
    twin = copy.deepcopy(model)
    reloaded = BUILD[method](twin, lr=1e-2)
    reloaded.load_state_dict(saved)
    kinds = {k: v.dtype for st in optimizer.state.values() for k, v in st.items() if torch.is_tensor(v)}
    assert torch.float32 in kinds.values(), kinds  # the state really is kept in float32
    for p, q in zip(optimizer.param_groups[0]["params"], reloaded.param_groups[0]["params"], strict=True):
        for key, value in optimizer.state[p].items():
            if torch.is_tensor(value):
                assert reloaded.state[q][key].dtype == value.dtype, (key, value.dtype)
                assert torch.equal(reloaded.state[q][key], value), key
    for batch in data[2:]:
        _step(model, optimizer, batch)
        _step(twin, reloaded, batch)
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name
