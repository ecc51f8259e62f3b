"""The rank controllers resumed under FSDP2 through the training loop's distributed checkpoint: each method of
``test_controllers.py`` trained by ``rankwise.train`` on 2 CPU processes (gloo, ``fully_shard`` per decoder layer +
root, a checkpoint every 2 steps: model + optimizer through ``torch.distributed.checkpoint``, each rank's loop and
controller state in its own file), stopped after step 3 and resumed by fresh processes' state — a model initialised
otherwise, resized to the checkpoint's shapes before it is sharded (``reshape_for_resume``) — ends bit-identical to
the uninterrupted run, weights, buffers and the controller's state alike. Every run changes its ranks after the
resume point as well as before it where the method allows.
"""

from __future__ import annotations

import pytest
import torch

from .fsdp_worker import available, launch
from .parity import assert_same

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

QV = ["q_proj", "v_proj"]
STEPS = 6
CASES = {  # the adapter controllers of test_controllers.py, over 6 steps (ranks change on both sides of step 3)
    "increlora": {"targets": QV, "r": 2, "target_r": 4, "incre_interval": 2, "top_h": 4},
    "elalora": {"targets": QV, "r": 3, "warmup": 2, "adjust_interval": 2, "adjust_k": 1},
    "adalora": {"targets": QV, "r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "total_step": STEPS},
    "sora": {"targets": QV, "r": 4, "sparse_lambda": 40.0},
    "dylora": {"targets": QV, "r": 4},
    "prilora": {"targets": QV, "r": 4, "r_start": 2, "r_end": 4, "prune_interval": 2},
    "ard_lora": {"targets": QV, "r": 4, "l1": 20.0},
    "spiel": {"targets": QV, "r": 4, "density": 0.1, "regrow_every": 2, "regrow_steps": 1},
    "autolora": {"targets": QV, "r": 4},
    "drs_lora": {"targets": QV, "r": 4, "max_kappa": 0.3, "kappa_steps": 2, "dense_fraction": 0.25},
}
MLP = ["gate_proj", "up_proj", "down_proj"]
STRUCTURED = {  # rw.sparsify's controllers (test_structured_controllers.py), acting at steps 2, 4 and 6
    "relora": {"sparsify": {"rank": 4}, "merge_every": 2},
    "sst": {"sparsify": {"rank": 2, "targets": MLP}, "iteration_steps": 1, "iterations_per_round": 2},
    "trp": {"energy": 0.9, "period": 2, "nuclear_weight": 1e-3},
    "maestro": {"lasso": 1e-3, "shrink_threshold": 0.05, "shrink_every": 2},
    "refactor_reset": {"sparsify": {"rank": 4}, "refactor_every": 2},
    "lte": {"sparsify": {"heads": 1, "rank": 2}, "merge_every": 2},
}
R4 = {"targets": QV, "r": 4}
CALLBACKS = {  # the training-dynamics adapters' loop callbacks (test_training_callbacks.py)
    "bilora": R4, "allora": R4, "ba_lora": R4, "cola": {**R4, "chain_every": 2}, "fast_forward": {**R4, "ff_every": 2},
    "lamda": R4, "lora_ggpo": R4, "pst": R4, "roselora": R4, "sorsa": R4, "lora_dropout": R4, "loft": R4,
    "lora_pro": R4, "loraplus": R4, "riemannlora": R4,
}
ALL = {**CASES, **STRUCTURED, **CALLBACKS}


@pytest.fixture(scope="module")
def resume_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_controller_resume")
    # one torchrun launch, 3 short runs per method (~30 s on 2 busy cores)
    launch("controlled-resume", [{"tag": m, "method": m, "kwargs": kw, "steps": STEPS} for m, kw in ALL.items()],
           out, timeout=900.0)
    return out


@pytest.mark.parametrize("method", list(ALL))
def test_controller_resumed_under_fsdp2_is_bit_exact(resume_dir, method):
    saved = torch.load(resume_dir / f"{method}_resume.pt", weights_only=False)
    straight, resumed = saved["straight"], saved["resumed"]
    assert straight and straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, (method, different[:5])
    assert_same(saved["resumed_controller"], saved["straight_controller"], method, exact=True)
