"""The transformers Trainer path (rankwise.hf_trainer): adapter-only checkpoints that load back
exactly (rankwise and PEFT formats), exact resume with rankwise optimizers, loop callbacks."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from peft import PeftModel

import rankwise as rw
from rankwise.hf_trainer import (
    CALLBACKS_FILE,
    LoopCallbacks,
    RankwiseTrainer,
    load_adapter_checkpoint,
    save_adapter_checkpoint,
    trainer_optimizer,
)
from rankwise.sparse.relora import ReLoRA, prepare_relora
from tests.conftest import VOCAB, make_tiny_bert

transformers.logging.set_verbosity_error()


def _dataset(n: int = 24, seq: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, VOCAB, (seq,), generator=g), "labels": int(i % 3)} for i in range(n)]


def _args(out, steps: int = 6, save_steps: int = 3, **kw) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, save_steps=save_steps,
        learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=3,
        **kw,
    )


def _base(tmp_path) -> transformers.PreTrainedModel:
    """The tiny BERT saved to disk and loaded back, so ``_name_or_path`` names a local directory."""
    base_dir = tmp_path / "base"
    if not base_dir.exists():
        make_tiny_bert(seed=0).save_pretrained(base_dir)
    return transformers.AutoModelForSequenceClassification.from_pretrained(base_dir).eval()


def _adapted(tmp_path, method: str = "lora", **options) -> torch.nn.Module:
    return rw.adapt(_base(tmp_path), method, r=4, **options)


def _batch() -> dict:
    g = torch.Generator().manual_seed(9)
    return {"input_ids": torch.randint(1, VOCAB, (3, 10), generator=g)}


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**_batch()).logits


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in rw.io.adapter_tensors(model).items()}


def test_checkpoints_hold_the_adapters_only_and_from_pretrained_loads_them_exactly(tmp_path):
    model = _adapted(tmp_path)
    trainer = RankwiseTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_dataset())
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-6"
    names = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "rankwise_adapter.json",
            "rankwise_adapter.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    adapter_bytes = os.path.getsize(ckpt / "adapter_model.safetensors")
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert adapter_bytes < full_bytes / 5
    want = _logits(model)
    # transformers' own entry point (peft installed): base from base_model_name_or_path + the adapter
    auto = transformers.AutoModelForSequenceClassification.from_pretrained(ckpt)
    torch.testing.assert_close(_logits(auto), want, rtol=1e-5, atol=1e-6)
    peft_model = PeftModel.from_pretrained(_base(tmp_path), ckpt)
    torch.testing.assert_close(_logits(peft_model), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["pissa", "vera", "randlora"])
def test_adapter_checkpoint_loads_back_exactly_into_a_freshly_adapted_model(tmp_path, method):
    """Every method (non-PEFT ones and base-offset inits included) comes back from the rankwise format."""
    model = _adapted(tmp_path, method)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    written = save_adapter_checkpoint(model, tmp_path / "ckpt")
    assert ("adapter_config.json" in written) == (rw.get_method(method).export != "none")
    fresh = _adapted(tmp_path, method)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(_logits(fresh), _logits(model))
    load_adapter_checkpoint(fresh, tmp_path / "ckpt")
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=1e-5, atol=1e-5)


def test_saving_keeps_the_directory_s_other_files(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"x")
    save_adapter_checkpoint(_adapted(tmp_path), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "optimizer.pt").read_bytes() == b"x"
    assert not [p for p in os.listdir(tmp_path / "ckpt") if p.startswith(".")]


def test_load_refuses_a_checkpoint_of_another_method_and_wrong_shapes(tmp_path):
    model = _adapted(tmp_path)
    save_adapter_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="method 'lora'.*'dora'"):
        load_adapter_checkpoint(_adapted(tmp_path, "dora"), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"other adapter settings: r=4 \(the model has 2\)"):
        load_adapter_checkpoint(rw.adapt(_base(tmp_path), "lora", r=2), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="seed=0"):
        load_adapter_checkpoint(rw.adapt(_base(tmp_path), "lora", r=4, seed=7), tmp_path / "ckpt")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "ckpt" / "rankwise_adapter.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_A"))
    save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))},
              str(tmp_path / "ckpt" / "rankwise_adapter.safetensors"))
    with pytest.raises(ValueError, match=f"tensor '{key}': expected finite values"):
        load_adapter_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a rankwise adapter checkpoint"):
        load_adapter_checkpoint(model, tmp_path)


class _StopAt(transformers.TrainerCallback):
    """Ends training after step ``n`` (its checkpoint written): a run killed there."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.n:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("optimizer,options,method", [
    ("galore", {"rank": 4, "update_gap": 2}, None),  # full-parameter training: the Trainer's own save
    ("adamw", {}, "lora"),
    ("lisa", {"n_layers": 1, "switch_every": 2}, None),
])
def test_resume_from_a_trainer_checkpoint_is_exact(tmp_path, optimizer, options, method):
    def run(out, steps, resume=None, stop_at=None):
        model = _base(tmp_path) if method is None else rw.adapt(_base(tmp_path), method, r=4)
        trainer = RankwiseTrainer(model=model, args=_args(out, steps=steps), train_dataset=_dataset(),
                                  optimizer=optimizer, optimizer_options=options,
                                  callbacks=[_StopAt(stop_at)] if stop_at else None)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    whole, trainer = run(tmp_path / "a", 6)
    assert type(trainer.optimizer.optimizer) is type(rw.optim.make(optimizer, _base(tmp_path), lr=1e-3, **options))
    run(tmp_path / "b", 6, stop_at=3)  # killed right after its step-3 checkpoint
    resumed, _ = run(tmp_path / "b", 6, resume=str(tmp_path / "b" / "checkpoint-3"))
    want, got = whole.state_dict(), resumed.state_dict()
    untrained = (_base(tmp_path) if method is None else rw.adapt(_base(tmp_path), method, r=4)).state_dict()
    assert any(not torch.equal(want[k], v) for k, v in untrained.items())  # it trained
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_plain_trainer_takes_a_rankwise_optimizer_through_optimizer_cls_and_kwargs(tmp_path):
    model = _base(tmp_path)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "run", steps=2, save_steps=10),
                                   train_dataset=_dataset(),
                                   optimizer_cls_and_kwargs=trainer_optimizer("galore", lr=1e-3, rank=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert type(trainer.optimizer.optimizer) is rw.optim.GaLoreAdamW
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loop_callbacks_run_a_rank_controller_and_resume_its_state(tmp_path):
    def run(out, steps, resume=None, stop_at=None):
        model = _base(tmp_path)
        prepare_relora(model, rank=4)
        opt = rw.optim.make("adamw", model, lr=1e-2)
        relora = ReLoRA(model, opt, merge_every=2, reset="zero")
        trainer = RankwiseTrainer(model=model, args=_args(out, steps=steps), train_dataset=_dataset(),
                                  optimizers=(opt, None), loop_callbacks=[relora],
                                  callbacks=[_StopAt(stop_at)] if stop_at else None)
        trainer.train(resume_from_checkpoint=resume)
        return model, relora

    whole, relora = run(tmp_path / "a", 6)
    assert (relora.steps, relora.merges) == (6, 3)
    run(tmp_path / "b", 6, stop_at=3)
    assert (tmp_path / "b" / "checkpoint-3" / CALLBACKS_FILE).is_file()
    resumed, relora = run(tmp_path / "b", 6, resume=str(tmp_path / "b" / "checkpoint-3"))
    assert (relora.steps, relora.merges) == (6, 3)
    want, got = whole.state_dict(), resumed.state_dict()
    for k in want:  # the merged base weights too: ReLoRA changes them
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_a_callback_can_stop_the_trainer_and_log(tmp_path):
    class StopAt2:
        def on_step_end(self, state):
            state.log["seen"] = state.step
            if state.step == 2:
                state.should_stop = True

    trainer = RankwiseTrainer(model=_adapted(tmp_path), args=_args(tmp_path / "run", steps=6, save_steps=10),
                              train_dataset=_dataset(), loop_callbacks=[StopAt2()])
    trainer.train()
    assert trainer.state.global_step == 2
    assert [r["seen"] for r in trainer.state.log_history if "seen" in r] == [1, 2]


def test_bad_input_names_the_parameter(tmp_path):
    with pytest.raises(ValueError, match="optimizer.*galore"):
        RankwiseTrainer(model=_adapted(tmp_path), args=_args(tmp_path / "r"), optimizer="galorre")
    with pytest.raises(ValueError, match="optimizer_options"):
        RankwiseTrainer(model=_adapted(tmp_path), args=_args(tmp_path / "r"), optimizer_options=[1])
    with pytest.raises(ValueError, match="optimizer"):
        trainer_optimizer("nope")
    with pytest.raises(ValueError, match="loop callbacks"):
        LoopCallbacks([object()]).load_state_dict([None, None])


def test_loop_callbacks_see_the_optimizer_the_user_built_even_when_it_wraps_another(tmp_path):
    """A guarded optimizer (skip_nonfinite) also has an ``optimizer`` attribute; only accelerate's wrapper
    is taken off, so ReLoRA (which checks it resets the optimizer it was built with) accepts it."""
    model = _base(tmp_path)
    prepare_relora(model, rank=4)
    opt = rw.optim.make("adamw", model, lr=1e-2, skip_nonfinite=True)
    relora = ReLoRA(model, opt, merge_every=1, reset="zero")
    RankwiseTrainer(model=model, args=_args(tmp_path / "run", steps=2, save_steps=10), train_dataset=_dataset(),
                    optimizers=(opt, None), loop_callbacks=[relora]).train()
    assert relora.merges == 2


def test_training_callbacks_of_the_adapter_method_run_in_the_trainer_by_themselves(tmp_path):
    """COLA's merge-and-restart (its config's ``training_callbacks``) needs no loop_callbacks: after 4
    steps with chain_every=2 the base weights hold the merged links; a plain LoRA base never moves."""
    bases = {}
    for method, options in (("cola", {"chain_every": 2}), ("lora", {})):
        model = _adapted(tmp_path, method, **options)
        before = {n: layer.base_weight.detach().clone() for n, layer in rw.adapter_layers(model)}
        RankwiseTrainer(model=model, args=_args(tmp_path / method, steps=4, save_steps=100),
                        train_dataset=_dataset()).train()
        bases[method] = [not torch.equal(before[n], layer.base_weight) for n, layer in rw.adapter_layers(model)]
    assert all(bases["cola"]) and not any(bases["lora"])


def test_the_new_training_dynamics_callbacks_run_in_the_trainer(tmp_path):
    """LoRA-GGPO's perturbation, BiLoRA's level routing and BA-LoRA's regularisers are attached by
    RankwiseTrainer without loop_callbacks and run at every step."""
    from rankwise.adapters.ba_lora import BALoRARegularizers
    from rankwise.adapters.bilora import BiLoRALevels
    from rankwise.adapters.lora_ggpo import GGPOPerturbation

    for method, options, kind in (("lora_ggpo", {"ggpo_sigma": 0.1}, GGPOPerturbation),
                                  ("bilora", {"upper_every": 2}, BiLoRALevels),
                                  ("ba_lora", {"lambda1": 0.1, "lambda2": 0.1, "lambda3": 0.1, "svd_k": 1},
                                   BALoRARegularizers)):
        model = _adapted(tmp_path, method, **options)
        trainer = RankwiseTrainer(model=model, args=_args(tmp_path / method, steps=4, save_steps=100),
                                  train_dataset=_dataset())
        trainer.train()
        built = [c for cb in trainer.loop_callbacks.callbacks for c in (getattr(cb, "controllers", None) or [])]
        (cb,) = [c for c in built if isinstance(c, kind)]
        if kind is GGPOPerturbation:
            assert cb.steps == 5 and all(layer.perturbation is None for _, layer in rw.adapter_layers(model))
        elif kind is BiLoRALevels:
            assert cb.steps == 4
        else:
            assert set(cb.last) == {"consistency", "diversity", "svd"} and not cb._handles
