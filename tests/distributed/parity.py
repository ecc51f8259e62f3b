"""The comparison of a 2-process FSDP2 run of ``fsdp_worker.py controlled`` with one process (the controller tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .fsdp_worker import controlled_run

TOL = 1e-6


def compare(out: Path, tag: str, method: str, kwargs: dict[str, Any],
            steps: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Assert that the sharded run ``tag`` in ``out`` matches one process: the final trainable shapes, the loop's
    logged counts and levels per step, the weights and buffers (≤ 1e-6) and the controller's state (relative
    1e-6). Returns the reference's weights and log, to check that the controller acted."""
    info = json.loads((out / f"{tag}.json").read_text())
    assert info["error"] is None, info["error"]
    reference, ref_info = controlled_run(method, kwargs, steps)
    sharded = torch.load(out / f"{tag}.pt", weights_only=True)
    assert info["shapes"] == ref_info["shapes"]
    assert info["frozen_grads"] == ref_info["frozen_grads"]  # a frozen parameter computes no gradient
    # the loop's log: the controllers' counts (ranks, pruned entries) and levels per step as on one process
    assert _discrete(info["history"]) == _discrete(ref_info["history"])
    assert sharded.keys() == reference.keys()
    diff = max(float((sharded[k].double() - reference[k].double()).abs().max()) for k in reference
               if reference[k].numel())
    assert diff <= TOL, (tag, diff)
    assert_same(torch.load(out / f"{tag}_controller.pt", weights_only=False), ref_info["controller"], tag)
    return reference, ref_info


def _discrete(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if isinstance(v, int | str)} for h in history]


def assert_same(got: Any, want: Any, where: str, exact: bool = False) -> None:
    """``got`` equals ``want`` (nested dicts / lists; floating tensors and floats to a relative 1e-6, or bit for
    bit with ``exact``)."""
    if torch.is_tensor(want):
        assert torch.is_tensor(got) and got.shape == want.shape and (not exact or got.dtype == want.dtype), where
        if want.is_floating_point() and not exact:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12, msg=where)
        else:
            assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}", exact)
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]", exact)
    elif isinstance(want, float) and not exact:
        assert got == want or abs(got - want) <= 1e-6 * abs(want), where
    else:
        assert got == want, where


def error_of(out: Path, tag: str) -> str | None:
    """The error the sharded run ``tag`` recorded (None when it ran)."""
    return json.loads((out / f"{tag}.json").read_text())["error"]
