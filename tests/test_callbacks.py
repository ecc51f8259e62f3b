"""The one loop's callback protocol: hook order, per-step logs, plain iterables, pre-built optimizers,
and the structured controllers (ReLoRA, SST, TRP, Maestro) as callbacks, equal to a hand-written loop."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import rankwise as rw
from rankwise.batches import default_loss
from rankwise.callbacks import Callback, RankController
from rankwise.sparse import SST, TRP, Maestro, ReLoRA
from rankwise.train import TrainConfig, train

from .conftest import lm_batches, make_tiny_llama

STEPS = 7


def batches() -> list[dict]:
    """3 batches for 7 steps: the loop restarts the list when it runs out."""
    return lm_batches(n=3, batch=2, seq=8)


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def hand_loop(model, opt, controller, loss_fn=default_loss) -> None:
    """What users wrote before the loop: step, then ``controller.step()``."""
    for batch in itertools.islice(itertools.cycle(batches()), STEPS):
        loss_fn(model, batch).backward()
        opt.step()
        controller.step()
        opt.zero_grad()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k


def relora(model, opt):
    return ReLoRA(model, opt, merge_every=3)


def sst(model, opt):
    return SST(model, opt, iteration_steps=3, iterations_per_round=2)


def trp(model, opt):
    return TRP(model, energy=0.9, period=1)


def maestro(model, opt):
    return Maestro(model, shrink_threshold=0.05, shrink_every=2, seed=0)


SETUPS = {  # method -> (sparsify options, controller factory)
    "relora": ({"rank": 4}, relora),
    "sst": ({"rank": 4}, sst),
    "trp": ({}, trp),
    "maestro": ({}, maestro),
}


def maestro_loss(controller):
    return lambda m, b: controller.loss(lambda: default_loss(m, b))


def acted(method: str, controller, start: torch.nn.Module, model: torch.nn.Module) -> bool:
    """Did the controller do its job in 7 steps?"""
    if method == "relora":  # merged at steps 3 and 6: the frozen base weights moved
        moved = [not torch.equal(start.get_submodule(n).base_layer.weight, model.get_submodule(n).base_layer.weight)
                 for n, _ in rw.adapter_layers(model)]
        return controller.merges == 2 and all(moved)
    if method == "sst":  # two iterations: the active sets were re-sampled
        before = [m.active for m in start.modules() if hasattr(m, "active")]
        resampled = any(not torch.equal(a, m.active) for a, m in zip(before, controller.layers, strict=True))
        return controller.iterations == 2 and resampled
    if method == "trp":  # truncated after the last step by the energy criterion: below full rank
        def low_rank(name, layer):
            s, k = torch.linalg.svdvals(layer.weight.double()), controller.ranks[name]
            return k < len(s) and bool((s[k:] <= 1e-5 * s[0]).all())

        return controller.steps == STEPS and all(low_rank(n, m) for n, m in controller.layers)
    return any(kept < min(m.in_features, m.out_features)  # maestro: progressive shrinking dropped components
               for (_, m), kept in zip(controller.layers, controller.ranks().values(), strict=True))


@pytest.mark.parametrize("method", sorted(SETUPS))
def test_controller_as_callback_equals_hand_loop(method):
    options, make_controller = SETUPS[method]
    start = rw.sparsify(make_tiny_llama(0), method, **options)
    hand, looped = copy.deepcopy(start), copy.deepcopy(start)

    hand_opt = adamw(hand)
    hand_ctl = make_controller(hand, hand_opt)
    hand_loop(hand, hand_opt, hand_ctl, maestro_loss(hand_ctl) if method == "maestro" else default_loss)

    opt = adamw(looped)
    ctl = make_controller(looped, opt)
    assert isinstance(ctl, RankController)
    train(looped, batches(), config=TrainConfig.plain(STEPS), callbacks=[ctl], optimizer=opt,
          loss_fn=maestro_loss(ctl) if method == "maestro" else None)

    assert acted(method, ctl, start, looped)
    assert_same_weights(hand, looped)


def test_controller_bound_to_another_optimizer_is_an_error():
    model = rw.sparsify(make_tiny_llama(0), "relora", rank=4)
    controller = ReLoRA(model, adamw(model), merge_every=3)
    with pytest.raises(ValueError, match="optimizer it was built with"):
        train(model, batches(), config=TrainConfig.plain(2), callbacks=[controller])


def test_sst_without_optimizer_resets_the_loops():
    model = rw.sparsify(make_tiny_llama(0), "sst", rank=4)
    controller = SST(model, iteration_steps=3)
    opt = adamw(model)
    train(model, batches(), config=TrainConfig.plain(3), callbacks=[controller], optimizer=opt)
    assert controller.optimizer is opt
    assert all(not opt.state[layer.u_active] for layer in controller.layers)  # reset at the iteration end


class Recorder(Callback):
    """Records the hook order and what each hook sees."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_train_begin(self, state):
        self.calls.append(("begin", state.step))

    def on_after_backward(self, state):
        grads = [p.grad for p in state.model.parameters() if p.requires_grad]
        self.calls.append(("after_backward", state.step, all(g is not None for g in grads)))
        state.log["seen_at"] = state.step

    def on_step_end(self, state):
        self.calls.append(("step_end", state.step))

    def on_evaluate(self, state, metrics):
        self.calls.append(("evaluate", state.step, sorted(metrics)))

    def on_save(self, state, path):
        self.calls.append(("save", state.step, path.name, path.is_dir()))

    def on_train_end(self, state):
        self.calls.append(("end", state.step))


def test_hooks_run_in_order_and_log_into_history(tmp_path):
    rec = Recorder()
    cfg = TrainConfig(lr=1e-3, max_steps=2, eval_every=1, checkpoint_every=2, output_dir=str(tmp_path), progress=False)
    res = train(make_tiny_llama(0), batches(), eval_loader=batches()[:1], config=cfg, callbacks=[rec])
    lm = ["loss", "perplexity", "tokens"]
    assert rec.calls == [
        ("begin", 0),
        ("after_backward", 0, True), ("step_end", 1), ("evaluate", 1, lm),
        ("after_backward", 1, True), ("step_end", 2), ("save", 2, "checkpoint-2", True),
        ("evaluate", 2, lm), ("end", 2),
    ]
    assert [h["seen_at"] for h in res.history] == [0, 1]


def test_plain_config_takes_a_hand_loops_steps_over_a_restarted_iterable():
    """TrainConfig.plain: no reseeding (the global RNG goes on), lr as given, no clipping; an iterable
    without len() is iterated again when it runs out."""

    class Stream:  # no len(): restarted like a list
        def __iter__(self):
            return iter(batches())

    hand = make_tiny_llama(0)
    looped = copy.deepcopy(hand)
    torch.manual_seed(1)
    opt = torch.optim.SGD(hand.parameters(), lr=0.5)
    for batch in itertools.islice(itertools.cycle(batches()), STEPS):
        default_loss(hand, batch).backward()
        opt.step()
        opt.zero_grad()
    after_hand = torch.rand(3)

    torch.manual_seed(1)
    sgd = torch.optim.SGD(looped.parameters(), lr=0.5)
    res = train(looped, Stream(), config=TrainConfig.plain(STEPS), optimizer=sgd)
    assert torch.equal(torch.rand(3), after_hand)
    assert_same_weights(hand, looped)
    assert res.steps == STEPS
    assert [h["lr"] for h in res.history] == [0.5] * STEPS
    assert res.peak_memory_kind == "not_measured" and not looped.training
