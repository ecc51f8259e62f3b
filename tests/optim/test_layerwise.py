"""Layer-wise optimizer steps in backward: parity with the normal optimizer, accumulation, schedulers,
checkpoints, and the gradient-memory accounting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from rankwise.optim import GradBytesTracker, LayerwiseOptimizer, layerwise

from .ddp_worker import make_batches, make_model


def adamw(groups):
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)


def run(model, opt, batches, accumulate=1, scheduler=None):
    for i, batch in enumerate(batches):
        (model(**batch).loss / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
            if scheduler is not None:
                scheduler.step()


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("accumulate", [1, 3])
def test_layerwise_equals_normal_adamw(accumulate):
    """Same final parameters as one AdamW over all parameters, bit for bit, with and without
    gradient accumulation and with an LR scheduler driving the per-parameter optimizers."""
    normal, lw = make_model(), make_model()
    opt_n = adamw(normal.parameters())
    opt_l = layerwise(lw, adamw, accumulate=accumulate)
    sched_n = torch.optim.lr_scheduler.CosineAnnealingLR(opt_n, T_max=4)
    sched_l = torch.optim.lr_scheduler.CosineAnnealingLR(opt_l, T_max=4)
    batches = make_batches(4 * accumulate)
    run(normal, opt_n, batches, accumulate, sched_n)
    run(lw, opt_l, batches, accumulate, sched_l)
    assert same(normal, lw)
    assert not same(normal, make_model())
    assert {g["lr"] for g in opt_l.param_groups} == {opt_n.param_groups[0]["lr"]}


def test_grads_are_freed_during_backward_and_kept_while_accumulating():
    model = make_model()
    opt = layerwise(model, adamw, accumulate=2)
    batches = make_batches(2)
    model(**batches[0]).loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # accumulating: kept
    model(**batches[1]).loss.backward()
    assert all(p.grad is None for p in model.parameters())  # last micro-batch: stepped and freed
    assert all(int(o.state[p]["step"]) == 1 for p, o in zip(model.parameters(), opt.optimizers, strict=True))


def test_grad_bytes_peak_normal_vs_layerwise():
    """Normal: every gradient is alive at the end of backward. Layer-wise: at most one at a time."""
    normal, lw = make_model(), make_model()
    opt_n, opt_l = adamw(normal.parameters()), layerwise(lw, adamw)
    total = sum(p.numel() * p.element_size() for p in normal.parameters())
    largest = max(p.numel() * p.element_size() for p in normal.parameters())
    batch = make_batches(1)[0]
    with GradBytesTracker(normal) as t_n, GradBytesTracker(lw) as t_l:
        run(normal, opt_n, [batch])
        run(lw, opt_l, [batch])
    assert t_n.peak_bytes == total
    assert t_l.peak_bytes == largest < total
    # accumulation: the gradients coexist again until the last micro-batch
    acc = make_model()
    opt_a = layerwise(acc, adamw, accumulate=2)
    with GradBytesTracker(acc) as t_a:
        run(acc, opt_a, make_batches(2), accumulate=2)
    assert t_a.peak_bytes == total


def test_layerwise_with_projected_galore():
    """Works with the projected GaLore optimizer (groups carrying rank): same result as one GaLoreAdamW.
    Exact SVD: the randomized projector's draws are seeded per parameter number, which a per-parameter
    optimizer restarts at 1."""
    from rankwise.optim import GaLoreAdamW, param_groups

    def galore(groups):
        return GaLoreAdamW(groups, lr=1e-2, update_gap=2, projector="svd")

    normal, lw = make_model(), make_model()
    run(normal, galore(param_groups(normal, rank=4)), make_batches(4))
    run(lw, layerwise(param_groups(lw, rank=4), galore), make_batches(4))
    assert same(normal, lw)
    assert not same(normal, make_model())


def test_state_dict_resume(tmp_path):
    straight = make_model()
    sched = torch.optim.lr_scheduler.StepLR(opt := layerwise(straight, adamw, accumulate=2), 1, 0.5)
    batches = make_batches(8)
    run(straight, opt, batches, 2, sched)
    first = make_model()
    opt1 = layerwise(first, adamw, accumulate=2)
    sched1 = torch.optim.lr_scheduler.StepLR(opt1, 1, 0.5)
    run(first, opt1, batches[:3], 2, sched1)  # stops in the middle of an accumulation window
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict(),
                "grads": [p.grad for p in first.parameters()]}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = make_model(seed=1)
    resumed.load_state_dict(ckpt["model"])
    for p, g in zip(resumed.parameters(), ckpt["grads"], strict=True):
        p.grad = g
    opt2 = layerwise(resumed, adamw, accumulate=2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 1, 0.5)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert opt2.param_groups[0]["lr"] == opt1.param_groups[0]["lr"]
    # (i counts micro-batches from the checkpoint: the window closes on batch 4 = i 0)
    for i, batch in enumerate(batches[3:]):
        (resumed(**batch).loss / 2).backward()
        if i % 2 == 0:
            opt2.step()
            opt2.zero_grad()
            sched2.step()
    assert same(straight, resumed)


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="accumulate=0 must be an integer >= 1"):
        LayerwiseOptimizer(model, adamw, accumulate=0)
    with pytest.raises(ValueError, match="optimizer_factory must be callable"):
        LayerwiseOptimizer(model, "adamw")
    with pytest.raises(ValueError, match="exactly the parameter it is given"):
        LayerwiseOptimizer(model, lambda g: torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="appears twice"):
        p = next(model.parameters())
        LayerwiseOptimizer([p, p], adamw)
    opt = layerwise(make_model(), adamw)
    with pytest.raises(ValueError, match="this LayerwiseOptimizer has"):
        opt.load_state_dict({"optimizers": [], "pending": [], "accumulate": 1})


MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from rankwise.optim import GradBytesTracker, layerwise
    def rss_mb(key):
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(status[key].split()[0]) / 1024
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    mode = sys.argv[1]
    adamw = lambda g: torch.optim.AdamW(g, lr=1e-4)
    opt = adamw(model.parameters()) if mode == "normal" else layerwise(model, adamw)
    ids = torch.randint(0, 32000, (2, 128), generator=torch.Generator().manual_seed(0))
    tracker = GradBytesTracker(model)
    after_backward = 0.0
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        after_backward = max(after_backward, rss_mb("VmRSS"))
        opt.step()
        opt.zero_grad()
    print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "grad_peak_bytes": tracker.peak_bytes,
                      "rss_after_backward_mb": after_backward, "peak_rss_mb": rss_mb("VmHWM")}))
    """
)


