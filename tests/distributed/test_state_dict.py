"""``torch.distributed.checkpoint.state_dict`` on one process: the optimizer state keyed by parameter
names (what DCP saves) loads into a fresh projected optimizer and the run continues bit-exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from .fsdp_worker import make_batches, make_model, make_optimizer, train

state_dict_api = pytest.importorskip("torch.distributed.checkpoint.state_dict")

CASES = {
    "galore": {"rank": 4, "lr": 1e-2, "update_gap": 2},
    "fira": {"rank": 4, "lr": 1e-2, "update_gap": 2},
    "apollo": {"rank": 4, "lr": 1e-2, "update_gap": 2},
    "frugal": {"rank": 4, "lr": 1e-2, "update_gap": 2, "selector": "randk"},
}


@pytest.mark.parametrize("method", list(CASES))
def test_name_keyed_state_dict_resumes_bit_exactly(method):
    kwargs, batches, split = CASES[method], make_batches(5), 3
    model = make_model()
    optimizer = make_optimizer(method, model, kwargs)
    train(model, optimizer, batches[:split])
    msd, osd = state_dict_api.get_state_dict(model, optimizer)
    assert all(isinstance(k, str) for k in osd["state"])  # parameter names, not positions
    saved = copy.deepcopy({"model": msd, "optim": osd})  # the live tensors keep training below
    train(model, optimizer, batches[split:])

    fresh = make_model(seed=1)
    fresh_opt = make_optimizer(method, fresh, kwargs)
    assert not fresh_opt.state  # empty until the first step, as DCP's get_state_dict expects
    state_dict_api.set_state_dict(
        fresh, fresh_opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"]
    )
    train(fresh, fresh_opt, batches[split:])
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), (method, name)
