"""Disjoint client shards of a classification dataset: IID (a seeded permutation cut in equal parts) or
label-skewed (each class split among the clients by proportions drawn from Dirichlet(``skew``), the
usual non-IID partition of federated-learning benchmarks; smaller ``skew`` = more skew)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..checks import integer, number
from ..data import TextClassification


def shard_indices(labels: Sequence[int], clients: int, seed: int = 0, skew: float | None = None) -> list[list[int]]:
    """``clients`` disjoint index lists covering ``range(len(labels))``, deterministic in ``seed``.

    ``skew=None``: a seeded permutation cut into parts whose sizes differ by at most one. ``skew=α``:
    every class's examples are dealt to the clients by proportions p ~ Dirichlet(α·1).
    """
    integer("clients", clients, 1)
    number("skew", skew, 0, low_open=True, optional=True)
    if clients > len(labels):
        raise ValueError(f"clients={clients} is more than the {len(labels)} examples to shard")
    rng = random.Random(f"rankwise-shards-{seed}")
    if skew is None:
        order = list(range(len(labels)))
        rng.shuffle(order)
        return [sorted(order[k::clients]) for k in range(clients)]
    shards: list[list[int]] = [[] for _ in range(clients)]
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(members)
        draws = [rng.gammavariate(float(skew), 1.0) for _ in range(clients)]
        total = sum(draws) or 1.0
        cuts = [round(len(members) * sum(draws[: k + 1]) / total) for k in range(clients)]
        start = 0
        for k, end in enumerate(cuts):
            shards[k] += members[start:end]
            start = end
    empty = [k for k, s in enumerate(shards) if not s]
    if empty:
        raise ValueError(f"skew={skew} left clients {empty} without examples; raise skew or use fewer clients")
    return [sorted(s) for s in shards]


def shard_dataset(ds: TextClassification, clients: int, seed: int = 0,
                  skew: float | None = None) -> list[TextClassification]:
    """``ds`` split into ``clients`` disjoint datasets (:func:`shard_indices`)."""
    return [TextClassification([ds.texts[i] for i in idx], [ds.labels[i] for i in idx], list(ds.label_names))
            for idx in shard_indices(ds.labels, clients, seed, skew)]


__all__ = ["shard_dataset", "shard_indices"]
