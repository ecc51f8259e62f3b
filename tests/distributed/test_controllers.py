"""The rank controllers under FSDP2: ``rw.adapt`` then ``fully_shard`` per decoder layer + root, trained by
``rankwise.train`` (which attaches the method's controller) on 2 CPU processes (gloo) in one launch, match
one process on the same global batches (float64 tiny Llama, AdamW, lr 1e-2; weights and buffers within
1e-6, the controller's state — importance scores, counters — within a relative 1e-6), and each run changed
its ranks (grown, pruned, masked, resampled) at least once. IncreLoRA, ElaLoRA
and SoRA change parameter shapes mid-run: their factors are re-sharded (``rankwise.shards.set_parameter``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from .fsdp_worker import available, launch, structured_model
from .parity import compare

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

QV = ["q_proj", "v_proj"]
CASES = {
    "increlora": ({"targets": QV, "r": 2, "target_r": 3, "incre_interval": 2, "top_h": 2}, 5),
    "elalora": ({"targets": QV, "r": 3, "warmup": 2, "adjust_interval": 2, "adjust_k": 1}, 5),
    "adalora": ({"targets": QV, "r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "total_step": 5}, 5),
    "sora": ({"targets": QV, "r": 4, "sparse_lambda": 40.0}, 4),  # 8 of 16 gates reach 0 by step 4
    "dylora": ({"targets": QV, "r": 4}, 4),
    "prilora": ({"targets": QV, "r": 4, "r_start": 2, "r_end": 4, "prune_interval": 2}, 4),
    "ard_lora": ({"targets": QV, "r": 4, "l1": 20.0}, 4),
    "spiel": ({"targets": QV, "r": 4, "density": 0.1, "regrow_every": 2, "regrow_steps": 1}, 4),
    "autolora": ({"targets": QV, "r": 4}, 4),
    "drs_lora": ({"targets": QV, "r": 4, "max_kappa": 0.3, "kappa_steps": 2, "dense_fraction": 0.25}, 4),
    "cuttlefish": ({"interval": 1, "window": 1, "tail": 1, "tolerance": 100.0}, 4),  # factorized at step 2
}


def _trace(info: dict[str, Any], key: str) -> list[Any]:
    return [h[key] for h in info["history"]]


def _rows(info: dict[str, Any], suffix: str) -> list[int]:
    return [shape[0] for name, shape in info["shapes"].items() if name.endswith(suffix)]


# what shows that each run changed its ranks
CHANGED: dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor]], bool]] = {
    "increlora": lambda info, _: _trace(info, "increlora_rank")[-1] > _trace(info, "increlora_rank")[0],
    "elalora": lambda info, _: len(set(_rows(info, "lora_A"))) > 1,  # some layers grew, others shrank
    "adalora": lambda info, _: _trace(info, "adalora_rank")[-1] < _trace(info, "adalora_rank")[0],
    "sora": lambda info, _: min(_rows(info, "gate")) < 4,  # zero-gate ranks removed at the end
    "dylora": lambda info, _: len(set(_trace(info, "dylora_rank"))) > 1,
    "prilora": lambda info, _: _trace(info, "prilora_pruned")[-1] > 0,
    "ard_lora": lambda info, _: _trace(info, "ard_lora_rank")[-1] < _trace(info, "ard_lora_rank")[0],
    "autolora": lambda info, _: min(_rows(info, "gate")) < 4,  # pruned at the end
    "drs_lora": lambda info, _: min(_rows(info, "gate")) < 4,  # thresholded gates pruned at the end
    "cuttlefish": lambda info, _: any(n.endswith(".U") for n in info["shapes"]),
    "spiel": lambda _, w: any(not torch.equal(w[n], b) for n, b in structured_model(
        "adapt", "spiel", CASES["spiel"][0]).named_buffers() if n.endswith("sparse_index")),
}


@pytest.fixture(scope="module")
def controlled_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_controllers")
    launch("controlled", [{"tag": m, "method": m, "kwargs": kw, "steps": n} for m, (kw, n) in CASES.items()], out)
    return out


@pytest.mark.parametrize("method", list(CASES))
def test_controller_under_fsdp2_matches_one_process(controlled_dir, method, one_thread):
    kwargs, steps = CASES[method]
    reference, ref_info = compare(controlled_dir, method, method, kwargs, steps)
    assert CHANGED[method](ref_info, reference), f"{method}: no rank change in the reference run"


@pytest.mark.parametrize("method", ["increlora", "elalora", "sora", "drs_lora", "autolora", "cuttlefish"])
def test_a_shape_changing_controller_without_the_fsdp2_internals_refuses_at_setup(monkeypatch, method):
    """One process: a model that looks sharded but whose FSDP2 parameter groups are not as rankwise re-shards
    them (another torch) is refused when the controller is built, naming the method and the reason."""
    import rankwise as rw
    from rankwise import shards
    from rankwise.sparse.cuttlefish import Cuttlefish

    monkeypatch.setattr(shards, "sharded", lambda model: True)  # DTensor parameters, no FSDP2 group found
    kwargs, _ = CASES[method]
    with pytest.raises(RuntimeError, match=rf"^{method} changes parameter shapes while it trains; under FSDP2"):
        if method == "cuttlefish":
            model = structured_model("sparsify", method, {})
            Cuttlefish(model, torch.optim.AdamW(model.parameters()), **kwargs)
        else:
            rw.get_method(method).controller(structured_model("adapt", method, kwargs), "default", None, 10)