@pytest.mark.slow
def test_measure_peak_memory_58m_llama():
    """Peak live-gradient bytes and process RSS, normal AdamW vs layer-wise, on a 58M Llama (2x128
    tokens); numbers recorded in docs/optimizers-blocks.md. glibc's mmap threshold is pinned so that
    freed tensors go back to the OS and RSS follows live memory."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = {}
    for mode in ("normal", "layerwise"):
        done = subprocess.run([sys.executable, "-c", MEASURE, mode], capture_output=True, text=True,
                              check=True, timeout=600, env=env)
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1))
    params = out["normal"]["params"]
    assert out["normal"]["grad_peak_bytes"] == 4 * params
    assert out["layerwise"]["grad_peak_bytes"] == 4 * 32000 * 512  # the largest tensor: an embedding
    assert out["layerwise"]["rss_after_backward_mb"] < out["normal"]["rss_after_backward_mb"] - 150
    assert out["layerwise"]["peak_rss_mb"] < out["normal"]["peak_rss_mb"]


# ---------------------------------------------------------------------------- state allocated ahead

PREALLOC = ["adamw", "galore", "galore_8bit", "galore_adafactor", "q_galore", "fira", "frugal", "apollo",
            "apollo_mini", "gradnormlorp", "flora_opt", "osd", "dct_proj", "coap", "natural_galore",
            "galore_plus"]


def _factory(name):
    from rankwise.optim import OPTIMIZERS

    def build(groups):
        if name == "adamw":
            return torch.optim.AdamW([{k: v for k, v in g.items() if k != "rank"} for g in groups], lr=1e-2)
        return OPTIMIZERS[name](groups, lr=1e-2)

    return build


def _state_tensors(opt):
    return {(i, k): v for i, o in enumerate(opt.optimizers) for s in o.state.values() for k, v in s.items()
            if torch.is_tensor(v) and v.numel() > 1}


@pytest.mark.parametrize("name", PREALLOC)
def test_init_state_allocates_before_backward_same_numerics(name):
    """Layer-wise optimizers allocate their state at construction: the buffers exist before the first
    backward, the first steps update them in place, and the result is bit-identical to lazily
    allocated state (numerics unchanged)."""
    from rankwise.optim import param_groups

    ahead, lazy = make_model(), make_model()
    opt_a = layerwise(param_groups(ahead, rank=4), _factory(name))
    opt_l = layerwise(param_groups(lazy, rank=4), _factory(name), preallocate=False)
    assert opt_l.state_bytes() == 0 and opt_l.init_report is None
    report = opt_a.init_report
    assert report.allocated_bytes == opt_a.state_bytes() > 0
    before = {k: v.data_ptr() for k, v in _state_tensors(opt_a).items()}
    batches = make_batches(3)
    run(ahead, opt_a, batches[:1])
    after = _state_tensors(opt_a)
    kept = [k for k, ptr in before.items() if k in after and after[k].data_ptr() == ptr]
    if name not in ("galore_8bit", "q_galore"):  # 8-bit codes are re-created by every update
        assert len(kept) == len(before)
    run(ahead, opt_a, batches[1:])
    run(lazy, opt_l, batches)
    assert same(ahead, lazy)
    assert opt_a.state_bytes() == opt_l.state_bytes()


def test_init_state_report_names_what_needs_a_gradient():
    from rankwise.optim import GaLoreAdamW, init_state, param_groups

    model = make_model()
    opt = GaLoreAdamW(param_groups(model, rank=4), lr=1e-2)
    report = init_state(opt)
    assert report.allocated_bytes == opt.state_bytes() > 0
    assert any("basis" in line and "first gradient" in line for line in report.lazy)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert init_state(sgd).allocated_bytes == 0 and "SGD" in init_state(sgd).lazy[0]


def test_grad_workspace_same_numerics_and_no_parameter_sized_temporary():
    """Under the layer-wise hook the engine's AdamW update of a full gradient writes into the gradient's
    buffer (or, on CPU, runs in cache-sized chunks: ``fused.adamw_``): same numbers as without, and no
    temporary of the parameter's size (the parameter is larger than a chunk)."""
    from rankwise.memory import TensorMemoryTracker
    from rankwise.optim import GaLoreAdamW
    from rankwise.optim.inner import grad_workspace

    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(2048, 256))
    b = nn.Parameter(a.detach().clone())
    opt_a, opt_b = GaLoreAdamW([a], lr=1e-2), GaLoreAdamW([b], lr=1e-2)
    for _ in range(3):
        g = torch.randn(2048, 256)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        with TensorMemoryTracker() as tracker, grad_workspace():
            opt_b.step()
        assert torch.equal(a, b)
    assert tracker.peaks()["other"] < a.numel() * 4


