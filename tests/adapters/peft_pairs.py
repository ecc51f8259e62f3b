"""Helpers of the adapter tests (not a test module): the same tiny Llama adapted by PEFT and by rankwise, loss
and gradients, a short training run, a closeness check. Used by the DoRA, VeRA, RandLoRA and Bone tests and the
trained round trip of ``test_matrix.py``; PEFT is imported only where a pair is built."""

from __future__ import annotations

import copy

import torch

import rankwise as rw

from ..conftest import lm_batches, make_tiny_llama

# every Linear of the tiny Llama: (out, in) = q 32x32, k/v 16x32, o 32x32, gate/up 64x32, down 32x64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pair(peft_config, method: str, **ours):
    """The same tiny Llama adapted by PEFT and by rankwise (PEFT's tensors are copied over by callers)."""
    import peft  # here, not at import time: test_matrix.py uses the other helpers without PEFT

    base = make_tiny_llama(0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config)
    mine = rw.adapt(copy.deepcopy(base), method, targets=TARGETS, trainable=None, **ours)
    return pm, mine


def _peft_layer(pm, name: str):
    return pm.base_model.model.get_submodule(name)


def _loss_and_grads(model, batch, params):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in params]


def _train(model, steps: int = 3, lr: float = 1e-2, seed: int = 0) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for batch in lm_batches(n=steps, seed=seed):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _close(a, b, atol=1e-5, rtol=1e-4):
    assert torch.allclose(a, b, atol=atol, rtol=rtol), (a - b).abs().max().item()


def check_round_trip(model, base, batch, tmp_path, peft_export: bool = True) -> torch.Tensor:
    """The adapted ``model``'s logits on ``batch``, checked to come back after ``rw.save_adapter`` /
    ``rw.load_adapter`` onto a copy of the unadapted ``base`` and, with ``peft_export``, after
    ``rw.export_peft`` / ``PeftModel.from_pretrained`` (tolerance 1e-4: PEFT sums the factors differently)."""
    with torch.no_grad():
        expected = model(**batch).logits
    rw.save_adapter(model, tmp_path / "rankwise")
    with torch.no_grad():
        loaded = rw.load_adapter(copy.deepcopy(base), tmp_path / "rankwise")
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=0)
    if peft_export:
        from peft import PeftModel

        rw.export_peft(model, tmp_path / "peft")
        with torch.no_grad():
            exported = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
            torch.testing.assert_close(exported(**batch).logits, expected, atol=1e-4, rtol=0)
    return expected


def check_exports(model, make_base, batch, path, ranks: dict[str, int]) -> None:
    """:func:`check_round_trip` (rankwise format under ``path / "rankwise"``, PEFT under ``path / "peft"``) of the
    model in eval mode, and the PEFT file's ``lora_A`` of every layer has its rank in ``ranks``."""
    from safetensors.torch import load_file

    check_round_trip(model.eval(), make_base(), batch, path)
    tensors = load_file(path / "peft" / "adapter_model.safetensors")
    for name, r in ranks.items():
        assert tensors[f"base_model.model.{name}.lora_A.weight"].shape[0] == r


def train_with_trainer(model, path, max_steps: int, **args) -> None:
    """``max_steps`` steps of ``RankwiseTrainer`` on 24 random 3-class sequences of 10 tokens (tiny BERT), batch 4,
    lr 1e-2, CPU; ``args`` are further ``TrainingArguments``. The rank-allocation tests check that it attaches
    the method's controller."""
    import transformers

    from rankwise.hf_trainer import RankwiseTrainer

    from ..conftest import VOCAB

    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, VOCAB, (10,), generator=g), "labels": i % 3} for i in range(24)]
    options = {"per_device_train_batch_size": 4, "learning_rate": 1e-2, **args}
    targs = transformers.TrainingArguments(output_dir=str(path), max_steps=max_steps, report_to=[], use_cpu=True,
                                           disable_tqdm=True, save_strategy="no", **options)
    RankwiseTrainer(model=model, args=targs, train_dataset=data).train()


def check_peft_parity(pm, mine, pairs, batch, atol: float = 1e-6, grad_atol: float = 1e-6, graded=slice(None)):
    """PEFT model ``pm`` and rankwise model ``mine`` holding the same tensors (``pairs``: (mine, PEFT's)) give the
    same loss on ``batch``, the same gradients of the pairs (those selected by ``graded``), and the same weights
    once merged."""
    loss_p, grads_p = _loss_and_grads(pm, batch, [p for _, p in pairs])
    loss_m, grads_m = _loss_and_grads(mine, batch, [p for p, _ in pairs])
    _close(loss_m, loss_p, atol=atol)
    for gm, gp in zip(grads_m[graded], grads_p[graded], strict=True):
        _close(gm, gp, atol=grad_atol)
    pm.merge_adapter()
    rw.merge(mine)
    for name, layer in rw.adapter_layers(mine):
        _close(layer.base_layer.weight, _peft_layer(pm, name).get_base_layer().weight, atol=atol)
