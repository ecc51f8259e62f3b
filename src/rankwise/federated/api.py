"""``rw.federate(model, method, clients)``: federated LoRA fine-tuning simulated in one process.

One model holds the global state. Each round every client in turn loads the broadcast tensors, takes
``local_steps`` optimizer steps on its own batches through the one training loop
(:func:`rankwise.train.train`, a fresh optimizer per round, as FedAvg clients do) and uploads the
tensors it trained; the server averages them (equal weights) and applies the method's rule
(:mod:`.rules`). No networking: "upload" and "broadcast" are tensor copies, counted in floats.
Everything is seeded by ``seed``: two runs with the same inputs give the same global model.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from .. import catalogue, checks
from ..adapters import adapt, adapter_layers
from ..batches import LossFn
from ..train import TrainConfig, check_device, evaluate, place_model, progress_bar, train
from .rules import RULES, Rule, mean_state, svd_refactor

_RULES = {rule.name: rule for rule in RULES}
#: Every federated method of ``rw.federate``: the catalogued ones and the FedAvg-of-LoRA baseline.
METHODS = tuple(_RULES)


@dataclass
class FederatedConfig:
    """Options of a federated run: ``rounds`` of ``local_steps`` client steps each; the adapter's rank
    ``r``, ``alpha`` (LoRA's scale α/r; None: α = r), ``targets`` and further ``adapter_options`` (e.g.
    LoRA-SB's ``init_lr``); the clients' optimizer (``lr``, ``optimizer``, ``weight_decay``,
    ``max_grad_norm``, constant learning rate); ``eval_every`` rounds (0: at the end only)."""

    rounds: int = 5
    local_steps: int = 10
    r: int = 8
    alpha: float | None = None
    targets: Any = "all-linear"
    adapter_options: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 0
    device: str | None = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        checks.integer("rounds", self.rounds, 1)
        checks.integer("local_steps", self.local_steps, 1)
        checks.integer("r", self.r, 1)
        checks.integer("eval_every", self.eval_every, 0)
        checks.positive("alpha", self.alpha, optional=True)
        if not isinstance(self.adapter_options, dict):
            raise ValueError(f"adapter_options={self.adapter_options!r} must be a dict of rw.adapt options")
        if self.device is not None:
            check_device(self.device)
        self.client_config(0)  # the clients' TrainConfig checks lr, optimizer, seed, progress

    def client_config(self, seed: int) -> TrainConfig:
        """The clients' local run: ``local_steps`` steps at a constant ``lr``, on the model's device."""
        return TrainConfig(lr=self.lr, max_steps=self.local_steps, schedule="constant", optimizer=self.optimizer,
                           weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, seed=seed,
                           device=None, progress=False, measure_memory=False)


@dataclass
class FederatedResult:
    """``history``: one record per round (``round``, the clients' mean final ``client_loss``, and the
    evaluation's metrics when the round was evaluated); ``metrics``: the final evaluation (or the last
    round's client loss); per client and round, ``upload_floats`` sent and ``download_floats`` received."""

    method: str
    history: list[dict[str, float]]
    metrics: dict[str, float]
    clients: int
    upload_floats: int
    download_floats: int
    wall_time_s: float
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stream:
    """A client's batches without end: its loader's epochs one after another."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader, self.it = loader, iter(loader)

    def take(self, n: int) -> list[Any]:
        out = []
        while len(out) < n:
            batch = next(self.it, None)
            if batch is None:
                self.it = iter(self.loader)
                batch = next(self.it, None)
                if batch is None:
                    raise ValueError("a client's loader yielded no batches")
            out.append(batch)
        return out


class Federation:
    """The server and its clients around one model (see the module docstring).

    ``local_round()`` runs every client once from the broadcast state and returns their uploads;
    ``aggregate(uploads)`` is the server step, which leaves the new global state in the model.
    """

    def __init__(self, model: nn.Module, method: str, clients: Iterable[Iterable[Any]],
                 config: FederatedConfig | None = None, *, init_data: Iterable | None = None,
                 loss_fn: LossFn | None = None) -> None:
        checks.choice("method", method, METHODS)
        self.rule: Rule = _RULES[method]
        self.cfg = config or FederatedConfig()
        self.clients = list(clients)
        if not self.clients:
            raise ValueError("clients=[] : give one batch loader per client")
        self.model, self.loss_fn, self.round = model, loss_fn, 0
        place_model(model, self.cfg.device)
        self._prepare(init_data)
        params = dict(model.named_parameters())
        self.uploaded = [n for n, p in params.items() if p.requires_grad]
        names = {id(p): n for n, p in params.items()}
        self.pairs = [(names[id(layer.lora_B)], names[id(layer.lora_A)]) for _, layer in adapter_layers(model)] \
            if self.rule.refactor else []
        self.broadcast = self.uploaded + [a for _, a in self.pairs]
        self.global_state = self.snapshot(self.broadcast)
        self.streams = [_Stream(c) for c in self.clients]
        self.client_losses: list[float] = []

    def _prepare(self, init_data: Iterable | None) -> None:
        """Adapt the model with the method's adapter and freeze what the clients must not train."""
        cfg, rule = self.cfg, self.rule
        options = {"r": cfg.r, **cfg.adapter_options}
        if rule.adapter == "lora":
            options.setdefault("alpha", cfg.alpha)
        elif cfg.alpha is not None:
            raise ValueError(f"alpha={cfg.alpha!r} applies to the LoRA-based methods; {rule.name} ({rule.adapter}) "
                             "has no alpha: leave it None")
        if rule.adapter == "lora_sb" and init_data is None:  # one shared estimate: the clients' first batches
            per = math.ceil(8 / len(self.clients))
            init_data = [b for c in self.clients for b in itertools.islice(iter(c), per)]
        adapt(self.model, rule.adapter, cfg.targets, init_data=init_data, loss_fn=self.loss_fn, **options)
        for _, layer in adapter_layers(self.model):
            for name in rule.frozen:
                getattr(layer, name).requires_grad_(False)

    def snapshot(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Copies of the model's parameters ``names``."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().clone() for n in names}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Write ``state`` into the model's parameters of the same names."""
        params = dict(self.model.named_parameters())
        for n, t in state.items():
            params[n].copy_(t)

    def local_round(self, step: Callable[[], None] | None = None) -> list[dict[str, torch.Tensor]]:
        """Every client, in turn: load the broadcast state, train ``local_steps`` steps, upload."""
        uploads, losses = [], []
        for k, stream in enumerate(self.streams):
            self.load(self.global_state)
            seed = self.cfg.seed * 1_000_003 + self.round * len(self.streams) + k
            batches = stream.take(self.cfg.local_steps)
            result = train(self.model, batches, None, self.cfg.client_config(seed), loss_fn=self.loss_fn)
            losses.append(result.history[-1]["loss"])
            uploads.append(self.snapshot(self.uploaded))
            if step is not None:
                step()
        self.client_losses = losses
        return uploads

    def aggregate(self, uploads: list[dict[str, torch.Tensor]]) -> None:
        """The server: average the uploads; FedSVD re-factorizes every layer's B̄·A; broadcast."""
        state = {**self.global_state, **mean_state(uploads)}
        for b, a in self.pairs:
            state[b], state[a] = svd_refactor(state[b], state[a])
        self.global_state = state
        self.load(state)
        self.round += 1

    def floats(self, names: Iterable[str]) -> int:
        return sum(self.global_state[n].numel() for n in names)

    def run(self, eval_loader: Iterable[Any] | None = None,
            on_round: Callable[[dict[str, float]], None] | None = None) -> FederatedResult:
        """``rounds`` rounds; evaluate every ``eval_every`` rounds and after the last one."""
        cfg, t0 = self.cfg, time.perf_counter()
        history: list[dict[str, float]] = []
        with progress_bar(cfg.progress, cfg.rounds * len(self.streams), desc="federate") as bar:
            for _ in range(cfg.rounds):
                self.aggregate(self.local_round(None if bar is None else lambda: bar.update(1)))
                record: dict[str, float] = {"round": self.round,
                                            "client_loss": sum(self.client_losses) / len(self.client_losses)}
                last = self.round == cfg.rounds
                if eval_loader is not None and (last or (cfg.eval_every and self.round % cfg.eval_every == 0)):
                    record.update(evaluate(self.model, eval_loader))
                history.append(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['client_loss']:.4f}")
                if on_round is not None:
                    on_round(record)
        final = {k: v for k, v in history[-1].items() if k != "round"}
        metrics = final if eval_loader is not None else {"client_loss": final["client_loss"]}
        return FederatedResult(self.rule.name, history, metrics, len(self.streams), self.floats(self.uploaded),
                               self.floats(self.broadcast), time.perf_counter() - t0,
                               {"method": self.rule.name, **asdict(cfg)})


def federate(model: nn.Module, method: str, clients: Iterable[Iterable[Any]] | None = None,
             eval_loader: Iterable[Any] | None = None, *, init_data: Iterable | None = None,
             loss_fn: LossFn | None = None, on_round: Callable[[dict[str, float]], None] | None = None,
             **options: Any) -> FederatedResult:
    """Fine-tune ``model`` with federated ``method`` (``fedavg``, ``ffa_lora``, ``fed_sb``, ``fedsvd``)
    over ``clients`` (one batch loader per client, e.g. :func:`shard_dataset` shards) and return the
    history; the model ends holding the global adapter. ``options``: :class:`FederatedConfig` fields.
    ``init_data``: batches for Fed-SB's LoRA-SB init (default: the clients' first batches, 8 in all).
    ``on_round(record)`` is called after each round (progress for logs; a terminal gets a bar)."""
    checks.choice("method", method, METHODS)
    checks.known_options(options, [f.name for f in fields(FederatedConfig)], f"federated method {method!r}")
    cfg = FederatedConfig(**options)
    if clients is None:
        raise ValueError("clients=None: give one batch loader per client (rankwise.federated.shard_dataset)")
    return Federation(model, method, clients, cfg, init_data=init_data, loss_fn=loss_fn).run(eval_loader, on_round)


def _builder(name: str) -> Callable[..., FederatedResult]:
    return lambda model, **options: federate(model, name, **options)


for _rule in RULES:
    if _rule.catalogued:
        catalogue.register(catalogue.MethodRecord(
            _rule.name, "federated", _rule.paper, _rule.mechanism, api="federate", config=FederatedConfig,
            builder=_builder(_rule.name), exports="peft-lora", spec=_rule,
        ))

#: The catalogued federated methods (name -> Rule), a view of the catalogue.
FEDERATED_METHODS = catalogue.View(lambda r: r.api == "federate", lambda r: r.spec)
