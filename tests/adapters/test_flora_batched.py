"""flora_batched: every example's own low-rank adapter in one vectorised pass.

Faithful properties (METHODS.md): the batched output of a mixed batch equals running each example
with its own adapter alone (≤ 1e-5), also for adapters of different ranks and with init offsets; and
the cost does not grow with the number of distinct adapters: each adapted layer runs the same two
``bmm`` calls (and no per-adapter GEMM) whether the batch holds 2 or 8 different adapters.
"""

from __future__ import annotations

import collections
import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rankwise as rw

from ..conftest import lm_batches, make_tiny_llama

IDS = lm_batches(n=1, batch=8, seq=6, seed=9)[0]["input_ids"]


def _model(n: int = 8):
    """n adapters of different ranks and methods: flora_batched / lora / rslora at ranks 1..8, and a
    PiSSA (whose init offset the vectorised path folds into its factors)."""
    model = make_tiny_llama(0)
    g = torch.Generator().manual_seed(0)
    methods = ["flora_batched", "lora", "rslora", "pissa"]
    for i in range(n):
        rw.adapt(model, methods[i % len(methods)], r=1 + i % 8, name=f"a{i}", seed=i)
        with torch.no_grad():
            for _, layer in rw.adapter_layers(model, f"a{i}"):
                layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model.eval()


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_rows_equal_each_example_run_with_its_own_adapter_alone():
    model = _model()
    names = ["a3", "a0", None, "a7", "a1", "a3", "__base__", "a5"]
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=names).logits
        base = make_tiny_llama(0)(input_ids=IDS).logits
        for i, name in enumerate(names):
            if name in (None, "__base__"):
                want = base[i]
            else:
                alone = copy.deepcopy(model)
                rw.set_active(alone, name)
                want = alone(input_ids=IDS[i : i + 1]).logits[0]
            torch.testing.assert_close(mixed[i], want, atol=1e-5, rtol=0, msg=f"row {i} ({name})")


def test_cost_does_not_grow_with_the_number_of_distinct_adapters():
    model = _model()
    counts = {}
    for distinct in (2, 8):
        names = [f"a{i % distinct}" for i in range(8)]
        ops = _Ops()
        with torch.no_grad(), ops:
            model(input_ids=IDS, adapter_names=names)
        counts[distinct] = ops.count
    layers = len({t for t, _ in rw.adapter_layers(model)})
    for distinct, count in counts.items():
        assert count["aten.bmm"] == 2 * layers, (distinct, count["aten.bmm"])
    # the adapters' matmuls are the bmm calls: the rest of the forward does not depend on the mix
    same = ("aten.bmm", "aten.mm", "aten.addmm", "aten.linear", "aten.index_select")
    assert {k: counts[2][k] for k in same} == {k: counts[8][k] for k in same}


def test_training_through_a_mixed_batch_reaches_each_adapter_from_its_own_rows():
    model = _model(4)
    names = ["a0", "a1", "a0", None, "a2", "a0", "a1", None]
    for _, layer in rw.adapter_layers(model):
        for p in layer.parameters():
            p.requires_grad_(True)
    model(input_ids=IDS, adapter_names=names).logits.sum().backward()
    used = {"a0", "a1", "a2"}
    for _, layer in rw.adapter_layers(model):
        if layer.adapter_name in used:
            assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
        else:  # 'a3' is on no row: no gradient reaches it
            assert layer.lora_A.grad is None or not layer.lora_A.grad.any()
