"""The transformers Trainer (``RankwiseTrainer``) with a rankwise optimizer on 2 CPU processes, and
the accelerate FSDP2 config file of the repository.

accelerate (1.16) turns FSDP on only for accelerator devices (``AcceleratorState`` promotes
MULTI_GPU / MULTI_XPU / ... to FSDP; 2 CPU processes are MULTI_CPU, i.e. DDP), so on CPU the
Trainer runs data-parallel: ``torchrun`` + ``use_cpu=True`` gives MULTI_CPU, and GaLore's 4 steps
match one process (measured 2.2e-16, float64). ``configs/accelerate_fsdp2.yaml`` is checked to
parse as FSDP version 2 (it needs GPUs to run; see docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from ..launch import run_retrying, torchrun
from .fsdp_worker import available

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("trainer_worker.py")


def test_accelerate_config_is_fsdp2():
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    config = config_args.load_config_from_file(str(ROOT / "configs" / "accelerate_fsdp2.yaml"))
    assert str(config.distributed_type) in ("FSDP", "DistributedType.FSDP")
    assert int(config.fsdp_config["fsdp_version"]) == 2
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"


ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow  # two runs with transformers' start-up, ~1-2 min on 2 busy cores
@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_trainer_two_processes_match_one_process(tmp_path):
    one = run_retrying([sys.executable, str(WORKER), str(tmp_path / "one"), "galore"], timeout=400, env=ENV, cwd=ROOT)
    assert one.returncode == 0, one.report
    torchrun(WORKER, str(tmp_path / "two"), "galore", timeout=400, env=ENV, cwd=ROOT, scratch=tmp_path)
    info = json.loads((tmp_path / "two" / "info.json").read_text())
    assert info["world"] == 2 and info["distributed_type"].endswith("MULTI_CPU") and info["optimizer"] == "GaLoreAdamW"
    one = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "weights.pt", weights_only=True)
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-8
