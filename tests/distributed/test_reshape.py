"""A distributed resume of a run whose ranks changed while training: the callbacks' ``before_load``
resizes the fresh model to the checkpoint's shapes (read from the DCP metadata, buffers with their
values) before anything is loaded, exactly as on one process. 2 CPU processes on gloo, checkpoints
through ``torch.distributed.checkpoint``:

* IncreLoRA (its controller grows the adapter at steps 2 and 4) and Cuttlefish (factorizes every
  layer at step 2) stopped after step 3 and resumed by a model built at the initial ranks (and
  initialised otherwise) end bit-identical to the uninterrupted 6-step run;
* the IncreLoRA checkpoint loads into a fresh model resized before ``fully_shard`` (FSDP2), bit-exactly,
  and a model sharded at the initial ranks is refused naming a tensor and its two shapes; resumed so and
  trained on sharded (its controller grows the adapter again at step 4, on the shards), it ends where
  the uninterrupted unsharded run ends (within 1e-10);
* on one process: the mismatch message at a DCP load, and ElaLoRA resized from the DCP shapes alone.

Apart from that sharded resume each rank trains an unsharded model on the whole batches (the controllers'
steps on shards are tested in test_controllers.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from .fsdp_worker import available, launch

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

CASES = {
    "increlora": {"targets": ["q_proj", "v_proj"], "r": 2, "target_r": 4, "incre_interval": 2, "top_h": 4},
    "cuttlefish": {"interval": 1, "window": 1, "tail": 1, "tolerance": 100.0},
}


@pytest.fixture(scope="module")
def reshape_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("reshape")
    launch("reshape", [{"tag": m, "method": m, "kwargs": kw, "steps": 6} for m, kw in CASES.items()], out)
    return out


def _load(out, name):
    return torch.load(out / name, weights_only=True)


@pytest.mark.parametrize("method", list(CASES))
def test_resume_after_a_rank_change_is_bit_exact(reshape_dir, method):
    straight, resumed = _load(reshape_dir, f"{method}_straight.pt"), _load(reshape_dir, f"{method}_resumed.pt")
    ranks = json.loads((reshape_dir / f"{method}.json").read_text())["ranks"]
    if method == "increlora":  # grown from r=2 (+1 reserve) by the checkpoint at step 3
        assert ranks and all(shape[0] > 3 for shape in ranks.values()), ranks
    else:  # factorized: U, V in place of every weight
        assert ranks and not any(k.endswith("q_proj.weight") for k in straight), ranks
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), method


def test_fsdp2_resume_resizes_before_sharding(reshape_dir):
    step3, fsdp = _load(reshape_dir, "increlora_step3.pt"), _load(reshape_dir, "increlora_fsdp.pt")
    assert step3.keys() == fsdp.keys() and all(torch.equal(step3[k], fsdp[k]) for k in step3)
    error = json.loads((reshape_dir / "increlora.json").read_text())["unresized_error"]
    assert error is not None and "shapes differ" in error and "lora_A" in error and "reshape_for_resume" in error


def test_increlora_resumed_into_fsdp2_grows_on_the_shards(reshape_dir):
    straight, resumed = _load(reshape_dir, "increlora_straight.pt"), _load(reshape_dir, "increlora_fsdp_resumed.pt")
    step3 = _load(reshape_dir, "increlora_step3.pt")
    def reserve(w: dict[str, torch.Tensor]) -> int:  # frozen reserve components: λ = 1e-5 exactly (fp32 or fp64)
        return sum(int(torch.isclose(w[k], torch.tensor(1e-5, dtype=w[k].dtype), rtol=1e-6, atol=0).sum())
                   for k in w if k.endswith("lora_E"))

    assert straight.keys() == resumed.keys()
    assert reserve(step3) > 0 and reserve(resumed) == 0  # grown at step 4 (its reserve added, then dropped)
    assert all(straight[k].shape == resumed[k].shape for k in straight)
    assert max(float((straight[k] - resumed[k]).abs().max()) for k in straight) <= 1e-10


def _increlora(r: int) -> torch.nn.Module:
    import rankwise as rw

    from .fsdp_worker import make_model

    return rw.adapt(make_model(), "increlora", targets=["q_proj"], r=r, target_r=r + 2)


def test_a_shape_mismatch_at_dcp_load_names_the_tensor(tmp_path):
    """One process (DCP without a process group): a model at another rank is refused before DCP loads
    anything, naming a tensor and its two shapes, and a tensor missing on either side is named too (DCP
    alone raises a CheckpointException for the first, and ignores a saved tensor the model lacks).
    The tensors handed to ``before_load``: parameters as meta tensors, buffers with their values."""
    from rankwise.checkpoint import sharded_tensors
    from rankwise.optim import checkpoint

    saved = _increlora(4)
    for m in saved.modules():
        if hasattr(m, "ranknum"):
            m.ranknum.fill_(3.0)  # a buffer: handed to before_load with its value
    saved.register_buffer("kept", torch.zeros(2))
    checkpoint.save(saved, torch.optim.AdamW(saved.parameters()), str(tmp_path / "dcp"))
    other = _increlora(2)
    with pytest.raises(ValueError, match=r"shapes differ: model\.layers\.0\.self_attn\.q_proj\.lora_A: \(5, 32\) in "
                                         r"the checkpoint, \(3, 32\) in the model.*only in the checkpoint: \['kept'\]"):
        checkpoint.load(other, torch.optim.AdamW(other.parameters()), str(tmp_path / "dcp"))
    other.register_buffer("extra", torch.zeros(1))
    with pytest.raises(ValueError, match=r"not in the checkpoint: \['extra'\]"):
        checkpoint.load(other, torch.optim.AdamW(other.parameters()), str(tmp_path / "dcp"))
    tensors = sharded_tensors(tmp_path, other)
    a, n = tensors["model.layers.0.self_attn.q_proj.lora_A"], tensors["model.layers.0.self_attn.q_proj.ranknum"]
    assert a.is_meta and a.shape == (5, 32) and a.dtype == torch.float32
    assert not n.is_meta and float(n) == 3.0


def test_elalora_resizes_from_the_dcp_shapes(tmp_path):
    """ElaLoRA's ``before_load`` reads only shapes: given the meta tensors of a DCP checkpoint whose
    layers hold 6 components, a fresh r=4 adapter takes 6, and the checkpoint then loads exactly."""
    import rankwise as rw
    from rankwise.adapters.elalora import ElaLoRAController, ElaLoRALayer
    from rankwise.checkpoint import sharded_tensors
    from rankwise.optim import checkpoint

    from .fsdp_worker import make_model

    def build() -> torch.nn.Module:
        return rw.adapt(make_model(), "elalora", targets=["q_proj"], r=4)

    saved = build()
    layers = [m for m in saved.modules() if isinstance(m, ElaLoRALayer)]
    for m in layers:  # grown to 6 components, with values
        m.resize(6)
        for p in (m.lora_A, m.lora_B, m.lora_E):
            p.data.normal_()
    checkpoint.save(saved, torch.optim.AdamW(saved.parameters()), str(tmp_path / "dcp"))
    fresh = build()
    ElaLoRAController(fresh, total_steps=100).before_load(fresh, sharded_tensors(tmp_path, fresh))
    checkpoint.load(fresh, torch.optim.AdamW(fresh.parameters()), str(tmp_path / "dcp"))
    assert all(m.lora_A.shape == (6, 32) for m in fresh.modules() if isinstance(m, ElaLoRALayer))
    want, got = saved.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
