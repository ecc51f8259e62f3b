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


SAMPLERS = {
    "badam": {"lr": 1e-2, "switch_every": 2, "order": "random", "seed": 3},
    "lisa": {"lr": 1e-2, "n_layers": 1, "switch_every": 2, "seed": 3},
    "owlore": {"lr": 1e-2, "rank": 4, "n_layers": 1, "switch_every": 2, "update_gap": 2,
               "outlier_threshold": 3.0, "seed": 3},
}


@pytest.mark.parametrize("split", [2, 3])  # 2: right after a block switch (BAdam's state is empty)
@pytest.mark.parametrize("method", list(SAMPLERS))
def test_dcp_checkpoint_of_samplers_resumes_bit_exactly(method, split, tmp_path):
    """``rankwise.optim.checkpoint`` on one process (a DCP checkpoint): the sampler's schedule, awake
    blocks and RNG come back, so the run continues bit-exactly (2 processes: ``test_checkpoint.py``)."""
    from rankwise.optim import checkpoint

    kwargs, batches = SAMPLERS[method], make_batches(5)
    model = make_model()
    optimizer = make_optimizer(method, model, kwargs)
    train(model, optimizer, batches[:split])
    checkpoint.save(model, optimizer, str(tmp_path / "ckpt"), step=split)
    train(model, optimizer, batches[split:])

    fresh = make_model(seed=1)
    fresh_opt = make_optimizer(method, fresh, kwargs)
    assert checkpoint.load(fresh, fresh_opt, str(tmp_path / "ckpt")) == {"step": split}
    assert fresh_opt.global_step == split
    train(fresh, fresh_opt, batches[split:])
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), (method, name)
