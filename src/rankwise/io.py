"""Atomic file/directory writes and the rankwise adapter format (config JSON + safetensors)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters.registry import adapt, adapter_layers, adapter_names, adapter_state
from .checks import tensors_fit

ADAPTER_CONFIG = "rankwise_adapter.json"
ADAPTER_WEIGHTS = "rankwise_adapter.safetensors"
FORMAT_VERSION = 1


#: prefix of the temporary siblings that atomic writes use: ``.<name>.tmp-<pid>-<random>``
TMP_TAG = ".tmp-"
LOCK_FILE = ".rankwise.lock"
_RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux >= 3.15, glibc >= 2.28)
_AT_FDCWD = -100


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_stale_temporaries(parent: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings (``.<name>.tmp-<pid>-*``) that writers which died mid-write left
    in ``parent``; a live writer's (its pid runs) are kept. Returns what was removed."""
    removed: list[Path] = []
    root = Path(parent)
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if not entry.name.startswith(".") or TMP_TAG not in entry.name:
            continue
        pid_text = entry.name.rsplit(TMP_TAG, 1)[1].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (the directories last, deepest first)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            file = Path(dirpath) / name
            if not file.is_symlink():
                _fsync_path(file)
        _fsync_path(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step (renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _mkdtemp(target: Path) -> Path:
    """A temporary sibling of ``target`` with the mode a plain ``mkdir`` gives (the user's umask)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_TAG}{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` atomically.

    Everything written is fsync'd (files, directories, the parent) before and after the swap. An
    existing ``path`` is exchanged with the new directory in one step (``renameat2``), so there is no
    moment without it; where the file system cannot exchange, the old one is renamed aside, the new
    one renamed in, then the old one deleted. If the body raises, ``path`` is left as it was and the
    temporary directory is removed; temporaries of writers that died are removed on the next write.
    Modes follow the umask, as for ``mkdir`` / ``open``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target.parent)
    tmp = _mkdtemp(target)
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists() and not _exchange(tmp, target):
            old = _mkdtemp(target)
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        elif not target.exists():
            os.replace(tmp, target)
        _fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path``; it replaces ``path`` only when the body succeeds
    (fsync'd, with the mode ``open`` would give under the umask)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}{TMP_TAG}{os.getpid()}-", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_path(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class DirectoryLocked(ValueError):
    """Another live process holds the lock of an output directory."""


_HELD_LOCKS: dict[str, tuple[Any, int]] = {}


@contextlib.contextmanager
def directory_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on directory ``path`` (created if needed) for the body: ``path/.rankwise.lock``
    locked with ``fcntl.flock`` and holding this process's pid. A second process asking for it gets a
    :class:`DirectoryLocked` naming the holder's pid. The kernel drops the lock when its holder dies,
    so a lock file left by a killed run is simply taken over. Re-entrant within one process. A directory
    the lock created and nothing else was written into is removed again."""
    import fcntl

    root = Path(path)
    created = [d for d in (root, *root.absolute().parents) if not d.exists()]  # what mkdir makes, deepest first
    root.mkdir(parents=True, exist_ok=True)
    key = str(root.resolve())
    if key in _HELD_LOCKS:
        f, count = _HELD_LOCKS[key]
        _HELD_LOCKS[key] = (f, count + 1)
        try:
            yield root
        finally:
            f, count = _HELD_LOCKS[key]
            _HELD_LOCKS[key] = (f, count - 1)
        return
    lock_file = root / LOCK_FILE
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise DirectoryLocked(f"{str(root)!r} is in use by another rankwise run (pid {holder}, lock file "
                              f"{lock_file}); wait for it to finish or choose another output directory") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD_LOCKS[key] = (f, 1)
    try:
        yield root
    finally:
        f, count = _HELD_LOCKS[key]
        if count <= 1:
            del _HELD_LOCKS[key]
            with contextlib.suppress(OSError):
                f.seek(0)
                f.truncate()
                if created and [p.name for p in root.iterdir()] == [LOCK_FILE]:  # a run that wrote nothing
                    lock_file.unlink()
                    for d in created:
                        d.rmdir()
            f.close()  # releases the flock
        else:
            _HELD_LOCKS[key] = (f, count - 1)


@contextlib.contextmanager
def write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Report a failed write as an ``OSError`` naming ``path``: libraries that write files report a full
    disk or a lost file as other errors (torch: ``RuntimeError`` "enforce fail at inline_container.cc",
    safetensors: ``SafetensorError``)."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001  only failures of the write in the body
        if type(e).__name__ not in ("RuntimeError", "SafetensorError"):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise OSError(errno.EIO, f"could not write (disk full or not writable?): {reason}", str(path)) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (safetensors, torch.save); it
    replaces ``path`` (fsync'd, mode under the umask) only when the body succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}{TMP_TAG}{os.getpid()}-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with write_errors(target):
            yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_path(tmp)
        os.replace(tmp, target)
        _fsync_path(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_file(path) as f:
        json.dump(data, f, indent=2, sort_keys=True)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors file of contiguous, unshared copies (shared storage is not allowed there); a failed
    write is an ``OSError`` naming ``path``."""
    with write_errors(path):
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path), metadata=metadata)


def adapter_tensors(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor ``load_adapter`` needs for adapter ``name`` (None: the model's only adapter): its
    parameters / persistent buffers by target layer name, and the modules trained beside it."""
    state = adapter_state(model, name)
    out: dict[str, torch.Tensor] = {}
    for target, layer in adapter_layers(model, state.name):
        for key, t in layer.state_dict().items():
            if not key.startswith("base_layer."):
                out[f"{target}.{key}"] = t
    for module in state.trainable_modules:
        for key, t in model.get_submodule(module).state_dict().items():
            out[f"{module}.{key}"] = t
    return out


def adapter_dirs(model: nn.Module, path: str | os.PathLike, name: str | None) -> dict[str, Path]:
    """Where each adapter goes under ``path`` (PEFT's multi-adapter layout): one adapter (``name``
    given, or the only one) at ``path`` itself; several: ``default`` at ``path``, any other at
    ``path/<name>``."""
    root = Path(path)
    if name is not None or len(adapter_names(model)) <= 1:
        return {adapter_state(model, name).name: root}
    return {n: root if n == "default" else root / n for n in adapter_names(model)}


def _base_model_name(model: nn.Module) -> str | None:
    """The name or directory the base model was loaded from (a directory as an absolute path)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return os.path.abspath(name) if name and os.path.isdir(name) else name


def adapter_record(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """The adapter's config as ``save_adapter`` writes it (``rankwise_adapter.json``): what
    :func:`add_adapter` needs, with the tensors, to build it again on a model."""
    state = adapter_state(model, name)
    return {
        "format": "rankwise-adapter",
        "version": FORMAT_VERSION,
        "name": state.name,
        "method": state.method,
        "config": state.config.to_dict(),
        "layers": state.layers,
        "trainable_modules": state.trainable_modules,
        "overrides": state.overrides,
        "base_model": _base_model_name(model),
    }


def add_adapter(model: nn.Module, record: dict[str, Any], tensors: dict[str, torch.Tensor], name: str,
                where: str) -> nn.Module:
    """Add adapter ``name`` described by ``record`` (:func:`adapter_record`) to ``model`` and copy
    ``tensors`` into it, every one checked to fit first (``where`` names their source in errors)."""
    adapt(
        model,
        record["method"],
        targets=list(record["layers"]),
        trainable=record["trainable_modules"] or None,
        overrides=record.get("overrides") or None,
        name=name,
        _skip_init=True,
        **record["config"],
    )
    expected = adapter_tensors(model, name)
    tensors_fit(tensors, expected, where)  # all checked before any is copied
    with torch.no_grad():
        for key, t in tensors.items():
            expected[key].copy_(t)
    for _, layer in adapter_layers(model, name):
        layer.after_load()
    return model


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write ``rankwise_adapter.json`` + ``rankwise_adapter.safetensors`` to ``path`` atomically.

    ``name``: the adapter to save; None saves every adapter, in PEFT's layout when there are
    several (``default`` at ``path``, each other adapter in ``path/<name>``); ``rw.load_adapters``
    reads that layout back."""
    dirs = adapter_dirs(model, path, name)
    with atomic_directory(path) as tmp:
        for adapter, where in dirs.items():
            target = tmp / where.relative_to(path)
            target.mkdir(parents=True, exist_ok=True)
            write_json(target / ADAPTER_CONFIG, adapter_record(model, adapter))
            save_tensors(adapter_tensors(model, adapter), target / ADAPTER_WEIGHTS)
    return Path(path)


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Add the adapter saved at ``path`` to ``model`` (the base, or a model holding other adapters) and
    load its tensors; ``name``: its name on the model (default: the name it was saved under).

    Every tensor must fit its model tensor exactly (:func:`rankwise.checks.tensor_fits`: shape, floating
    dtype, finite values); a ValueError names the first that does not."""
    path = Path(path)
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        inside = sorted(p.name for p in path.glob(f"*/{ADAPTER_CONFIG}") if p.parent.is_dir()) if path.is_dir() else []
        hint = f"; it holds named adapters {inside}: use rw.load_adapters(model, path)" if inside else ""
        raise FileNotFoundError(f"{cfg_file} not found: not a rankwise adapter directory{hint}")
    config = json.loads(cfg_file.read_text())
    name = name if name is not None else config.get("name", "default")
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    return add_adapter(model, config, tensors, name, f"adapter file {path / ADAPTER_WEIGHTS}")


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load every adapter that ``save_adapter`` wrote to ``path``: the one at ``path`` (if any), then
    each ``path/<name>`` holding an adapter, in name order."""
    path = Path(path)
    dirs = ([path] if (path / ADAPTER_CONFIG).is_file() else []) + sorted(
        p.parent for p in path.glob(f"*/{ADAPTER_CONFIG}")
    )
    if not dirs:
        raise FileNotFoundError(f"no rankwise adapter in {path} (no {ADAPTER_CONFIG} there or in its subdirectories)")
    for where in dirs:
        load_adapter(model, where)
    return model
