"""Every registered adapter method (``rw.adapt`` then ``fully_shard``) and every structured layer
(``rw.sparsify``: sltrain, sst, relora, trp, maestro) under FSDP2, 2 CPU processes on gloo, in one
launch: 3 AdamW steps on the trainable parameters match one process on the same global batches.

The model is cast to float64 after ``adapt`` / ``sparsify``; the initialisations (PiSSA's SVD,
LoRA-GA's gradient estimate, ...) run before sharding, identically on every rank, so the reference
runs with one thread as the workers do (a different thread count changes fp32 SVD results by ~1e-7).
Measured: ≤ 3.5e-14 for every adapter, 1.8e-7 for sltrain (its sparse kernel sums in a different
order over the local batch; its gradient differs by ~1e-9 and Adam's first steps amplify it).
Quantized bases (qlora, loftq, lq_lora) and methods built from other adapters (meteora) are not
part of it (see docs/distributed.md).
"""

from __future__ import annotations

import json

import pytest
import torch

import rankwise as rw
from rankwise.sparse import SPARSE_METHODS

from .fsdp_worker import available, launch, structured_model, structured_one_process

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

TOL = 1e-6
STEPS = 3
ADAPTERS = sorted(n for n, s in rw.REGISTRY.items() if s.family != "quantization" and not s.needs_adapters)
SPARSE_KWARGS = {"sltrain": {"rank": 4, "density": 0.1}, "sst": {"rank": 4}, "relora": {"rank": 4},
                 "trp": {}, "maestro": {"rank": 8}, "refactor_reset": {"rank": 4},
                 # one head: under data parallel each rank chunks its own rows over the heads, so with H > 1
                 # a head sees other rows than in one process (docs/sparse.md)
                 "lte": {"heads": 1, "rank": 4}}
CASES = {
    **{m: ("adapt", m, {"r": 4}) for m in ADAPTERS},
    **{f"sparse_{m}": ("sparsify", m, SPARSE_KWARGS.get(m, {})) for m in sorted(SPARSE_METHODS)},
}


@pytest.fixture(scope="module")
def structured_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_structured")
    specs = [{"tag": t, "kind": k, "method": m, "kwargs": kw, "steps": STEPS} for t, (k, m, kw) in CASES.items()]
    launch("structured", specs, out, timeout=600)
    return out


@pytest.mark.parametrize("tag", list(CASES))
def test_fsdp2_matches_one_process(structured_dir, tag, one_thread):
    kind, method, kwargs = CASES[tag]
    assert json.loads((structured_dir / f"{tag}.json").read_text())["error"] is None
    reference = structured_one_process(kind, method, kwargs, STEPS)
    sharded = torch.load(structured_dir / f"{tag}.pt", weights_only=True)
    assert sharded.keys() == reference.keys()
    start = {n: p.detach() for n, p in structured_model(kind, method, kwargs).named_parameters()}
    assert max(float((reference[k] - start[k]).abs().max()) for k in start) > 1e-3  # it trained
    assert max(float((sharded[k] - reference[k]).abs().max()) for k in reference) <= TOL, tag
