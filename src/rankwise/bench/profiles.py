"""Bench profiles: the tasks, the shared budget (steps, batch, sequence length, schedule), the seeds, the
learning-rate grids of the validation sweep and the built-in experiments of each ``rankwise bench`` profile.

Every experiment of a profile trains the same number of optimizer steps on the same batches in the same
order (per seed), with the same warm-up and linear decay; only the method and its learning rate (picked
on a validation split held out of the training split, never on test) differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .experiments import FULL_FINETUNE, HEAD_ONLY, Experiment


@dataclass(frozen=True)
class BenchTask:
    """One model on one packaged dataset: ``kind`` ``seq-cls`` (metric: accuracy, higher is better) or
    ``causal-lm`` (metric: perplexity, lower is better)."""

    name: str
    model: str
    data: str
    kind: str

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "seq-cls" else "perplexity"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "seq-cls"


@dataclass(frozen=True)
class Profile:
    """The shared budget of a bench: ``steps`` optimizer steps of ``batch_size`` examples (LM: blocks) of at
    most ``max_length`` tokens, linear warm-up over ``warmup`` of the steps then linear decay, ``seeds``
    seeds per experiment; ``val_size`` examples (LM: blocks) held out of the training split for the lr sweep,
    ``test_size`` test examples (LM: blocks) scored; ``lr_grids`` per experiment kind (``adapter``, ``full``,
    ``head``, ``structured``), grown past an edge up to ``lr_extend`` times while the best validated lr lies
    there (``runner.sweep_grid``); ``needs_cuda``: refused on a machine without a GPU."""

    name: str
    description: str
    tasks: tuple[BenchTask, ...]
    steps: int
    batch_size: int
    max_length: int
    seeds: int = 3
    warmup: float = 0.1
    val_size: int = 128
    test_size: int = 512
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    lr_extend: int = 2
    needs_cuda: bool = False

    def settings(self) -> dict[str, Any]:
        """Everything that defines the profile's runs (stored with the results; a bench folder refuses others)."""
        out = asdict(self)
        out.pop("description")
        return out

    def tokens_per_run(self) -> int:
        """Upper bound of the training tokens of one run (steps × batch × max_length)."""
        return self.steps * self.batch_size * self.max_length


ADAPTER_R = 8
CLS_TASKS = (BenchTask("bbc", "minilm-l6", "bbc", "seq-cls"),
             BenchTask("drug-reviews", "minilm-l6", "drug-reviews", "seq-cls"))
LM_TASKS = (BenchTask("stdlib-code", "smollm2-135m", "stdlib-code", "causal-lm"),
            BenchTask("bbc-text", "smollm2-135m", "bbc", "causal-lm"))

PROFILES: dict[str, Profile] = {
    "cpu-smoke": Profile(
        "cpu-smoke", "MiniLM-L6 on BBC News and drug reviews (sequence classification): every adapter method, "
        "full fine-tuning with every optimizer and sampler, head only; minutes per experiment on a CPU",
        CLS_TASKS, steps=50, batch_size=8, max_length=64, val_size=96, test_size=384,
        lr_grids={"adapter": (2e-3, 8e-3, 3e-2), "full": (1e-4, 5e-4, 2e-3), "head": (1e-2, 5e-2, 2e-1)}),
    "cpu-lm": Profile(
        "cpu-lm", "SmolLM2-135M on stdlib code and BBC text (causal LM): the LoRA family, QLoRA when bitsandbytes "
        "is present, full fine-tuning with the GaLore family",
        LM_TASKS, steps=40, batch_size=4, max_length=128, val_size=16, test_size=64,
        lr_grids={"adapter": (2e-4, 1e-3, 5e-3), "full": (1e-5, 5e-5, 2.5e-4)}),
    "pretrain": Profile(
        "pretrain", "a 20M-parameter Llama trained from scratch on BBC News + Python stdlib source: every optimizer "
        "and the structured models, 1.57M tokens per run (10x the pre-training benchmark's 153,600)",
        (BenchTask("bbc+stdlib-code", "scratch-20m", "bbc+stdlib-code", "causal-lm"),),
        steps=768, batch_size=16, max_length=128, val_size=32, test_size=128,
        lr_grids={"full": (1e-3, 3e-3, 1e-2), "structured": (1e-3, 3e-3, 1e-2)}),
    "gpu-small": Profile(
        "gpu-small", "SmolLM2-135M on stdlib code (causal LM) with a GPU: the LoRA family and the GaLore family at a "
        "longer budget", LM_TASKS[:1], steps=500, batch_size=16, max_length=256, val_size=64, test_size=256,
        lr_grids={"adapter": (2e-4, 1e-3, 5e-3), "full": (1e-5, 5e-5, 2.5e-4)}, needs_cuda=True),
}

