"""Rankwise optimizers under FSDP2 (``fully_shard`` per decoder layer + root, 2 CPU processes on gloo).

Parity, one launch over every name of ``rw.optim.make`` (and the layer-wise mode, and APOLLO under
DDP + ZeroRedundancyOptimizer): the full weights after N steps equal those of one process on the
same global batches, after at least one subspace refresh (``update_gap=2``) or block switch
(``switch_every=2``). The models are float64 (see ``fsdp_worker.make_model``); the measured
differences are ≤ 1.4e-12 (FRUGAL) and ≤ 3e-15 for the others, the tolerance is 1e-8.

Resume (``-m slow``): k steps, save model + optimizer with ``torch.distributed.checkpoint``
(parameter-name keys), continue; fresh processes with a differently initialised model load the
checkpoint and run the same steps: the final weights are bit-identical. The default run covers the
name-keyed loading on one process (``test_state_dict.py``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import rankwise.optim as rwo
from rankwise.optim.projected import ProjectedOptimizer

from .fsdp_worker import (
    available,
    eval_loader,
    launch,
    loop_one_process,
    lora_and_norms,
    make_model,
    one_process,
)

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

TOL = 1e-8
PROJECTED_KWARGS = {"rank": 4, "lr": 1e-2, "update_gap": 2}  # refreshes the subspace at steps 0 and 2
SAMPLER_KWARGS = {  # switch_every=2: blocks switch at steps 2 and 4
    "badam": {"lr": 1e-2, "switch_every": 2, "order": "random", "seed": 3},
    "lisa": {"lr": 1e-2, "n_layers": 1, "switch_every": 2, "seed": 3},
    "owlore": {"lr": 1e-2, "rank": 4, "n_layers": 1, "switch_every": 2, "update_gap": 2,
               "outlier_threshold": 3.0, "seed": 3},
}


def _factory_case(name: str) -> tuple[str, dict, int]:
    """Every name of ``rw.optim.make``: samplers with K=2 (5 steps: 2 switches), projected optimizers
    with update_gap=2 (4 steps: 2 refreshes), anything else (adamw, a newly registered one) with lr."""
    if name in rwo.factory.SAMPLERS:
        return name, SAMPLER_KWARGS.get(name, {"lr": 1e-2, "switch_every": 2}), 5
    if issubclass(rwo.OPTIMIZERS[name], ProjectedOptimizer):
        kwargs = dict(PROJECTED_KWARGS)
        if name == "apollo_mini":  # rank 1 by definition
            kwargs.pop("rank")
        return name, kwargs, 4
    return name, {"lr": 1e-2}, 4


CASES = {name: _factory_case(name) for name in rwo.factory.names()}
CASES["layerwise_galore"] = ("layerwise:galore", dict(PROJECTED_KWARGS), 4)  # stepped in backward hooks
CASES["galore_svd"] = ("galore", {**PROJECTED_KWARGS, "projector": "svd"}, 4)  # the exact SVD: gathers G
# the optimizers whose steps never gather a gradient: the randomized range finder (rsvd / rsvd_int4,
# the default of the SVD-based ones) refreshes on the shards, a seeded Gaussian (APOLLO, Flora) does
# not read the gradient (the layer-wise mode steps in backward hooks, outside the logged step)
SHARDED_REFRESH = ("galore", "fira", "frugal", "gradnormlorp", "galore_adafactor", "galore_8bit", "q_galore",
                   "owlore", "apollo", "apollo_mini", "flora_opt")
# the refresh check: osd moves its basis every step by online PCA (proj_version stays 1)
PROJECTED = {t for t, (m, _, _) in CASES.items() if m.split(":")[-1] in rwo.OPTIMIZERS and t != "osd"
             and issubclass(rwo.OPTIMIZERS[m.split(":")[-1]], ProjectedOptimizer)}
# 8-bit moments of a tensor of at least min_8bit_size elements: a clear NotImplementedError under FSDP2
UNSUPPORTED = {"galore_8bit_quantized": ("galore_8bit", {**PROJECTED_KWARGS, "min_8bit_size": 256}, 2)}
# DDP + ZeroRedundancyOptimizer (not FSDP2): torch's ZeRO numbers APOLLO's seeds over each rank's
# share (0.04 off), sharding.zero_redundancy over the whole model (matches)
ZERO = {
    "zero_apollo": ("apollo", dict(PROJECTED_KWARGS), 4, True),
    "zero_apollo_torch": ("apollo", dict(PROJECTED_KWARGS), 4, False),
}
MORE = {  # other projectors / engine options, one launch (slow)
    "galore_reproject": ("galore", {"rank": 4, "lr": 1e-2, "update_gap": 2, "reproject_moments": True}, 4),
    "frugal_randk": ("frugal", {"rank": 4, "lr": 1e-2, "update_gap": 2, "selector": "randk"}, 4),
    "frugal_block": ("frugal", {"rank": 4, "lr": 1e-2, "update_gap": 2, "selector": "block"}, 4),
}
MORE_NEVER_GATHER = ("galore_reproject", "frugal_randk", "frugal_block")


def _specs(cases: dict) -> list[dict]:
    return [{"tag": t, "method": m, "kwargs": kw, "steps": n} for t, (m, kw, n) in cases.items()]


@pytest.fixture(scope="module")
def parity_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_parity")
    zero = [{"tag": t, "method": m, "kwargs": kw, "steps": n, "fixed": fixed, "mode": "zero"}
            for t, (m, kw, n, fixed) in ZERO.items()]
    rsvd = [{"tag": "sharded_rsvd", "method": "", "kwargs": {}, "steps": 0, "mode": "rsvd"}]
    launch("parity", _specs(CASES) + _specs(UNSUPPORTED) + zero + rsvd, out, timeout=600)
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("tag", list(CASES))
def test_fsdp2_two_processes_match_one_process(parity_dir, tag):
    method, kwargs, steps = CASES[tag]
    assert json.loads((parity_dir / f"{tag}.json").read_text())["error"] is None
    reference, optimizer = one_process(method, kwargs, steps)
    if tag in PROJECTED:  # the comparison covers a refresh of the subspace, not only the first basis
        states = [st for o in getattr(optimizer, "optimizers", [optimizer]) for st in o.state.values()]
        versions = [int(st["proj_version"]) for st in states if "proj_version" in st]
        assert versions and min(versions) >= 2
    if method in rwo.factory.SAMPLERS:  # ... and a block switch
        assert optimizer.global_step == steps and steps // kwargs["switch_every"] >= 2
    sharded = torch.load(parity_dir / f"{tag}.pt", weights_only=True)
    # no projector refresh failed over on the DTensor gradients (rsvd once fell back to the exact SVD)
    assert json.loads((parity_dir / f"{tag}.json").read_text())["svd_fallbacks"] == 0
    start = {n: p.detach() for n, p in make_model().named_parameters()}
    assert _max_diff(reference, start) > 1e-3  # the runs trained
    assert _max_diff(sharded, reference) <= TOL, tag


@pytest.mark.parametrize("tag", list(UNSUPPORTED))
def test_unsupported_under_fsdp2_raises_clearly(parity_dir, tag):
    error = json.loads((parity_dir / f"{tag}.json").read_text())["error"]
    assert error is not None and "not supported on FSDP2" in error and "min_8bit_size" in error


def test_zero_redundancy_seeds_match_one_process(parity_dir):
    """APOLLO's seeded projections under ZeroRedundancyOptimizer: the same on every rank and as on
    one process with ``sharding.zero_redundancy``; torch's ZeRO alone numbers them per rank."""
    for tag, (method, kwargs, steps, fixed) in ZERO.items():
        reference, _ = one_process(method, kwargs, steps)
        diff = _max_diff(torch.load(parity_dir / f"{tag}.pt", weights_only=True), reference)
        assert (diff <= TOL) if fixed else (diff > 1e-3), (tag, diff)


