"""Every adapter method over a 4-bit base (``rw.quantize``: bitsandbytes NF4, on CPU): it trains, or it refuses
with a clear error when it needs W₀ itself. The model is 64 wide, so bitsandbytes' narrow-row issue on
AVX-512 CPUs (``tests/conftest.py``, ``require_bnb_narrow_rows``) does not arise."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rankwise as rw

from ..conftest import VOCAB, init_data_for, lm_batches
from .test_matrix import METHODS, _randomize_feasibly

pytest.importorskip("bitsandbytes")

#: methods that need W₀ itself (its full gradient, or phase-1 fine-tuning of it), which a 4-bit base has not
NEEDS_FULL_PRECISION_BASE = {"gora", "lora_ga", "lora_one", "lora_sb", "riemannlora", "lt_sft"}


def _llama_64_wide() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_over_a_4bit_base_trains_or_refuses_clearly(method):
    """Trains: one backward reaches every trainable tensor (adapters randomized) and the 4-bit codes stay as
    they were. Refuses (the methods that need W₀): a ValueError naming the 4-bit layers, nothing changed."""
    model = rw.quantize(_llama_64_wide())
    codes = {n: t.clone() for n, t in model.state_dict().items() if torch.is_tensor(t) and t.dtype == torch.uint8}
    assert codes
    init = init_data_for(method, lm_batches(2), 2)
    if method in NEEDS_FULL_PRECISION_BASE:
        with pytest.raises(ValueError, match="4-bit quantized layers"):
            rw.adapt(model, method, r=2, init_data=init)
    else:
        rw.adapt(model, method, r=2, init_data=init)
        _randomize_feasibly(model, method)
        model.train()
        model(**lm_batches(1)[0]).loss.backward()
        dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
        assert not dead, dead[:3]
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in codes.items() if n in state)