#: Optimizer settings of full training, per optimizer: (options, why). ``steps/K`` follows the budget; ``RANK``
#: is the subspace rank, set per profile (GaLore's fine-tuning rank 8; hidden/4 for pre-training).
RANK = "{rank}"
FULL_FT_OPTIMIZERS: dict[str, tuple[dict[str, Any], str]] = {
    "adamw": ({}, "the reference"),
    **{name: ({"rank": RANK, "update_gap": "steps/4"}, "rank {rank}, four subspace refreshes within the budget")
       for name in ("galore", "galore_adafactor", "galore_8bit", "q_galore", "fira", "frugal", "gradnormlorp",
                    "flora_opt", "osd", "dct_proj", "coap", "natural_galore", "galore_plus", "apollo")},
    "apollo_mini": ({"update_gap": "steps/4"}, "APOLLO-Mini: rank 1, tensor-wise scaling"),
    "badam": ({"switch_every": "steps/25", "always_active": ["classifier"]},
              "25 block switches, so every layer block gets several turns; embedding and head blocks frozen as in "
              "the official BlockOptimizer, the freshly initialized classifier trained at every step (its "
              "active_modules)"),
    "lisa": ({"switch_every": "steps/10"}, "10 re-samplings of the active layers"),
    "owlore": ({"switch_every": "steps/10"}, "10 re-samplings of the active layers"),
    "ist": ({}, "its defaults: re-sampled every step by importance"),
}
LM_OPTIMIZERS = ("adamw", "galore", "fira", "apollo", "apollo_mini", "q_galore", "frugal")
#: The causal-LM profiles' adapters: the LoRA family, QLoRA, and the breadth issue's adapters, sparse fine-tuning
#: and sparse+low-rank methods (so each has a SmolLM2 row next to its MiniLM one).
LM_ADAPTERS = ("lora", "dora", "rslora", "pissa", "olora", "vera", "lora_xs", "qlora",
               "hra", "c3a", "gralora", "fourierft", "delora", "mora", "melora", "singlora", "nola", "lotr", "edora",
               "lamda", "curlora", "lora_mini", "reslora", "denselora", "s2ft", "lt_sft", "spiel", "paca", "lors",
               "roselora", "pst")


#: Adapters whose rank r is not the final one: AdaLoRA starts at 1.5× its target (the paper's ratio) and prunes;
#: IncreLoRA starts at 2 and grows, fast enough to reach its budget within cpu-smoke's 50 steps (its controller
#: refuses a schedule whose growth rounds do not fit the run).
ADAPTER_OPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "adalora": ({"r": 12, "target_r": ADAPTER_R}, "AdaLoRA: rank 12 pruned to 8 (the paper's 1.5x)"),
    "increlora": ({"r": 2, "target_r": ADAPTER_R, "init_warmup": 5, "incre_interval": 2, "top_h": 12,
                   "incre_rank_num": 2},
                  "IncreLoRA: rank 2 grown to an average of 8 (24 ranks every 2 steps after 5 warm-up steps)"),
    # after one step ‖ΔW‖_F ≈ λ/√(r·d_in)·‖W₀‖_F (B starts at 0 and every rank-1 component is normalised, so it
    # has its full size at once): at r 8 PEFT's λ = 15 is 0.08 of ‖W₀‖_F on a 4096-wide LLaMA but 0.27 on MiniLM
    # (d_in 384; measured 0.27), where it wrecks the model at every lr (chance accuracy); the same relative size
    # there is λ = 15·√(384/4096) ≈ 4.6
    "delora": ({"r": ADAPTER_R, "delora_lambda": 4.6},
               "DeLoRA: λ = 4.6, PEFT's 15 scaled from a 4096-wide model to MiniLM's 384 (the same bound on "
               "‖ΔW‖/‖W₀‖); at 15 it is at chance"),
}
#: The causal-LM profiles' own overrides (SmolLM2-135M, hidden 576), over ADAPTER_OPTIONS.
LM_ADAPTER_OPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "delora": ({"r": ADAPTER_R, "delora_lambda": 5.6},
               "DeLoRA: λ = 5.6, PEFT's 15 scaled from a 4096-wide model to SmolLM2's 576 (the same bound on "
               "‖ΔW‖/‖W₀‖)"),
    "fourierft": ({"zero_init": True},
                  "FourierFT starts from zero coefficients (PEFT's init_weights=True): its default N(0, 1) "
                  "coefficients at α = 150 raise SmolLM2's stdlib-code test perplexity from 12.08 to 18.89 before "
                  "training, more than 40 steps recover (18.4 at lr 2e-4)"),
}