def test_tied_weights_stepped_once_and_equal_to_normal():
    """A tied embedding/head weight is one parameter: stepped exactly once per optimizer step (with the
    sum of both uses' gradients), its gradient freed in backward, and the result bit-identical to
    one AdamW over the model."""
    from rankwise.models.loaders import tiny_llama

    normal, lw = (tiny_llama(vocab_size=100, tie_embeddings=True, seed=0) for _ in range(2))
    tied = lw.get_input_embeddings().weight
    assert tied is lw.get_output_embeddings().weight
    opt_n, opt_l = adamw(normal.parameters()), layerwise(lw, adamw)
    steps = {}
    for o in opt_l.optimizers:
        o.register_step_post_hook(lambda opt, args, kwargs: steps.update({opt: steps.get(opt, 0) + 1}))
    batches = make_batches(4)
    for batch in batches:
        normal(**batch).loss.backward()
        opt_n.step()
        opt_n.zero_grad()
        lw(**batch).loss.backward()
        assert tied.grad is None
    assert set(steps.values()) == {4} and len(steps) == len(opt_l.optimizers)
    tied_opt = next(o for o in opt_l.optimizers if o.param_groups[0]["params"][0] is tied)
    assert float(tied_opt.state[tied]["step"]) == 4
    assert same(normal, lw)


