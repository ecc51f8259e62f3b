"""Exact multiple-choice knapsack: one option per group, minimum total cost, total weight ≤ capacity.

LQ-LoRA's integer linear program (Guo et al. 2024, "LQ-LoRA: Low-rank Plus Quantized Matrix
Decomposition for Efficient Language Model Finetuning", Sec. 3.2) is this problem: a group per
matrix, an option per quantization config, cost = reconstruction error, weight = stored bits:

    min Σ_i Σ_j c_ij x_ij   s.t.   Σ_i Σ_j w_ij x_ij ≤ capacity,   Σ_j x_ij = 1,   x_ij ∈ {0, 1}.

Solved exactly by dynamic programming over the groups with bounding. Options dominated within their
group (as heavy and as costly as another) are dropped first. A partial choice is a state (weight,
cost); after each group only the Pareto-optimal states are kept (none lighter and cheaper) whose cost
plus an LP lower bound for the remaining groups is at most the cost of a feasible choice found
greedily. The LP relaxation of the remaining groups is greedy over the lower convex hull of each
group's (weight, cost) points (Sinha & Zoltners 1979): start from every group's lightest option and
buy hull steps in order of cost saved per unit of weight, the last one fractionally. Every prefix of
an optimum passes both filters (or a state that dominates it does), so the result is exact.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Solution:
    """The optimum: ``picks[i]`` is the option chosen for group i (an index into its input list)."""

    picks: list[int]
    cost: float
    weight: int


def _frontier(costs: Sequence[float], weights: Sequence[int]) -> list[int]:
    """Indices of the undominated options, weight ascending and cost strictly descending."""
    kept: list[int] = []
    for j in sorted(range(len(costs)), key=lambda j: (weights[j], costs[j])):
        if not kept or costs[j] < costs[kept[-1]]:
            kept.append(j)
    return kept


def _hull_steps(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Steps (Δweight, Δcost < 0) along the lower convex hull of frontier ``points`` (weight
    ascending, cost descending), with falling cost saved per unit of weight."""
    hull: list[tuple[int, float]] = []
    for p in points:
        while len(hull) >= 2:
            (w1, c1), (w2, c2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the chord from hull[-2] to p
            if (c2 - c1) * (p[0] - w1) >= (p[1] - c1) * (w2 - w1):
                hull.pop()
            else:
                break
        hull.append(p)
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(hull, hull[1:], strict=False)]


def _greedy(
    opt_w: list[list[int]], opt_c: list[list[float]], steps: list[tuple[int, int, float]], capacity: int, lightest: int
) -> float:
    """Cost of a feasible choice: the LP solution's whole hull steps (the fractional one left out)."""
    pick, stopped = [0] * len(opt_w), [False] * len(opt_w)
    left = capacity - lightest
    for g, dw, _ in steps:  # a group's steps come in hull order; once one does not fit, stop that group
        if stopped[g] or dw > left:
            stopped[g] = True
            continue
        pick[g] = opt_w[g].index(opt_w[g][pick[g]] + dw, pick[g])
        left -= dw
    return sum(opt_c[g][k] for g, k in enumerate(pick))


def solve(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]], capacity: int) -> Solution:
    """The exact optimum of the multiple-choice knapsack (module docstring). ``costs[i][j]`` and
    ``weights[i][j]`` (non-negative integers) describe option j of group i. A ValueError names
    ``capacity`` and the smallest feasible one when no choice fits."""
    if len(costs) != len(weights) or any(len(c) != len(w) or not c for c, w in zip(costs, weights, strict=False)):
        raise ValueError("costs and weights must have the same non-empty option lists, group by group")
    if any(int(w) != w or w < 0 for ws in weights for w in ws):
        raise ValueError("weights must be non-negative integers")
    lightest = sum(min(ws) for ws in weights)
    if capacity < lightest:
        raise ValueError(f"capacity={capacity} is infeasible: the lightest choice weighs {lightest}; "
                         f"choose capacity >= {lightest}")
    fronts = [_frontier(c, w) for c, w in zip(costs, weights, strict=False)]
    # decide the groups with the widest cost range first: their choice moves the bound most
    order = sorted(range(len(costs)), key=lambda i: costs[i][fronts[i][-1]] - costs[i][fronts[i][0]])  # (−range)
    opt_w = [[int(weights[i][j]) for j in fronts[i]] for i in order]
    opt_c = [[float(costs[i][j]) for j in fronts[i]] for i in order]
    n = len(order)
    rest_w = [0] * (n + 1)  # weight of the lightest options of groups d.. (position order)
    rest_c = [0.0] * (n + 1)  # their cost
    for d in range(n - 1, -1, -1):
        rest_w[d], rest_c[d] = rest_w[d + 1] + opt_w[d][0], rest_c[d + 1] + opt_c[d][0]
    steps = sorted(
        ((d, dw, dc) for d in range(n) for dw, dc in _hull_steps(list(zip(opt_w[d], opt_c[d], strict=True)))),
        key=lambda s: s[2] / s[1],  # most cost saved per unit of weight first
    )
    # per stage d, the hull steps of groups d.. in that order, as running sums (for the LP bound)
    cum: list[tuple[list[int], list[float], list[int], list[float]]] = []
    for d in range(n + 1):
        mine = [(dw, dc) for g, dw, dc in steps if g >= d]
        cw, cc = list(itertools.accumulate((dw for dw, _ in mine), initial=0)), list(
            itertools.accumulate((dc for _, dc in mine), initial=0.0))
        cum.append((cw, cc, [dw for dw, _ in mine], [dc for _, dc in mine]))

    def bound(d: int, room: int) -> float:
        """LP lower bound on the cost of groups d.. within weight ``room`` (≥ their lightest weight)."""
        cw, cc, dws, dcs = cum[d]
        left = room - rest_w[d]
        k = bisect.bisect_right(cw, left) - 1  # whole steps that fit
        total = rest_c[d] + cc[k]
        return total if k == len(dws) else total + dcs[k] * (left - cw[k]) / dws[k]

    incumbent = _greedy(opt_w, opt_c, steps, capacity, rest_w[0])
    # dynamic programming over groups; a state is (weight, cost) of a choice for the groups so far,
    # kept only when no other state is as light and as cheap (Pareto) and when its LP completion can
    # still beat the incumbent
    states: list[tuple[int, float]] = [(0, 0.0)]
    back: list[list[tuple[int, int]]] = []  # per group: for each new state, (previous state, option)
    for d in range(n):
        tol = 1e-12 * max(1.0, abs(incumbent))
        grown = sorted(
            (w + ow, c + oc, i, k)
            for i, (w, c) in enumerate(states)
            for k, (ow, oc) in enumerate(zip(opt_w[d], opt_c[d], strict=True))
            if w + ow + rest_w[d + 1] <= capacity
        )
        kept, links = [], []
        for w, c, i, k in grown:
            if (not kept or c < kept[-1][1]) and c + bound(d + 1, capacity - w) <= incumbent + tol:
                kept.append((w, c))
                links.append((i, k))
        states, back = kept, [*back, links]
    j = min(range(len(states)), key=lambda i: states[i][1])
    best = [0] * n
    for d in range(n - 1, -1, -1):
        j, best[d] = back[d][j]
    chosen = [0] * n
    for pos, i in enumerate(order):
        chosen[i] = fronts[i][best[pos]]
    return Solution(chosen, sum(float(costs[i][j]) for i, j in enumerate(chosen)),
                    sum(int(weights[i][j]) for i, j in enumerate(chosen)))