#: Adapters that need their own learning-rate grid (absolute, the same in every profile), with the reason.
ADAPTER_LR_GRIDS: dict[str, tuple[tuple[float, ...], str]] = {
    "pst": ((1e-4, 3e-4, 1e-3),
            "PST's update β·U·V starts from U ~ N(0, 1) (the authors' init), about √in times LoRA's A: at the adapter "
            "grid's 2e-3 and above AdamW wrecks the model within a few steps (chance accuracy even at sparsity 0); "
            "the authors fine-tune at 3e-5 to 5e-5"),
    "randlora": ((1e-4, 5e-4, 2e-3),
                 "RandLoRA scales its update by 20 (α = 20·r, PEFT's advice; LoRA's is 2) and sums n = 48 random-basis "
                 "products on MiniLM: on the adapter grid (2e-3, 8e-3, 3e-2) every run stayed at chance (0.19-0.23), "
                 "at 5e-4 one run reached 0.932 (1e-4: 0.516)"),
    "lora_pro": ((1e-4, 5e-4, 2e-3),
                 "LoRA-Pro adjusts the factors' gradients so that the product takes full fine-tuning's step, so it "
                 "takes full fine-tuning's lr: on the adapter grid (2e-3 and up) it stays at chance, at 1e-4 and "
                 "5e-4 one run each reached 0.927 and 0.925"),
}


def _adapter_experiment(method: str, overrides: dict[str, tuple[dict[str, Any], str]] | None = None) -> Experiment:
    from ..adapters.registry import get_method

    spec = get_method(method)
    default = {"r": ADAPTER_R} if "r" in spec.config_cls.field_names() else {}
    options, note = {**ADAPTER_OPTIONS, **(overrides or {})}.get(method, (default, ""))
    grid, why = ADAPTER_LR_GRIDS.get(method, (None, ""))
    return Experiment(method, method, options, lr_grid=grid, note="; ".join(n for n in (note, why) if n))


def adapter_methods() -> list[str]:
    """Every registered adapter a bare model can take (not those built from other adapters), without a
    quantized base unless bitsandbytes is importable."""
    import importlib.util

    from ..adapters.registry import REGISTRY

    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    return sorted(n for n, s in REGISTRY.items()
                  if not s.needs_adapters and (s.family != "quantization" or has_bnb))


#: Pre-training from scratch overrides (options, why): the tied embedding is the input and the output layer and
#: 65% of the 20M Llama's weights, so BAdam must train it (a block of its own, not frozen as in fine-tuning).
PRETRAIN_OVERRIDES: dict[str, tuple[dict[str, Any], str]] = {
    "badam": ({"switch_every": "steps/30", "include_embedding": True},
              "the tied embedding is a block of its own (frozen in fine-tuning, but here it is untrained and 65% of "
              "the weights); 30 switches, so each of the 9 blocks gets at least 3 turns"),
}


def full_ft_experiments(names: tuple[str, ...] | None = None, rank: int = 8,
                        overrides: dict[str, tuple[dict[str, Any], str]] | None = None) -> list[Experiment]:
    """Full training with each optimizer of ``names`` (default: every one) at subspace ``rank``, named
    ``full-<optimizer>``; ``overrides`` replace an optimizer's settings and note."""
    out = []
    for name in names or tuple(FULL_FT_OPTIMIZERS):
        options, note = (overrides or {}).get(name, FULL_FT_OPTIMIZERS[name])
        options = {k: rank if v == RANK else v for k, v in options.items()}
        out.append(Experiment(f"full-{name}", FULL_FINETUNE, optimizer=name, optimizer_options=options,
                              note=note.format(rank=rank)))
    return out


