"""LQ-LoRA: exact storage bits of bitsandbytes formats, the exact ILP (multiple-choice knapsack), the
low-rank plus quantized decomposition, and the method over frozen 4-bit bases (CPU bitsandbytes)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def _bnb_narrow_rows_quantize_correctly():
    require_bnb_narrow_rows()

import rankwise as rw  # noqa: E402
from rankwise import quant  # noqa: E402
from rankwise.adapters import knapsack  # noqa: E402
from rankwise.adapters.init import InitContext, quantized_low_rank  # noqa: E402
from rankwise.adapters.lq_lora import LQLoRAConfig, allocate, candidate_errors, lq_lora_report  # noqa: E402
from rankwise.quant import QuantConfig  # noqa: E402

from ..conftest import lm_batches, make_tiny_llama, require_bnb_narrow_rows  # noqa: E402

CONFIGS = ("nf4-b32-dq", "nf4-b64-dq", "nf4-b256", "nf4-b512-dq")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _structured(seed: int, out: int = 96, inp: int = 128) -> torch.Tensor:
    """Gaussian noise plus a rank-6 part: a weight with a few strong directions."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.02 + 0.1 * torch.randn(out, 6, generator=g) @ torch.randn(
        6, inp, generator=g) / 8


# ---------------------------------------------------------------------- storage formats and their bits
@pytest.mark.parametrize("shape", [(64, 96), (33, 17), (300, 700)])
def test_storage_bits_equal_the_bytes_bitsandbytes_stores(shape):
    w = torch.randn(shape)
    for scheme, blocksize, dq in itertools.product(quant.SCHEMES, quant.BLOCKSIZES, (False, True)):
        c = QuantConfig(scheme, blocksize, dq)
        q = c.quantize(w)
        assert q.state.blocksize == blocksize and bool(q.state.nested) == dq and q.state.quant_type == scheme
        assert c.storage_bits(w.numel()) == quant.stored_bits(q), c.name
    # the per-weight rate on a large matrix: 4 code bits + 8/64 scale bits + 32/(64·256) second-level bits
    assert QuantConfig("nf4", 64, True).storage_bits(4096 * 4096) / 4096**2 == pytest.approx(4 + 8 / 64 + 32 / 16384)
    assert QuantConfig("nf4", 32, False).storage_bits(4096 * 4096) / 4096**2 == 5.0


def test_config_names_parse_and_bad_names_name_the_parameter():
    assert QuantConfig.parse("fp4-b128") == QuantConfig("fp4", 128, False)
    assert QuantConfig.parse("nf4-b64-dq").name == "nf4-b64-dq"
    for bad in ("nf4-b48", "int4-b64", "nf4", "nf4-b64-x", 4):
        with pytest.raises(ValueError, match=r"quant_configs=.* is not a quantization config; write '<scheme>"):
            QuantConfig.parse(bad, "quant_configs")
    with pytest.raises(ValueError, match=r"blocksize=48 is not allowed; choose one of \[32, 64"):
        quant.quantize_tensor(torch.randn(4, 64), blocksize=48)


# ---------------------------------------------------------------------- the exact ILP
def _brute(costs, weights, capacity):
    best = None
    for picks in itertools.product(*[range(len(c)) for c in costs]):
        if sum(w[j] for w, j in zip(weights, picks, strict=True)) <= capacity:
            cost = sum(c[j] for c, j in zip(costs, picks, strict=True))
            best = cost if best is None else min(best, cost)
    return best


def test_knapsack_is_optimal_against_brute_force_and_meets_the_capacity():
    rng = random.Random(0)
    for _ in range(250):
        n = rng.randint(1, 6)
        costs = [[rng.random() for _ in range(rng.randint(1, 4))] for _ in range(n)]
        weights = [[rng.randint(0, 20) for _ in c] for c in costs]
        capacity = rng.randint(sum(map(min, weights)), sum(map(max, weights)))
        sol = knapsack.solve(costs, weights, capacity)
        assert sol.weight <= capacity
        assert sol.weight == sum(w[j] for w, j in zip(weights, sol.picks, strict=True))
        assert sol.cost == pytest.approx(_brute(costs, weights, capacity), abs=1e-12)
    with pytest.raises(ValueError, match=r"capacity=3 is infeasible: the lightest choice weighs 4; choose capa"):
        knapsack.solve([[1.0, 0.5], [1.0]], [[2, 5], [2]], 3)


