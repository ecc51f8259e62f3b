"""``rw.plan`` against measurement on CPU with tiny models: model states exact to the byte (the bytes
of the real tensors after one real step), activations within 5% of the bytes saved for backward
(saved-tensor hooks, each storage once) over methods, checkpointing and sequence lengths, and the
peak within 2% of a real three-step CPU run whose every allocation is followed (the CPU stand-in for
``max_memory_allocated``; the GPU check is ``benchmarks/plan_gpu_check.py``), dropout included: the peak
of a tiny BERT with hidden / attention dropout within 2% of ``TensorMemoryTracker`` under either
device's dropout kernels."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import rankwise as rw
from rankwise.memory import unique_parameters
from rankwise.models.loaders import tiny_bert, tiny_llama
from rankwise.optim.accounting import state_bytes
from rankwise.planner import batch_for, loss_of, output_head, plan, saved_bytes

SEED = 0


def _llama_config():
    return tiny_llama(vocab_size=96, hidden=32, layers=2, heads=4, intermediate=64, kv_heads=2, seed=SEED).config


def _model(config, method, method_options, dtype=torch.float32, task="causal-lm", checkpointing=False):
    """A real CPU model from ``config`` with the adapter ``method`` (and checkpointing), in train mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(SEED)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    model = auto.from_config(copy.deepcopy(config), dtype=dtype)
    if method is not None:
        rw.adapt(model, method, **method_options)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _real(config, method, method_options, optimizer, optimizer_options, dtype=torch.float32, task="causal-lm"):
    """A real CPU model from ``config`` after one real training step: (model, optimizer)."""
    model = _model(config, method, method_options, dtype, task)
    opt = rw.optim.make(optimizer, model, **optimizer_options)
    loss_of(model(**batch_for(model, task, 2, 16, "cpu"))).backward()
    opt.step()
    return model, opt


STATE_GRID = [
    (None, {}, "adamw", {}),
    (None, {}, "galore", {"rank": 4}),
    (None, {}, "galore", {"rank": 4, "projector": "svd"}),
    (None, {}, "apollo", {"rank": 4}),
    (None, {}, "fira", {"rank": 4}),
    (None, {}, "frugal", {"rank": 4}),
    (None, {}, "q_galore", {"rank": 4}),
    (None, {}, "galore_adafactor", {"rank": 4}),
    (None, {}, "dct_proj", {"rank": 4}),
    (None, {}, "lisa", {"lr": 1e-3, "n_layers": 1}),
    ("lora", {"r": 4}, "adamw", {}),
    ("lora", {"r": 4}, "adamw", {"weight_decay": 0.01}),
    (None, {}, "badam", {"lr": 1e-3}),
    (None, {}, "owlore", {"lr": 1e-3, "n_layers": 1, "rank": 4, "outlier_threshold": 2.0}),
    ("dora", {"r": 4}, "adamw", {}),
    ("vera", {"r": 4}, "adamw", {}),
]


SAMPLERS = ("lisa", "badam", "owlore", "ist")  # they freeze all but the sampled units: fewer trainable now


@pytest.mark.parametrize(("method", "mopts", "optimizer", "oopts"), STATE_GRID,
                         ids=[f"{m or 'full'}-{o}-{i}" for i, (m, _, o, _) in enumerate(STATE_GRID)])
def test_model_states_exact(method, mopts, optimizer, oopts):
    config = _llama_config()
    p = plan(config, method, optimizer, batch_size=2, seq_len=16, method_options=mopts, optimizer_options=oopts)
    model, opt = _real(config, method, mopts, optimizer, oopts)
    params = unique_parameters(model)
    assert p.weights == sum(t.numel() * t.element_size() for t in params)
    real_grads = sum(t.grad.numel() * t.grad.element_size() for t in params if t.grad is not None)
    assert p.gradients == real_grads or (optimizer == "badam" and p.gradients >= real_grads)
    if optimizer == "badam":  # the plan takes the largest block; the real run starts with one of them
        assert p.optimizer_state + p.projectors >= state_bytes(opt)
    else:
        assert p.optimizer_state + p.projectors == state_bytes(opt)
    assert p.params_trainable == sum(t.numel() for t in params if t.requires_grad) or optimizer in SAMPLERS


#: Adapter methods rw.plan refuses, and why: their data pass chooses each layer's shape (MethodSpec.plan), or
#: their layers compute from real weights even when built structure-only.
UNPLANNED = {"eva": "ranks from data", "gora": "ranks from data", "plop": "placement from data",
             "lt_sft": "mask from a phase-1 fine-tuning", "lq_lora": "bit widths chosen from W while built"}