def _gradient_chunks() -> set[tuple[int, int]]:
    """What an all-gather of a 2-D gradient of the tiny Llama sends from each of 2 ranks."""
    return {(math.ceil(p.shape[0] / 2), p.shape[1]) for p in make_model().parameters() if p.dim() == 2}


def _gathered(out, tag: str) -> set[tuple[int, ...]]:
    """The chunk shapes all-gathered in the optimizer steps of launch case ``tag``."""
    record = json.loads((out / f"{tag}.json").read_text())
    assert record["error"] is None, tag
    return {tuple(shape) for shape in record["gathered_in_step"]}


def test_rsvd_refresh_never_gathers_the_gradient(parity_dir):
    """No all-gather of a gradient in any optimizer step of the rsvd optimizers (their refreshes run
    on the shards) and the Gaussian ones; the exact SVD's refresh gathers each one (the check sees
    gathers when they happen)."""
    grads = _gradient_chunks()
    for tag in SHARDED_REFRESH:
        assert not _gathered(parity_dir, tag) & grads, tag
    assert _gathered(parity_dir, "galore_svd") & grads


def test_sharded_range_finder_matches_one_process(parity_dir):
    """The ``rsvd`` range finder on a row-sharded matrix (``sharding.RowShardedOperand``: never
    gathered), cold and warm-started, both sides, even and uneven shards == the same calls on the
    full matrix in one process; the projection keeps G's layout (right: rows sharded, left:
    replicated) and the basis spans the exact top-4 singular subspace."""
    from .fsdp_worker import RSVD_SHAPES, rsvd_matrix, sharded_refreshes

    sharded = torch.load(parity_dir / "sharded_rsvd.pt", weights_only=True)
    for shape in RSVD_SHAPES:
        G = rsvd_matrix(*shape)
        plain, got = sharded_refreshes(G), sharded[tuple(shape)]
        for key in ("P", "R", "P2", "R2"):
            assert torch.allclose(got[key], plain[key], atol=1e-10), (shape, key)
        side = "right" if shape[0] >= shape[1] else "left"
        assert got["placements"] == ["(Shard(dim=0),)" if side == "right" else "(Replicate(),)"] * 2
        U, _, Vh = torch.linalg.svd(G)
        exact, P = (Vh[:4].T, got["P2"].T) if side == "right" else (U[:, :4], got["P2"])
        assert float(torch.linalg.matrix_norm(P @ P.T - exact @ exact.T, ord=2)) < 1e-6, shape