def test_allocation_is_optimal_meets_the_budget_and_a_larger_budget_never_costs_more():
    weights = [_structured(s, *shape) for s, shape in enumerate([(96, 128), (64, 64), (128, 32), (48, 96)])]
    cfg = LQLoRAConfig(r=4, lq_iter=2, init="lq_lora")
    errors = [candidate_errors(w, cfg, CONFIGS) for w in weights]
    numels = [w.numel() for w in weights]
    bits = [[QuantConfig.parse(c).storage_bits(n) for c in CONFIGS] for n in numels]
    low, high = sum(map(min, bits)) / sum(numels), sum(map(max, bits)) / sum(numels)
    totals = []
    for budget in torch.linspace(low, high + 0.05, 12).tolist():
        a = allocate(errors, numels, CONFIGS, budget)
        assert a.average_bits <= budget and sum(a.bits) <= budget * sum(numels)
        assert sum(a.errors) == pytest.approx(_brute(errors, bits, int(budget * sum(numels))), rel=1e-12)
        totals.append(sum(a.errors))
    assert all(b <= a for a, b in zip(totals, totals[1:], strict=False)), totals
    assert totals[-1] < totals[0]  # the budget matters
    with pytest.raises(ValueError, match=r"budget_bits=3.9 is infeasible .* choose budget_bits in \[4\.0"):
        allocate(errors, numels, CONFIGS, 3.9)


# ---------------------------------------------------------------------- the decomposition
def _lq(w: torch.Tensor, iters: int, qconfig=None, r: int = 8, stop: bool = True):
    qconfig = qconfig or QuantConfig()
    cfg = LQLoRAConfig(r=r, alpha=2.0 * r, init="lq_lora")
    return quantized_low_rank(w, InitContext(config=cfg, r=r, scale=cfg.scale), qconfig, iters, svd_first=True,
                              stop_on_increase=stop), cfg.scale


def test_decomposition_error_falls_over_iterations_and_beats_plain_quantization():
    w = _structured(0)
    plain = float((w - quant.dequantize_tensor(QuantConfig().quantize(w))).norm())  # Q(W), zero factors
    d, scale = _lq(w, 6)
    err = float((w - quant.dequantize_tensor(d.base) - scale * d.left @ d.right).norm())
    assert err == pytest.approx(d.errors[-1], rel=1e-5)
    assert all(b <= a for a, b in zip(d.errors, d.errors[1:], strict=False)), d.errors
    assert d.errors[0] < 0.6 * plain, (d.errors, plain)
    assert d.errors[2] < 0.95 * d.errors[0], d.errors
    # LQ-LoRA starts from Q = 0: the first factors are the top-r SVD of W itself (LoftQ's fit W − q(W))
    one, scale = _lq(w, 1)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(scale * one.left @ one.right, (u[:, :8] * s[:8]) @ vh[:8], atol=1e-5)


class _Worsening:
    """A format that gets coarser on every call: 32-blocks first, then 4096-blocks (the error rises)."""

    def __init__(self) -> None:
        self.calls = 0

    def quantize(self, w):
        self.calls += 1
        return QuantConfig("nf4", 32 if self.calls == 1 else 4096, False).quantize(w)


def test_decomposition_stops_when_the_error_rises_and_keeps_the_iterate_before():
    w = _structured(1)
    free, _ = _lq(w, 3, _Worsening(), stop=False)
    assert free.errors[1] > free.errors[0]
    stopped, _ = _lq(w, 3, _Worsening())
    assert stopped.errors == free.errors[:1] and stopped.base.state.blocksize == 32


# ---------------------------------------------------------------------- the method
def _adapt(**kw):
    return rw.adapt(make_tiny_llama(0), "lq_lora", r=4, alpha=8, lq_iter=2, quant_configs=CONFIGS, **kw)


def test_lq_lora_quantizes_per_the_ilp_and_starts_near_the_full_precision_model():
    data = lm_batches(1)
    fp = _logits(make_tiny_llama(0), data[0])
    qlora = _logits(rw.adapt(make_tiny_llama(0), "qlora", r=4), data[0])
    model = _adapt(budget_bits=4.2)
    assert _rel(_logits(model, data[0]), fp) < 0.85 * _rel(qlora, fp)  # measured 0.045 vs 0.063
    state = model.rankwise_adapters["default"]
    report = lq_lora_report(model)
    assert list(report.configs.values()) == list(state.config.assignment) and len(report.configs) == 14
    assert len(set(report.configs.values())) > 1  # the budget mixes formats
    assert report.average_bits <= 4.2
    for target, layer in rw.adapter_layers(model):
        c = QuantConfig.parse(report.configs[target])
        st = layer.base_layer.weight.quant_state
        assert (st.quant_type, st.blocksize, bool(st.nested)) == (c.scheme, c.blocksize, c.double_quant)
        assert report.bits[target] == c.storage_bits(report.numels[target])
        assert layer.lq_errors and layer.init_A.shape == layer.lora_A.shape
    # the choice is the ILP's on the same error table
    weights = [w.weight.detach() for n, w in make_tiny_llama(0).named_modules() if n in report.configs]
    errors = [candidate_errors(w, state.config, CONFIGS) for w in weights]
    assert allocate(errors, [w.numel() for w in weights], CONFIGS, 4.2).configs == list(state.config.assignment)
    for (_, layer), errs, c in zip(rw.adapter_layers(model), errors, state.config.assignment, strict=True):
        assert layer.lq_errors[-1] ** 2 == pytest.approx(errs[CONFIGS.index(c)], rel=1e-4)  # the same decomposition


