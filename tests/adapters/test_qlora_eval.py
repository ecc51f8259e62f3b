"""A 4-bit base stays exact and differentiable through an evaluation (bitsandbytes' CPU repacking turned off).

Not in test_qlora.py: that file skips on machines whose bitsandbytes mis-quantizes the tiny models' 32-wide
rows, and those (AVX-512) machines are the ones that repack; this test's model is 128 wide."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

import rankwise as rw  # noqa: E402
from rankwise import quant  # noqa: E402


def test_an_evaluation_leaves_the_4bit_base_exact_and_differentiable():
    """bitsandbytes repacks a 4-bit layer for its CPU inference kernel on the first eval-mode, no-grad forward
    of an AVX512-BF16 machine, lossily (bf16 block scales), and then backpropagates through ``gemv_4bit`` without
    an autograd kernel. rankwise turns that off on the layers it quantizes and on every 4-bit layer it adapts:
    after an evaluation the codes and scales are unchanged and the adapters' gradients are bit for bit the same.
    (Only machines with AVX512-BF16 repack; elsewhere this holds trivially.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # 128 wide: bitsandbytes' repacking fails outright on layers narrower than a block
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    rw.adapt(rw.quantize(model, "nf4"), "lora", r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    q = model.model.layers[0].self_attn.q_proj.base_layer
    codes, scales = q.weight.data.clone(), q.weight.quant_state.absmax.clone()
    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(q.weight.data, codes) and torch.equal(q.weight.quant_state.absmax, scales)
    after = gradients()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if quant.is_linear4bit(m))
