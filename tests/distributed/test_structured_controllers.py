"""The structured controllers of ``rw.sparsify`` under FSDP2: ReLoRA, ReLoRAWarmStart, SST, TRP, Maestro, SLoPe,
RefactorReset, LTE. The float64 tiny Llama, ``rw.sparsify``-ed (ReLoRAWarmStart: dense), ``fully_shard`` per decoder
layer + root, ``rankwise.train`` with AdamW (lr 1e-2) and the controller built on it, on 2 gloo processes (each on
its half of every global batch) in one launch, matches one process on the whole batches (weights and buffers
within 1e-6, the controller's state, the loop's logged counts) after the controller acted. ReLoRAWarmStart
with fp32 factors on a float64 model refuses FSDP2 at setup with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from .fsdp_worker import available, launch, structured_model
from .parity import compare, error_of

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

MLP = ["gate_proj", "up_proj", "down_proj"]
CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "relora": ("relora", {"sparsify": {"rank": 4}, "merge_every": 2}, 4),  # merges at steps 2 and 4
    "relora_random": ("relora", {"sparsify": {"rank": 4}, "merge_every": 2, "reset": "random"}, 3),
    # dense for 2 steps, then LoRA on every linear (A, B sharded into the groups), merges at steps 4 and 6
    "relora_warm": ("relora_warm", {"warm_start": 0.34, "restarts": 1, "rank": 4, "restart_warmup": 1,
                                    "adapter_dtype": "base"}, 6),
    # resampled every step, re-decomposed every 2nd (MLP only: the square attention maps' smallest σ reach 0 in
    # a step, and the singular vectors of a zero σ are arbitrary, so no two runs need agree on them)
    "sst": ("sst", {"sparsify": {"rank": 2, "targets": MLP}, "iteration_steps": 1, "iterations_per_round": 2}, 4),
    "trp": ("trp", {"energy": 0.9, "period": 2, "nuclear_weight": 1e-3}, 4),  # truncated at steps 0, 2, 4
    "maestro": ("maestro", {"lasso": 1e-3, "shrink_threshold": 0.05, "shrink_every": 2}, 4),
    "slope": ("slope", {"sparsify": {"n": 2, "m": 4, "rank": 2}, "lazy_fraction": 0.5}, 4),  # adapters at step 2
    "refactor_reset": ("refactor_reset", {"sparsify": {"rank": 4}, "refactor_every": 2}, 4),
    # one head: each rank's slice goes through it as on one process (more heads chunk each rank's own rows, as
    # the reference's DDP mode does); merged at steps 2 and 4
    "lte": ("lte", {"sparsify": {"heads": 1, "rank": 2}, "merge_every": 2}, 4),
}
REFUSED = {
    "relora_warm_fp32": ("relora_warm", {"warm_start": 0.5, "restarts": 0, "rank": 4, "restart_warmup": 1}, 6),
}


def _initial(kind: str, method: str, options: dict[str, Any]) -> dict[str, torch.Tensor]:
    model = structured_model(kind, method, options)
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _changed_entries(weights: dict[str, torch.Tensor], method: str, options: dict[str, Any], suffix: str) -> bool:
    start = _initial("sparsify", method, options)
    return any(not torch.equal(weights[n], start[n]) for n in start if n.endswith(suffix))


# what shows that each controller acted in the reference run
CHANGED: dict[str, Callable[[dict[str, torch.Tensor], dict[str, Any]], bool]] = {
    "relora": lambda _, info: info["controller"]["merges"] == 2,
    "relora_random": lambda _, info: info["controller"]["merges"] == 1,
    "relora_warm": lambda _, info: info["controller"]["relora"]["merges"] == 2
    and any(n.endswith("lora_A") for n in info["shapes"]),
    "sst": lambda w, _: _changed_entries(w, "sst", CASES["sst"][1]["sparsify"], "active"),
    "trp": lambda w, _: int(torch.linalg.matrix_rank(w["model.layers.0.self_attn.q_proj.weight"])) < 32,
    "maestro": lambda w, _: any(not bool(b.all()) for n, b in w.items() if n.endswith(".keep")),
    "slope": lambda _, info: any(n.endswith("lora_A") for n in info["shapes"]),
    "refactor_reset": lambda _, info: info["controller"] == {"steps": 4, "refactors": 2, "resets": 2},
    "lte": lambda w, _: _changed_entries(w, "lte", CASES["lte"][1]["sparsify"], "merged_B"),
}


@pytest.fixture(scope="module")
def structured_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_structured_controllers")
    launch("controlled", [{"tag": tag, "method": m, "kwargs": kw, "steps": n}
                          for tag, (m, kw, n) in {**CASES, **REFUSED}.items()], out)
    return out


@pytest.mark.parametrize("tag", list(CASES))
def test_structured_controller_under_fsdp2_matches_one_process(structured_dir, tag, one_thread):
    method, kwargs, steps = CASES[tag]
    reference, ref_info = compare(structured_dir, tag, method, kwargs, steps)
    assert CHANGED[tag](reference, ref_info), f"{tag}: the controller did not act in the reference run"


def test_relora_warm_start_refuses_factors_of_another_dtype_under_fsdp2(structured_dir):
    """FSDP2 reduces a parameter group's gradients in one dtype: fp32 A, B cannot join a float64 layer's group."""
    error = error_of(structured_dir, "relora_warm_fp32")
    assert error.startswith("RuntimeError: relora: under FSDP2 the LoRA factors join their target layer's parameter "
                            "group"), error
    assert "pass adapter_dtype='base'" in error