def test_tensor_memory_tracker_counts_live_storages():
    from rankwise.memory import TensorMemoryTracker

    x = torch.ones(1000)  # made before: not counted (baseline covers it)
    with TensorMemoryTracker(baseline=4000) as tracker:
        tracker.mark("a")
        y = x * 2  # 4000 bytes
        z = y.view(10, 100)  # a view: no new storage
        y.add_(1)  # in place: nothing new
        w = torch.cat([y, y])  # 8000 bytes
        tracker.label(w, "kept")
        del y, z
        tracker.mark("a")
        u = torch.zeros(10)
    peaks = tracker.peaks()
    assert peaks["total"] == 4000 + 12000  # y and w alive together
    assert peaks["kept"] == 8000 and peaks["other"] == 4000
    assert peaks["kept@total"] == 8000 and peaks["other@total"] == 4000
    assert tracker.peaks("a")["total"] == 4000 + 12000
    assert tracker.live_bytes() == 4000 + 8000 + 40
    del w, u


def test_tied_gradient_parts_summed_in_place():
    """With the model given, the head's part of a tied weight's gradient is kept and added in place into
    the embedding's part: one copy fewer at the end of backward than autograd's out-of-place sum of a
    transposed view, and the same parameters bit for bit."""
    from rankwise.memory import TensorMemoryTracker
    from rankwise.models.loaders import tiny_llama

    peaks, models = {}, {}
    batch = make_batches(1, batch=2, seq=8)[0]
    batch = {k: v % 4000 for k, v in batch.items()}
    def fused(groups):  # no parameter-sized temporaries in the step
        return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, fused=True)

    for mode in ("model", "params"):
        model = models[mode] = tiny_llama(vocab_size=4000, hidden=32, tie_embeddings=True, seed=0)
        opt = layerwise(model if mode == "model" else list(model.parameters()), fused)
        tied = opt.tied is not None and opt.tied.params == [model.get_input_embeddings().weight]
        assert tied == (mode == "model")
        for _ in range(2):
            with TensorMemoryTracker() as tracker:
                model(**batch).loss.backward()
            peaks[mode] = tracker.peaks()["total"]
        assert all(p.grad is None for p in model.parameters())
    tied_bytes = 4000 * 32 * 4
    assert peaks["model"] <= peaks["params"] - 0.95 * tied_bytes  # three copies -> two (+ small activations)
    assert same(models["model"], models["params"])


def test_tied_part_kept_when_a_forward_is_never_backpropagated():
    """A forward whose graph is dropped leaves the expected-part count too high: the kept part is then
    delivered at the end of the backward, and the result still equals the normal optimizer's."""
    from rankwise.models.loaders import tiny_llama

    normal, lw = (tiny_llama(vocab_size=100, tie_embeddings=True, seed=0) for _ in range(2))
    opt_n, opt_l = adamw(normal.parameters()), layerwise(lw, adamw)
    assert opt_l.tied is not None and len(opt_l.tied.params) == 1
    for batch in make_batches(2):
        lw(**batch)  # graph built, never backpropagated
        lw(**batch).loss.backward()
        normal(**batch).loss.backward()
        opt_n.step()
        opt_n.zero_grad()
        assert all(p.grad is None for p in lw.parameters())
    assert same(normal, lw)


def test_tied_weights_with_accumulation_equal_to_normal():
    from rankwise.models.loaders import tiny_llama

    normal, lw = (tiny_llama(vocab_size=100, tie_embeddings=True, seed=0) for _ in range(2))
    opt_n, opt_l = adamw(normal.parameters()), layerwise(lw, adamw, accumulate=3)
    assert opt_l.tied is not None and len(opt_l.tied.params) == 1
    batches = make_batches(6)
    run(normal, opt_n, batches, accumulate=3)
    run(lw, opt_l, batches, accumulate=3)
    assert same(normal, lw)
