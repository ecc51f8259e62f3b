"""Run integrity: atomic, fsync'd, umask-respecting writes; the output-directory lock; stale temporaries;
resume that refuses changed settings and falls back over unreadable checkpoints; a fresh run never
prunes or resumes another run's checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rankwise import io as rio
from rankwise.checkpoint import find_checkpoint
from rankwise.io import DirectoryLocked, atomic_directory, atomic_file, directory_lock, write_json
from rankwise.train import TrainConfig, train
from tests.conftest import cls_batches, make_tiny_bert


# ----------------------------------------------------------------------------- atomic writes
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_outputs_follow_the_umask(tmp_path, umask_022):
    """tempfile made every output 0600 / 0700; a plain mkdir/open under umask 022 gives 0644 / 0755."""
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
    write_json(tmp_path / "f.json", {"a": 1})
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644


def test_writes_are_fsynced(tmp_path, monkeypatch):
    """Every file, the new directory and the parent reach the disk before the write returns."""
    synced: list[str] = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"x")
    names = {Path(p).name for p in synced}
    assert {"a.bin", "sub"} <= names  # the file and its directory (under their temporary names)
    assert str(tmp_path) in synced  # the parent, after the rename


def test_an_overwritten_directory_is_never_missing(tmp_path, monkeypatch):
    """Replacing a directory swaps it in one step: at no rename is the target absent."""
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "old.txt").write_text("old")
    real = os.replace
    missing = []

    def watch(a, b):
        real(a, b)
        missing.append(not target.exists())

    monkeypatch.setattr(os, "replace", watch)
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not any(missing)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old one is gone, no temporary left


def test_temporaries_of_dead_writers_are_cleaned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f".checkpoint-4{rio.TMP_TAG}{dead}-abc"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    live = tmp_path / f".checkpoint-5{rio.TMP_TAG}{os.getpid()}-abc"  # a live writer's: kept
    live.mkdir()
    with atomic_directory(tmp_path / "checkpoint-6") as tmp:
        (tmp / "a").write_text("x")
    assert not stale.exists() and live.exists()


def test_atomic_file_failure_leaves_the_old_file(tmp_path):
    write_json(tmp_path / "f.json", {"a": 1})
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "f.json") as f:
        f.write("{broken")
        raise RuntimeError("crash")
    assert (tmp_path / "f.json").read_text().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


# ----------------------------------------------------------------------------- the lock
HOLD = """
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush()
print("locked", flush=True)
time.sleep(60)
"""


def hold_lock(directory: Path) -> subprocess.Popen:
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory / rio.LOCK_FILE)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_directory_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path):
    proc = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(DirectoryLocked, match=f"pid {proc.pid}"), directory_lock(tmp_path / "run"):
            pass
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "run" / rio.LOCK_FILE).read_text() == str(proc.pid)  # the dead run's lock file stays
    with directory_lock(tmp_path / "run"), directory_lock(tmp_path / "run"):  # taken over; re-entrant
        assert (tmp_path / "run" / rio.LOCK_FILE).read_text() == str(os.getpid())


def test_a_run_that_writes_nothing_leaves_no_directory(tmp_path):
    with directory_lock(tmp_path / "new" / "run"):
        assert (tmp_path / "new" / "run" / rio.LOCK_FILE).is_file()
    assert not (tmp_path / "new").exists()
    with directory_lock(tmp_path / "kept"):
        (tmp_path / "kept" / "a.txt").write_text("x")
    assert (tmp_path / "kept" / "a.txt").is_file()


def test_training_takes_the_output_lock(tmp_path):
    proc = hold_lock(tmp_path)
    try:
        cfg = TrainConfig(lr=1e-2, max_steps=2, checkpoint_every=1, output_dir=str(tmp_path), progress=False)
        with pytest.raises(DirectoryLocked, match=f"pid {proc.pid}"):
            train(make_tiny_bert(), cls_batches(), config=cfg)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- runs sharing a directory
def cfg_for(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-2, "max_steps": 4, "checkpoint_every": 1, "output_dir": str(out),
                          "progress": False, **kw})


def test_a_fresh_run_refuses_another_runs_checkpoints(tmp_path):
    """An old run's checkpoints (higher step numbers) would survive 'keep the newest 2' and be resumed."""
    train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, max_steps=6))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(make_tiny_bert(seed=1), cls_batches(), config=cfg_for(tmp_path, max_steps=3))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_pruning_renames_a_checkpoint_aside_before_deleting_it(tmp_path, monkeypatch):
    """A kill while rmtree runs left a half-deleted checkpoint-N that resume then picked."""
    import shutil

    deleted = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, ignore_errors=False: deleted.append(Path(path).name))
    train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, max_steps=3, keep_checkpoints=1))
    assert deleted and all(not name.startswith("checkpoint-") for name in deleted)
    assert find_checkpoint(tmp_path).name == "checkpoint-3"


# ----------------------------------------------------------------------------- resume
def test_resume_refuses_changed_settings_naming_them(tmp_path):
    train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path))
    for change in ({"lr": 5e-2}, {"seed": 3}, {"batch_size": 2}):
        name = next(iter(change))
        with pytest.raises(ValueError, match=f"{name}: .* -> "):
            train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, **change), resume_from=tmp_path)


def test_resume_with_an_allowed_lr_uses_the_new_lr(tmp_path):
    """The old lr came back from the optimizer state while the record said the new one."""
    train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, max_steps=2, schedule="constant"))
    res = train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, max_steps=4, lr=5e-2, schedule="constant"),
                resume_from=tmp_path, allow_change=["lr"])
    assert [h["lr"] for h in res.history] == pytest.approx([1e-2, 1e-2, 5e-2, 5e-2])


def test_max_steps_may_grow_on_resume(tmp_path):
    train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, max_steps=2))
    res = train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, max_steps=4), resume_from=tmp_path)
    assert res.steps == 4
    with pytest.raises(ValueError, match="max_steps: 4 -> 3"):
        train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, max_steps=3), resume_from=tmp_path)


@pytest.mark.parametrize("damage", ["empty", "garbage"])
def test_resume_falls_back_over_unreadable_checkpoints(tmp_path, capsys, damage):
    train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, max_steps=3))
    newest = find_checkpoint(tmp_path)
    assert newest.name == "checkpoint-3"
    for name in ("trained_tensors.safetensors", "trainer_state.pt"):
        (newest / name).write_bytes(b"" if damage == "empty" else b"\x00garbage" * 10)
    res = train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, max_steps=3), resume_from=tmp_path)
    assert res.steps == 3 and len(res.history) == 3
    err = capsys.readouterr().err
    assert "checkpoint-3" in err and "unreadable" in err and "checkpoint-2" in err


def test_resume_with_no_readable_checkpoint_is_one_error(tmp_path):
    train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, max_steps=1))
    (find_checkpoint(tmp_path) / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable checkpoint") as e:
        train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, max_steps=1), resume_from=tmp_path)
    assert "\n" not in str(e.value)


def test_a_full_disk_is_an_oserror_naming_the_path(tmp_path, monkeypatch):
    """torch.save on a full disk raised 'enforce fail at inline_container.cc' (a RuntimeError)."""
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="checkpoint-1") as e:
        train(make_tiny_bert(), cls_batches(), config=cfg_for(tmp_path, max_steps=1))
    assert "\n" not in str(e.value)
    assert not any(p.name.startswith("checkpoint") for p in (tmp_path / "checkpoints").iterdir())
    time.sleep(0)