#: Block samplers again at equal updates per parameter (cpu-smoke, MiniLM's 6 layers): BAdam trains one of 6
#: layer blocks per step, LISA 2 of 6 layers.
EQUAL_UPDATES = {"badam": 6.0, "lisa": 3.0}


def equal_update_experiments() -> list[Experiment]:
    """``full-<sampler>-equal-updates``: the sampler with its steps multiplied so each layer weight gets as
    many updates as under AdamW (the run's ``updates_per_param`` shows it)."""
    out = []
    for exp in full_ft_experiments(tuple(EQUAL_UPDATES)):
        factor = EQUAL_UPDATES[exp.optimizer]
        out.append(Experiment(f"{exp.name}-equal-updates", exp.method, optimizer=exp.optimizer,
                              optimizer_options=exp.optimizer_options, steps_factor=factor,
                              note=f"{exp.note}; {factor:g}x the steps: equal updates per layer weight"))
    return out


def structured_experiments(rank: int) -> list[Experiment]:
    """The structured models trained from scratch (``rw.sparsify`` + the method's controller in the loop; ReLoRA's
    controller restructures the dense model after its warm start), each with its paper's pre-training settings at
    subspace ``rank``."""
    return [
        Experiment("relora", "relora", {"rank": rank, "alpha": 32.0, "warm_start": 0.2, "restarts": 4,
                                        "prune_ratio": 0.999, "restart_warmup": "steps/100"},
                   note="ReLoRA paper: dense warm start (20% of the steps), then LoRA merged and restarted 4 times "
                   "with 99.9% magnitude pruning of its optimizer state; the lr re-warms from 0 over 1% of the steps "
                   "after every restart (jagged schedule, on top of the shared one)"),
        Experiment("sltrain", "sltrain", {"rank": rank, "density": 0.03, "alpha": 32.0},
                   note="SLTrain paper: W = (alpha/r)·BA + S, 3% random support, alpha 32"),
        Experiment("sst", "sst", {"rank": rank, "iteration_steps": "steps/10"},
                   note="SST paper: all singular values trained, the sampled singular vectors re-drawn 10 times"),
        Experiment("trp", "trp", {"energy": 0.9, "period": 10, "nuclear_weight": 1e-4},
                   note="TRP paper: energy-0.9 truncation every 10 steps + nuclear-norm sub-gradient 1e-4"),
        Experiment("maestro", "maestro", {}, note="Maestro paper: ordered full-rank factors, one sampled "
                   "(layer, rank) truncation per step added to the full loss"),
        Experiment("cuttlefish", "cuttlefish", {"interval": "steps/20"},
                   note="Cuttlefish: stable ranks measured 20 times; factorized once they settle"),
        Experiment("lte", "lte", {"heads": 4, "rank": rank // 4, "merge_every": 10},
                   note="LTE: 4 heads of rank hidden/16, merged every 10 steps"),
        Experiment("slope", "slope", {"rank": rank // 4, "lazy_fraction": 0.01},
                   note="SLoPe: 2:4 sparse weights, lazy low-rank adapters in the last 1% of the steps"),
        Experiment("refactor_reset", "refactor_reset", {"rank": rank, "refactor_every": "steps/4",
                                                        "reset_every": "steps/4"},
                   note="W = B·A, balanced refactorization and momentum reset four times per run"),
    ]


def builtin_experiments(profile: str) -> list[Experiment]:
    """The experiments a profile runs when no ``--experiments`` folder is given."""
    if profile == "cpu-smoke":
        return ([Experiment("head", HEAD_ONLY)] + full_ft_experiments() + equal_update_experiments()
                + [_adapter_experiment(m) for m in adapter_methods()])
    if profile in ("cpu-lm", "gpu-small"):
        adapters = [m for m in LM_ADAPTERS if m in adapter_methods()]
        return [_adapter_experiment(m, LM_ADAPTER_OPTIONS) for m in adapters] + full_ft_experiments(LM_OPTIMIZERS)
    if profile == "pretrain":
        return full_ft_experiments(("adamw", "galore", "fira", "frugal", "apollo", "apollo_mini", "q_galore",
                                    "gradnormlorp", "badam", "lisa"), rank=64, overrides=PRETRAIN_OVERRIDES
                                   ) + structured_experiments(rank=64)
    raise ValueError(f"profile={profile!r}; choose one of {list(PROFILES)}")