EVERY_ADAPTER = sorted(n for n, s in rw.REGISTRY.items() if s.family != "quantization" and not s.needs_adapters)


@pytest.mark.parametrize("method", EVERY_ADAPTER)
def test_model_states_exact_for_every_adapter(method):
    """Every adapter method rw.plan accepts (those whose initialization reads gradients, layer inputs or W
    built structure-only on the meta device): weights, gradients, AdamW state and trainable count equal to the
    byte a real tiny Llama's after one real step (its initialization run on real data)."""
    config = _llama_config()
    try:
        p = plan(config, method, "adamw", batch_size=2, seq_len=16, method_options={"r": 4})
    except ValueError as error:
        assert method in UNPLANNED, f"{method}: {error}"
        return
    assert method not in UNPLANNED, f"{method} is planned now: take it off UNPLANNED"
    torch.manual_seed(SEED)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(copy.deepcopy(config)).train()
    batch = batch_for(model, "causal-lm", 2, 16, "cpu")
    rw.adapt(model, method, r=4, init_data=[batch])
    opt = rw.optim.make("adamw", model)
    loss_of(model(**batch)).backward()
    opt.step()
    params = unique_parameters(model)
    assert p.weights == sum(t.numel() * t.element_size() for t in params)
    assert p.params_trainable == sum(t.numel() for t in params if t.requires_grad)
    assert p.gradients == sum(t.grad.numel() * t.grad.element_size() for t in params if t.grad is not None)
    assert p.optimizer_state + p.projectors == state_bytes(opt)


def test_qlora_is_lora_over_its_own_4bit_base():
    """QLoRA / LoftQ plan as LoRA over the storage format their options make (nf4 + double quantization
    by default; fp4 without it), with the same trainable count as the real layers."""
    pytest.importorskip("bitsandbytes")
    config = _llama_config()
    for method in ("qlora", "loftq"):
        p = plan(config, method, "adamw", batch_size=2, seq_len=16, method_options={"r": 4})
        lora = plan(config, "lora", "adamw", batch_size=2, seq_len=16, method_options={"r": 4}, quant="nf4-b64-dq")
        assert (p.weights, p.params_trainable, p.optimizer_state, p.quant, p.method) == (
            lora.weights, lora.params_trainable, lora.optimizer_state, "nf4-b64-dq", method)
    fp4 = plan(config, "qlora", "adamw", batch_size=2, seq_len=16,
               method_options={"r": 4, "quant_type": "fp4", "double_quant": False})
    assert fp4.quant == "fp4-b64" and fp4.weights > p.weights  # fp32 block scales instead of 8-bit ones
    model = _model(config, "qlora", {"r": 4})
    assert p.params_trainable == sum(t.numel() for t in unique_parameters(model) if t.requires_grad)
    with pytest.raises(ValueError, match="quantizes the base itself"):
        plan(config, "qlora", "adamw", quant="nf4")


