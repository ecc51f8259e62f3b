"""Resume: k steps, save (model + optimizer state), load in a FRESH PROCESS, N−k steps == N straight steps.

Bit-identical on CPU for every projected optimizer; the resumed part contains a projector refresh
(steps are counted from 0, update_gap = 3: refreshes at 0, 3, 6; k = 4, N = 7).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import rankwise as rw
from rankwise import catalogue

N_STEPS, K_STEPS, GAP = 7, 4, 3
ROOT = Path(__file__).resolve().parents[2]

#: Per-optimizer settings for this tiny model; every catalogued optimizer is resumed (the ones not named
#: here with their defaults), plus the variants listed.
SETTINGS: dict[str, dict] = {
    "galore_adafactor": {"beta1": 0.9},
    "galore_8bit": {"min_8bit_size": 64},
    "q_galore": {"min_8bit_size": 64, "weight_quant": True, "queue_size": 1, "cos_threshold": -1.0},
    "osd": {"proj_lr": 0.05},
}
VARIANTS: list[tuple[str, str, dict]] = [
    ("galore_rsvd_reproject", "galore", {"projector": "rsvd", "reproject_moments": True}),
    ("galore_svd", "galore", {"projector": "svd"}),  # the exact SVD (the default is the randomized one)
    ("q_galore_svd", "q_galore", {**SETTINGS["q_galore"], "projector": "svd"}),
    ("frugal_randk", "frugal", {"selector": "randk"}),
    ("frugal_block", "frugal", {"selector": "block", "density": 0.5}),
    ("osd_lion", "osd", {"inner": "lion"}),
    ("natural_galore_reproject", "natural_galore", {"reproject_moments": True, "natural_history": 3}),
    ("coap_recompute", "coap", {"reproject_factor": 2}),  # recomputed at step 6, moved by Eq. 5 at step 3
    # cross-head bases (head_dim 8 of up 32×16 rows / down 16×32 columns); the sparse residual's warm-up
    # still running at the save (k = 4 < 6), or its moments already running (warm-up 2)
    ("galore_plus_heads_warmup", "galore_plus", {"head_dim": 8, "residual_warmup": 6, "residual_density": 0.05}),
    ("galore_plus_residual", "galore_plus", {"residual_warmup": 2, "reproject_moments": True}),
]
CONFIGS: list[tuple[str, str, dict]] = [
    (r.name, r.name, SETTINGS.get(r.name, {})) for r in catalogue.records(family="optimizer", status="done")
] + VARIANTS


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 40, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.lm_head(h + self.down(torch.nn.functional.gelu(self.norm(self.up(h)))))


def build(name: str, kwargs: dict) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyLM()
    if name == "adamw":
        return model, rw.optim.make(name, model, lr=1e-2)
    return model, rw.optim.make(name, model, rank=4, lr=1e-2, update_gap=GAP, **kwargs)


def run_steps(model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    for step in range(start, stop):
        ids = torch.randint(0, 40, (8, 6), generator=torch.Generator().manual_seed(1000 + step))
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def resume_all(directory: str) -> None:
    """Child-process entry point: load every checkpoint with weights_only=True and finish the run."""
    torch.set_num_threads(1)
    for cid, name, kwargs in CONFIGS:
        model, opt = build(name, kwargs)
        ckpt = torch.load(Path(directory) / f"{cid}.pt", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        run_steps(model, opt, K_STEPS, N_STEPS)
        torch.save(model.state_dict(), Path(directory) / f"{cid}_final.pt")


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    straight = {}
    for cid, name, kwargs in CONFIGS:
        model, opt = build(name, kwargs)
        run_steps(model, opt, 0, K_STEPS)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / f"{cid}.pt")
        run_steps(model, opt, K_STEPS, N_STEPS)
        straight[cid] = {k: v.clone() for k, v in model.state_dict().items()}
    script = "import sys; from tests.optim.test_resume import resume_all; resume_all(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for cid, _, _ in CONFIGS:
        resumed = torch.load(tmp_path / f"{cid}_final.pt", weights_only=True)
        for key, value in straight[cid].items():
            assert torch.equal(resumed[key], value), f"{cid}: {key} differs after resume"


def test_resume_covers_refresh_and_changes_the_model():
    """Guard for the test above: the resumed segment really refreshes projectors and moves weights."""
    model, opt = build("galore", {})
    run_steps(model, opt, 0, K_STEPS)
    p = model.up.weight
    P_before, W_before = opt.state[p]["P"].clone(), p.detach().clone()
    run_steps(model, opt, K_STEPS, N_STEPS)
    assert not torch.equal(opt.state[p]["P"], P_before)  # refreshed at step 6
    assert not torch.equal(p.detach(), W_before)