@pytest.mark.slow
def test_fsdp2_more_projectors_match_one_process(tmp_path):
    launch("parity", _specs(MORE), tmp_path)
    for tag, (method, kwargs, steps) in MORE.items():
        reference, _ = one_process(method, kwargs, steps)
        sharded = torch.load(tmp_path / f"{tag}.pt", weights_only=True)
        assert _max_diff(sharded, reference) <= TOL, tag
    grads = _gradient_chunks()
    for tag in MORE_NEVER_GATHER:  # random / cyclic coordinates: the refresh does not read the gradient
        assert not _gathered(tmp_path, tag) & grads, tag


def _dcp_roundtrip(tmp_path, tags: list[str]) -> None:
    split = 3
    specs = [{**s, "api": "torch"} for s in _specs({t: (CASES[t][0], CASES[t][1], 5) for t in tags})]
    launch("dcp-save", specs, tmp_path, split)
    launch("dcp-load", specs, tmp_path, split)
    for spec in specs:
        straight = torch.load(tmp_path / f"{spec['tag']}_straight.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"{spec['tag']}_resumed.pt", weights_only=True)
        for name, value in straight.items():
            assert torch.equal(resumed[name], value), (spec["tag"], name)


@pytest.mark.slow  # two torchrun launches, ~25-30 s on 2 busy cores
def test_dcp_resume_is_bit_exact(tmp_path):
    """GaLore (a basis in the state), Fira and APOLLO (limiter norms), APOLLO (seed chain), FRUGAL."""
    _dcp_roundtrip(tmp_path, ["galore", "fira", "apollo", "frugal"])


#: How far 4 GaLore steps on 2 processes may end from one process's, per precision: the ranks' half batches
#: and the reductions' order round otherwise (measured: fp32 2.5e-7, bf16 4.5e-3, fp16 3.9e-4; a rank that
#: ran fp32 instead would be 1.1e-2 from the bf16 reference, 3.4e-3 from the fp16 one).
PRECISION_ATOL = {"fp32": 1e-6, "bf16": 7e-3, "fp16": 1.5e-3}


def test_precision_and_logged_loss_under_fsdp2_and_ddp(tmp_path):
    """``rankwise.train(precision=...)`` of float32 weights on 2 processes (FSDP2 and DDP: the CLI's
    ``--precision`` with ``--nproc``) against the same run in one process on whole batches: the first step's
    loss equal to 1.5e-6 (autocast on every rank: fp32, bf16 and fp16 differ by 4e-6 or more there), the logged
    loss of every step the global batch's (the ranks' mean, not rank 0's half), the weights close
    (``PRECISION_ATOL``); every rank steps with the same loss scale (fp16: the GradScaler's inf check is
    reduced over the ranks); and a run stopped after step 2 and resumed from its checkpoint ends bit-identical
    to the straight one (the scaler's scale restored)."""
    kwargs = {"rank": 4, "update_gap": 2}
    specs = [{"tag": f"{precision}_{wrap}", "method": "galore", "kwargs": kwargs, "steps": 4,
              "mode": "precision", "precision": precision, "wrap": wrap}
             for precision in PRECISION_ATOL for wrap in ("fsdp", "ddp")]
    launch("precision", specs, tmp_path)
    for precision, atol in PRECISION_ATOL.items():
        reference, history = loop_one_process("galore", kwargs, 4, precision=precision)
        for wrap in ("fsdp", "ddp"):
            tag = f"{precision}_{wrap}"
            straight = torch.load(tmp_path / f"{tag}_straight.pt", weights_only=True)
            resumed = torch.load(tmp_path / f"{tag}_resumed.pt", weights_only=True)
            info = json.loads((tmp_path / f"{tag}.json").read_text())
            assert straight.keys() == resumed.keys() == reference.keys()
            for name, value in straight.items():
                assert torch.equal(resumed[name], value), f"{tag} {name}: resume is not exact"
                torch.testing.assert_close(value, reference[name], rtol=0, atol=atol, msg=f"{tag} {name}")
            losses = [log["loss"] for log in history]
            assert info["losses"][0] == pytest.approx(losses[0], abs=1.5e-6), tag
            assert info["losses"] == pytest.approx(losses, abs=2e-4 if precision != "fp32" else 1e-6), tag
            scales = info["loss_scales"]
            assert scales[0] == scales[1], f"{tag}: the ranks stepped with different loss scales"
            expected = [log.get("loss_scale") for log in history]
            assert scales[0] == expected and (None in expected) == (precision != "fp16"), tag


def test_bf16_base_with_fp32_adapters_under_fsdp2_and_ddp(tmp_path):
    """A bfloat16 model with float32 LoRA factors and bfloat16 norms trained (``rankwise train --dtype bf16
    --nproc 2``): two dtypes of trainable parameters in every decoder layer, which one FSDP2 group refuses;
    ``shard_model`` gives the norms groups of their own. 4 AdamW steps on 2 processes equal one process's
    (≤ 1e-6: the base's bf16 products are the same per row), every dtype kept, and resume is exact."""
    specs = [{"tag": f"bf16_lora_{wrap}", "method": "adamw", "kwargs": {}, "steps": 4, "mode": "precision",
              "precision": "fp32", "wrap": wrap, "dtype": "bfloat16", "lora": True} for wrap in ("fsdp", "ddp")]
    launch("precision", specs, tmp_path)
    reference, history = loop_one_process("adamw", {}, 4, dtype=torch.bfloat16, lora=True)
    start = dict(lora_and_norms(make_model(0, torch.bfloat16)).named_parameters())
    assert {p.dtype for n, p in start.items() if p.requires_grad} == {torch.float32, torch.bfloat16}
    for spec in specs:
        straight = torch.load(tmp_path / f"{spec['tag']}_straight.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"{spec['tag']}_resumed.pt", weights_only=True)
        assert straight.keys() == resumed.keys() == reference.keys()
        for name, value in straight.items():
            assert value.dtype == reference[name].dtype == start[name].dtype, name
            assert torch.equal(resumed[name], value), f"{spec['tag']} {name}: resume is not exact"
            torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6, msg=f"{spec['tag']} {name}")
        assert not torch.equal(straight["model.norm.weight"], start["model.norm.weight"].detach())
        info = json.loads((tmp_path / f"{spec['tag']}.json").read_text())
        assert info["losses"] == pytest.approx([log["loss"] for log in history], abs=1e-6)


def test_evaluation_split_over_ranks_equals_one_process(tmp_path):
    """``rankwise train --nproc``'s evaluation: each rank evaluates its rows of every batch (``RankSlices``), a
    batch with fewer rows than ranks is evaluated whole and counted once, the sums are added over the ranks:
    the one-process metrics (7 rows, batches of 3, unequal predicted tokens per row)."""
    from rankwise.train import evaluate

    launch("eval", [{"tag": "eval", "method": "adamw", "kwargs": {}, "steps": 0, "mode": "eval"}], tmp_path)
    split = json.loads((tmp_path / "eval.json").read_text())
    whole = evaluate(make_model(), eval_loader())
    assert split["tokens"] == whole["tokens"] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in eval_loader())
    assert split["loss"] == pytest.approx(whole["loss"], abs=1e-6)  # HF computes the loss in float32