def test_training_changes_only_the_factors_and_the_4bit_codes_stay_bit_identical():
    data = lm_batches(2)
    model = _adapt(budget_bits=4.3)
    layers = rw.adapter_layers(model)
    codes = {n: (layer.base_layer.weight.data.clone(), layer.base_layer.weight.quant_state.absmax.clone())
             for n, layer in layers}
    factors = {n: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for n, layer in layers}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model(**data[step % 2]).loss.backward()
        if step == 0:
            assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
        opt.step()
        opt.zero_grad()
    for n, layer in layers:
        assert torch.equal(layer.base_layer.weight.data, codes[n][0]), n
        assert torch.equal(layer.base_layer.weight.quant_state.absmax, codes[n][1]), n
        assert not torch.equal(layer.lora_A, factors[n][0]) and not torch.equal(layer.lora_B, factors[n][1]), n


def test_save_load_reuses_the_assignment_and_merge_keeps_each_layers_format(tmp_path):
    data = lm_batches(1)
    model = _adapt(budget_bits=4.2)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.lora_B.add_(0.01)
    expected = _logits(model, data[0])
    rw.save_adapter(model, tmp_path / "a")
    loaded = rw.load_adapter(make_tiny_llama(0), tmp_path / "a")
    assert lq_lora_report(loaded).configs == lq_lora_report(model).configs
    assert torch.allclose(_logits(loaded, data[0]), expected, atol=1e-5)
    blocks = {n: layer.base_layer.weight.quant_state.blocksize for n, layer in rw.adapter_layers(model)}
    codes = {n: layer.base_layer.weight.data.clone() for n, layer in rw.adapter_layers(model)}
    rw.merge(model)
    assert {n: layer.base_layer.weight.quant_state.blocksize for n, layer in rw.adapter_layers(model)} == blocks
    rw.unmerge(model)
    assert all(torch.equal(layer.base_layer.weight.data, codes[n]) for n, layer in rw.adapter_layers(model))


def test_peft_export_is_relative_to_the_decomposition_like_loftq(tmp_path):
    peft = pytest.importorskip("peft")
    data = lm_batches(1)
    model = _adapt(budget_bits=4.2)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.lora_B.add_(0.02)
    rw.export_peft(model, tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / "peft")
    # PEFT applies s·(B·A − B₀A₀) to the full-precision W: it differs from Q + s·B·A by the residual only
    fp = _logits(make_tiny_llama(0), data[0])
    start = _logits(_adapt(budget_bits=4.2), data[0])
    assert _rel(_logits(pm, data[0]), _logits(model, data[0])) < 3 * _rel(start, fp)
    assert _rel(_logits(pm, data[0]), fp) > 2 * _rel(start, fp)  # the trained delta is there


def test_bad_options_name_the_parameter():
    with pytest.raises(ValueError, match=r"budget_bits=3.5 is infeasible .* choose budget_bits in \[4\.0"):
        _adapt(budget_bits=3.5)
    with pytest.raises(ValueError, match="budget_bits=-1 must be a positive number"):
        _adapt(budget_bits=-1)
    with pytest.raises(ValueError, match="lq_iter=0 must be an integer >= 1"):
        rw.adapt(make_tiny_llama(0), "lq_lora", r=2, lq_iter=0)
    with pytest.raises(ValueError, match=r"quant_configs='nf4-b48' is not a quantization config"):
        rw.adapt(make_tiny_llama(0), "lq_lora", r=2, quant_configs=["nf4-b48"])
    with pytest.raises(ValueError, match=r"quant_configs=\[\] must be a non-empty list"):
        rw.adapt(make_tiny_llama(0), "lq_lora", r=2, quant_configs=[])
    with pytest.raises(ValueError, match=r"init='pissa' is not allowed; choose one of \['lq_lora'\]"):
        rw.adapt(make_tiny_llama(0), "lq_lora", r=2, init="pissa")
    with pytest.raises(ValueError, match="assignment has 1 configs for 14 adapted layers"):
        rw.adapt(make_tiny_llama(0), "lq_lora", r=2, assignment=["nf4-b64-dq"])
    with pytest.raises(ValueError, match="overrides of its options for single layers"):
        _adapt(budget_bits=4.2, overrides={"model.layers.0.self_attn.q_proj": {"r": 2}})
    with pytest.raises(ValueError, match="needs the full-precision weight"):
        rw.adapt(rw.quantize(make_tiny_llama(0)), "lq_lora", r=2, lq_iter=1, quant_configs=CONFIGS[:1])
    with pytest.raises(ValueError, match="lq_lora_report reads an 'lq_lora' adapter"):
        lq_lora_report(rw.adapt(make_tiny_llama(0), "lora", r=2))


def test_an_infeasible_budget_is_refused_before_any_decomposition(monkeypatch):
    import rankwise.adapters.lq_lora as lq

    def no_work(*args, **kwargs):
        raise AssertionError("decomposed before checking the budget")

    monkeypatch.setattr(lq, "candidate_errors", no_work)
    with pytest.raises(ValueError, match=r"budget_bits=4.01 is infeasible .* at least 4.0625 .* in \[4.0625, 4.2987\]"):
        _adapt(budget_bits=4.01)