def test_ist_keeps_every_layers_state():
    """IST keeps a sleeping layer's AdamW state (the official callback does not rebuild the optimizer): once
    every layer has been drawn its state is every trainable parameter's, which the plan counts (LISA's
    plan, which drops it, counts only the drawn layers')."""
    config = _llama_config()
    p = plan(config, None, "ist", batch_size=2, seq_len=16, optimizer_options={"n_layers": 1})
    model = _model(config, None, {})
    opt = rw.optim.make("ist", model, lr=1e-3, n_layers=1)
    inputs = batch_for(model, "causal-lm", 2, 16, "cpu")
    drawn = set()
    for _ in range(8):
        drawn.update(opt.active_layers)
        loss_of(model(**inputs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert drawn == {0, 1}
    assert p.optimizer_state + p.projectors == state_bytes(opt)
    lisa = plan(config, None, "lisa", batch_size=2, seq_len=16, optimizer_options={"n_layers": 1})
    assert lisa.optimizer_state < p.optimizer_state


def test_model_states_bf16_base_fp32_adapter():
    config = _llama_config()
    p = plan(config, "lora", "adamw", dtype="bf16", batch_size=2, seq_len=16, method_options={"r": 4})
    model, opt = _real(config, "lora", {"r": 4}, "adamw", {}, dtype=torch.bfloat16)
    params = unique_parameters(model)
    assert {t.dtype for t in params if t.requires_grad} == {torch.float32}
    assert p.weights == sum(t.numel() * t.element_size() for t in params)
    assert p.gradients == sum(t.grad.numel() * t.grad.element_size() for t in params if t.grad is not None)
    assert p.optimizer_state + p.projectors == state_bytes(opt)


def _measured_saved(config, method, mopts, checkpointing, seq, task="causal-lm"):
    model = _model(config, method, mopts, task=task, checkpointing=checkpointing)
    inputs = batch_for(model, task, 2, seq, "cpu")
    out = {}
    layers, head = saved_bytes(model, lambda: out.setdefault("o", model(**inputs)), output_head(model))
    loss_of(out["o"]).backward()
    return layers + head


ACT_GRID = [(m, mo, ck, s) for m, mo in ((None, {}), ("lora", {"r": 4}), ("dora", {"r": 4}))
            for ck in (False, True) for s in (32, 64)]


@pytest.mark.parametrize(("method", "mopts", "checkpointing", "seq"), ACT_GRID)
def test_activations_within_5_percent(method, mopts, checkpointing, seq):
    config = _llama_config()
    p = plan(config, method, "adamw", batch_size=2, seq_len=seq, checkpointing=checkpointing, method_options=mopts)
    measured = _measured_saved(config, method, mopts, checkpointing, seq)
    assert abs(p.activations + p.logits - measured) <= 0.05 * measured, (p.activations + p.logits, measured)


def test_activations_bert_seq_cls():
    config = tiny_bert(vocab_size=96, hidden=32, layers=2, heads=4, intermediate=64, seed=SEED).config
    p = plan(config, "lora", "adamw", task="seq-cls", batch_size=2, seq_len=32, method_options={"r": 4})
    measured = _measured_saved(config, "lora", {"r": 4}, False, 32, task="seq-cls")
    assert abs(p.activations + p.logits - measured) <= 0.05 * measured, (p.activations + p.logits, measured)


def test_sharding_and_layerwise_divide():
    config = _llama_config()
    one = plan(config, None, "adamw", batch_size=2, seq_len=16)
    four = plan(config, None, "adamw", batch_size=2, seq_len=16, world_size=4)
    assert four.weights < one.weights / 3 and four.optimizer_state < one.optimizer_state / 3
    lw = plan(config, None, "adamw", batch_size=2, seq_len=16, layerwise=True)
    assert lw.gradients < one.gradients / 4 and lw.optimizer_state == one.optimizer_state


def test_budget_and_errors():
    config = _llama_config()
    p = plan(config, "lora", "adamw", batch_size=2, seq_len=16, method_options={"r": 4}, memory=1 << 40)
    assert p.fits is True and "fits" in p.table()
    assert plan(config, "lora", "adamw", batch_size=2, seq_len=16, memory=1024).fits is False
    with pytest.raises(ValueError, match="optimizer"):
        plan(config, None, "nope")
    with pytest.raises(ValueError, match="adapter method"):
        plan(config, None, "adamw", quant="nf4")
    with pytest.raises(ValueError, match="device"):
        plan(config, None, "adamw", device="gpu")
    for sampler in ("badam", "lisa", "owlore", "ist"):  # no lr given (it does not change memory), OwLore's odds
        options = {"rank": 4, "n_layers": 1} if sampler == "owlore" else {}  # not read from meta weights
        assert plan(config, None, sampler, batch_size=2, seq_len=16, optimizer_options=options).peak > 0
    with pytest.raises(ValueError, match="chooses each layer's shape from data"):
        plan(config, "eva", "adamw")
    with pytest.raises(ValueError, match="built from the adapters already on a model"):
        plan(config, "meteora", "adamw")  # not built structure-only without its experts (an error in trace)
    for method in ("lora", "lora_ga", "eva"):  # wrong settings are said as they are, not as a meta-device limit
        with pytest.raises(ValueError, match=r"^r=0 must be a positive integer"):
            plan(config, method, "adamw", method_options={"r": 0})


def _tracked_peak(config, method, mopts, optimizer, oopts, batch, seq, checkpointing=False):
    """Parameter bytes + the most bytes a real CPU run (three steps: forward, backward, step,
    zero_grad) has alive at once, following every storage an op creates until it is freed."""
    from rankwise.planner import _LiveBytes

    model = _model(config, method, mopts, checkpointing=checkpointing)
    opt = rw.optim.make(optimizer, model, **oopts)
    inputs = batch_for(model, "causal-lm", batch, seq, "cpu")
    params = unique_parameters(model)
    with _LiveBytes(params) as live:
        for _ in range(3):
            loss_of(model(**inputs)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return sum(p.numel() * p.element_size() for p in params) + live.peak


PEAK_GRID = [  # (method, options, optimizer, options, batch, seq, checkpointing); the last two peak at the step
    (None, {}, "adamw", {"foreach": True}, 4, 64, False),
    ("lora", {"r": 8}, "adamw", {"foreach": True}, 4, 64, True),
    (None, {}, "galore", {"rank": 16}, 4, 64, False),
    (None, {}, "apollo", {"rank": 16}, 2, 32, True),
    (None, {}, "adamw", {"foreach": True}, 1, 2, False),
    (None, {}, "galore", {"rank": 16, "projector": "svd"}, 1, 2, False),
]


@pytest.mark.parametrize(("method", "mopts", "optimizer", "oopts", "batch", "seq", "ckpt"), PEAK_GRID)
def test_peak_matches_tracked_cpu_run(method, mopts, optimizer, oopts, batch, seq, ckpt):
    config = tiny_llama(vocab_size=512, hidden=64, layers=2, heads=4, intermediate=128, kv_heads=2, seed=SEED).config
    p = plan(config, method, optimizer, batch_size=batch, seq_len=seq, checkpointing=ckpt, method_options=mopts,
             optimizer_options=oopts)
    measured = _tracked_peak(config, method, mopts, optimizer, oopts, batch, seq, ckpt)
    assert abs(p.peak - measured) <= 0.02 * measured, (p.peak, measured, p.peak_phase)


def test_gpu_check_script_dry_run(capsys):
    """benchmarks/plan_gpu_check.py runs its code path on CPU (the GPU comparison needs CUDA)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_gpu_check.py"
    spec = importlib.util.spec_from_file_location("plan_gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--dry-run", "--only", "galore-svd"]) == 0
    assert "1 configurations ran on CPU" in capsys.readouterr().out


def _bert_config(hidden_dropout, attention_dropout):
    from transformers import BertConfig

    return BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=128, num_labels=2, pad_token_id=0,
                      hidden_dropout_prob=hidden_dropout, attention_probs_dropout_prob=attention_dropout)


def _tracker_peak(config, steps=2, dropout=None):
    """Peak bytes of a real CPU LoRA + AdamW run of the BERT classifier ``config`` (2 × 64 tokens),
    measured by ``TensorMemoryTracker`` over ``steps`` steps (the optimizer state is held from the
    second on, as the plan assumes); ``dropout`` replaces ``F.dropout`` for the run."""
    from rankwise.memory import TensorMemoryTracker

    model = _model(config, "lora", {"r": 4}, task="seq-cls")
    opt = rw.optim.make("adamw", model)
    inputs = batch_for(model, "seq-cls", 2, 64, "cpu")
    params = unique_parameters(model)
    real = torch.nn.functional.dropout
    torch.nn.functional.dropout = dropout or real
    try:
        with TensorMemoryTracker(baseline=sum(p.numel() * p.element_size() for p in params)) as tracker:
            for _ in range(steps):
                loss_of(model(**inputs)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        torch.nn.functional.dropout = real
    return tracker.peaks()["total"]


DROPOUT_GRID = [(0.1, 0.1), (0.1, 0.0), (0.0, 0.1), (0.0, 0.0)]


@pytest.mark.parametrize(("hidden", "attention"), DROPOUT_GRID)
def test_peak_with_dropout_matches_tracker_cpu(hidden, attention):
    """CPU kernels: hidden dropout saves a float mask (ATen's composite dropout), attention dropout
    sends SDPA to the math kernel (S×S scores, mask and dropped probabilities)."""
    config = _bert_config(hidden, attention)
    p = plan(config, "lora", "adamw", task="seq-cls", batch_size=2, seq_len=64, method_options={"r": 4},
             device="cpu")
    measured = _tracker_peak(config)
    assert abs(p.peak - measured) <= 0.02 * measured, (p.peak, measured)


def test_peak_with_fused_dropout_cuda_masks():
    """CUDA kernels: ``F.dropout`` is ``native_dropout``, which keeps a bool mask; measured on CPU by
    running the same fused op (attention dropout off: CUDA's attention keeps no mask, CPU's would)."""
    config = _bert_config(0.1, 0.0)
    p = plan(config, "lora", "adamw", task="seq-cls", batch_size=2, seq_len=64, method_options={"r": 4})
    measured = _tracker_peak(config, dropout=lambda x, p=0.5, training=True, inplace=False:
                             torch.native_dropout(x, p, training)[0])
    assert abs(p.peak - measured) <= 0.02 * measured, (p.peak, measured)
    assert p.peak < plan(config, "lora", "adamw", task="seq-cls", batch_size=2, seq_len=64,
                         method_options={"r": 4}, device="cpu").peak