def test_rank_slices_count_every_evaluation_row_once():
    from rankwise.cli.distributed import RankSlices

    loader = [{"labels": torch.arange(i, i + n), "note": "x"} for i, n in ((0, 3), (3, 3), (6, 1))]
    counted = []
    for rank in range(2):
        pairs = list(RankSlices(loader, rank, 2).eval_slices())
        assert len(pairs) == 3  # the same forwards on every rank
        counted += [int(v) for batch, c in pairs if c for v in batch["labels"]]
        assert [len(b["labels"]) for b in RankSlices(loader, rank, 2)] == [2 - rank, 2 - rank]  # training skips it
    assert sorted(counted) == list(range(7))


def test_gradient_accumulation_under_fsdp2_and_ddp(tmp_path):
    """``rankwise.train(grad_accum=2)`` on 2 processes, the earlier micro-batch's gradient kept local
    (FSDP2 ``set_requires_gradient_sync(False)``, DDP ``no_sync``) and reduced with the last one: 4 steps of
    2 batches of 2 rows == 4 steps of one batch of 4 rows (the loader's same order), under FSDP2 and DDP."""
    specs = [{"tag": f"accum_{wrap}", "method": "galore", "kwargs": {"rank": 4, "update_gap": 2}, "steps": 4,
              "mode": "accum", "wrap": wrap} for wrap in ("fsdp", "ddp")]
    launch("accum", specs, tmp_path)
    start = make_model()
    for spec in specs:
        weights = torch.load(tmp_path / f"{spec['tag']}.pt", weights_only=True)
        one, two = weights[1], weights[2]
        assert one.keys() == two.keys()
        for name, value in one.items():
            torch.testing.assert_close(two[name], value, rtol=0, atol=TOL, msg=f"{spec['tag']} {name}")
        moved = dict(start.named_parameters())["model.layers.0.mlp.up_proj.weight"]
        assert not torch.equal(one["model.layers.0.mlp.up_proj.weight"], moved.detach())
