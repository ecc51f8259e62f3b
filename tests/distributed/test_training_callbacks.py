"""The training-dynamics adapters under FSDP2: their loop callbacks (BiLoRA's levels, ALLoRA, BA-LoRA, COLA, Fast
Forward, LaMDA, LoRA-GGPO, PST, RoseLoRA, SORSA, LoRA Dropout) and their optimizers (LoFT, LoRA-Pro, LoRA+,
RiemannLoRA). The float64 tiny Llama adapted on q/v, ``fully_shard`` per decoder layer + root, ``rankwise.train``
with what the loop attaches for the method, on 2 gloo processes (each on its half of every global batch) in one
launch, matches one process on the whole batches (weights and buffers within 1e-6, the callbacks' state, the
loop's logged counts and levels) after the callback acted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from .fsdp_worker import available, launch
from .parity import compare

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

QV = {"targets": ["q_proj", "v_proj"], "r": 4}
CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "bilora": ("bilora", QV, 4),  # D₂ = every 2nd batch: λ on steps 2 and 4, P, Q (+ orthogonality) on 1 and 3
    "bilora_d2": ("bilora", {**QV, "d2_data": True}, 3),  # λ's gradient from a D₂ loader (a second backward)
    "allora": ("allora", QV, 3),
    "ba_lora": ("ba_lora", QV, 3),  # its SVD term is of the whole batch's logits, gathered from the ranks
    "cola": ("cola", {**QV, "chain_every": 2}, 4),  # links merged into the base at steps 2 and 4
    "fast_forward": ("fast_forward", {**QV, "ff_every": 2}, 3),
    "lamda": ("lamda", {"targets": ["q_proj", "v_proj"], "r": 4}, 4),
    "lora_ggpo": ("lora_ggpo", QV, 3),
    "pst": ("pst", QV, 4),
    "roselora": ("roselora", QV, 4),
    "sorsa": ("sorsa", QV, 3),
    "lora_dropout": ("lora_dropout", QV, 3),
    "loft": ("loft", QV, 3),
    "lora_pro": ("lora_pro", QV, 3),
    "loraplus": ("loraplus", QV, 3),
    "riemannlora": ("riemannlora", QV, 3),
}


def _levels(info: dict[str, Any]) -> list[str]:
    return [h.get("bilora_level") for h in info["history"]]


# what shows that a scheduled callback acted in the reference run (the others act every step)
CHANGED: dict[str, Callable[[dict[str, torch.Tensor], dict[str, Any]], bool]] = {
    "bilora": lambda _, info: _levels(info) == ["lower", "upper", "lower", "upper"],
    "bilora_d2": lambda _, info: _levels(info) == ["both"] * 3,
    "cola": lambda _, info: info["controller"][0]["links"] == 2,  # the loop's callbacks' states, in order
    "fast_forward": lambda _, info: len(info["controller"]["history"]) == 1,  # one stage (at step 2)
    "roselora": lambda w, _: any(bool((t == 0).any()) for n, t in w.items() if n.endswith("lora_A")),  # pruned
}


@pytest.fixture(scope="module")
def callbacks_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_training_callbacks")
    launch("controlled", [{"tag": tag, "method": m, "kwargs": kw, "steps": n} for tag, (m, kw, n) in CASES.items()],
           out)
    return out


@pytest.mark.parametrize("tag", list(CASES))
def test_training_callback_under_fsdp2_matches_one_process(callbacks_dir, tag, one_thread):
    method, kwargs, steps = CASES[tag]
    reference, ref_info = compare(callbacks_dir, tag, method, kwargs, steps)
    if tag in CHANGED:
        assert CHANGED[tag](reference, ref_info), f"{tag}: the callback did not act in the reference run"
