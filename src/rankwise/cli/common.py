"""What every ``rankwise`` subcommand shares: the one-line error handling, value parsing, ``KEY=VALUE``
flags, ``--targets`` parsing, the LM data loader and the flags several subcommands take (``FLAGS``,
each defined once with its old spellings as aliases).

A user mistake raises :class:`UsageError` (or a ``ValueError`` from the library) and ends as one line
``rankwise: error: ...`` with exit status 2; ``RANKWISE_DEBUG=1`` re-raises it to show the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Help layout of every parser: descriptions and epilogs keep their line breaks.
Formatter = argparse.RawDescriptionHelpFormatter


class UsageError(ValueError):
    """A user mistake reported as one line with exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors (bad flag, bad value) are one ``rankwise: error:`` line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"rankwise: error: {message} (see '{self.prog} --help')\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """An unknown flag is reported by the (sub)command it was given to, so the error points to that
        command's ``--help`` rather than to the top level's."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _report(error: BaseException) -> int:
    if os.environ.get("RANKWISE_DEBUG"):
        raise error
    if isinstance(error, OSError) and error.filename is not None:  # "<path>: No space left on device"
        message = f"{error.filename}: {error.strerror or error}"
    else:
        message = str(error)
    message = " ".join(message.split()) or type(error).__name__  # one line
    print(f"rankwise: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """``func(args)`` with user mistakes (``ValueError``, ``OSError``, a missing asset) turned into one
    ``rankwise: error:`` line and exit status 2; Ctrl-C exits with 130."""
    from ..data.datasets import MissingAssetError

    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("rankwise: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, MissingAssetError) as e:
        return _report(e)


# ----------------------------------------------------------------------------- values
def parse_value(text: str) -> Any:
    """``"8"`` -> 8, ``"1e-3"`` -> 0.001, ``"true"`` -> True, ``"null"`` -> None, else the string."""
    import yaml

    try:
        return coerce_number(yaml.safe_load(text))
    except yaml.YAMLError:
        return text


def coerce_number(value: Any) -> Any:
    """YAML 1.1 reads ``2e-3`` as a string; turn numeric-looking strings into int/float."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def key_values(items: list[str] | None, flag: str, example: str) -> dict[str, Any]:
    """``["k=v", ...]`` from a repeatable ``KEY=VALUE`` flag as a dict with parsed values."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {item!r} must look like KEY=VALUE (e.g. {flag} {example})")
        out[key.strip()] = parse_value(value)
    return out


def parse_targets(value: Any) -> Any:
    """``all-linear``; ``re:<regex>`` (full match); ``a,b,c`` or a list = module-name suffixes."""
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    value = str(value)
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[3:]
    return [t.strip() for t in value.split(",") if t.strip()]


# ----------------------------------------------------------------------------- data
def text_loader(data: str, split: str, tokenizer: Any, max_length: int, batch_size: int, seed: int,
                limit: int | None = None, shuffle: bool = True):
    """A ``rankwise.data.lm_loader`` over ``max_length``-token blocks of a packaged text corpus (a seeded
    sample of ``limit`` documents when given); UsageError when the text fills no block."""
    from ..data import lm_blocks, lm_loader, load_text

    blocks = lm_blocks(load_text(data, split, seed=seed, limit=limit), tokenizer, max_length)
    if len(blocks) == 0:
        raise UsageError(f"{data} ({split}): too little text for one block of {max_length} tokens; "
                         "use more documents or a lower --max-length")
    return lm_loader(blocks, batch_size=batch_size, shuffle=shuffle, seed=seed)


# ----------------------------------------------------------------------------- shared flags
@dataclass(frozen=True)
class Flag:
    """A flag several subcommands take: its one spelling, the old spellings kept as aliases, where the
    value goes (``dest``) and how it is read; each subcommand gives its own help and default."""

    names: tuple[str, ...]
    dest: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def aliases(self) -> tuple[str, ...]:
        return self.names[1:]


#: torch's names of the ``--dtype`` values, accepted as aliases (``bfloat16`` = ``bf16``).
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(text: Any) -> str:
    """The short dtype name of ``text`` (a key of ``planner.DTYPES``: ``fp32``/``bf16``/``fp16``, or torch's
    ``float32``/``bfloat16``/``float16``); UsageError naming the allowed values otherwise."""
    from ..planner import DTYPES

    name = DTYPE_ALIASES.get(str(text), str(text))
    if name not in DTYPES:
        raise UsageError(f"--dtype {text!r}; choose one of {list(DTYPES)} (or {', '.join(DTYPE_ALIASES)})")
    return name


#: Every flag that more than one subcommand takes, defined once.
FLAGS: dict[str, Flag] = {flag.dest: flag for flag in (
    Flag(("--model",), "model", {"metavar": "NAME_OR_DIR"}),
    Flag(("--method",), "method", {"metavar": "METHOD"}),
    Flag(("--rank", "--r"), "rank", {"type": int, "metavar": "R"}),
    Flag(("--max-steps", "--steps"), "max_steps", {"type": int, "metavar": "N"}),
    Flag(("--max-length", "--block-size"), "max_length", {"type": int, "metavar": "TOKENS"}),
    Flag(("--batch-size",), "batch_size", {"type": int, "metavar": "N"}),
    Flag(("--lr",), "lr", {"type": float, "metavar": "LR"}),
    Flag(("--seed",), "seed", {"type": int, "metavar": "N"}),
    Flag(("--device",), "device", {"metavar": "DEVICE"}),
    Flag(("--output",), "output", {"metavar": "DIR"}),
    Flag(("--overwrite",), "overwrite", {"action": "store_true"}),
    Flag(("--no-progress",), "progress", {"action": "store_false"}),
    Flag(("--dtype",), "dtype", {"metavar": "DTYPE"}),
    Flag(("--gradient-checkpointing", "--checkpointing"), "gradient_checkpointing", {"action": "store_true"}),
)}


def add_flag(parser: Any, dest: str, help: str, **kwargs: Any) -> argparse.Action:
    """Add the shared flag ``FLAGS[dest]`` to ``parser`` (a parser or an argument group); ``kwargs``
    (``default``, ``required``, ...) override the shared ones."""
    flag = FLAGS[dest]
    return parser.add_argument(*flag.names, dest=flag.dest, help=help, **{**flag.kwargs, **kwargs})


def key_aliases() -> dict[str, str]:
    """Old flag spellings as config keys (``r`` -> ``rank``, ``steps`` -> ``max_steps``, ...)."""
    return {alias.lstrip("-").replace("-", "_"): flag.dest for flag in FLAGS.values() for alias in flag.aliases}


# ----------------------------------------------------------------------------- inputs and outputs
def check_model_name(name: Any, flag: str = "--model") -> str:
    """UsageError unless ``name`` is a packaged model name or a directory holding a model (``config.json``)."""
    from ..models import resolve_model_name

    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{flag} {name!r}: give a packaged model name or a local Hugging Face model directory")
    if os.path.isdir(name):
        if not (Path(name) / "config.json").is_file():
            raise UsageError(f"{flag} {name!r} is a directory without config.json, not a Hugging Face model directory")
        return name
    if os.path.exists(name):
        raise UsageError(f"{flag} {name!r} is a file; give a packaged model name or a model directory")
    try:
        resolve_model_name(name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return name


def check_writable(output: str | os.PathLike, flag: str = "--output") -> Path:
    """Fail before any work when directory ``output`` cannot be written: it is a file, a path under a
    file, or it (or, when it does not exist yet, the directory it would be created in) is not writable."""
    import tempfile

    out = Path(output)
    if not str(output).strip():
        raise UsageError(f"{flag} '' is empty; give a directory")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {str(out)!r} exists and is not a directory")
    parent = out.absolute() if out.is_dir() else out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {str(out)!r} cannot be created: {str(parent)!r} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rankwise-check.", dir=parent))
    except OSError as e:
        raise UsageError(f"{flag} {str(out)!r} is not writable: {e.strerror} ({str(parent)!r})") from None
    return out


def check_output_dir(output: str | os.PathLike, overwrite: bool, source: str | os.PathLike | None = None) -> Path:
    """Fail before any work when ``output`` cannot take a new directory: it is a file, a non-empty
    directory (unless ``overwrite``), ``source`` or a directory holding it, or its parent is not writable."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {str(out)!r} exists and is not a directory")
    if source is not None:
        src = Path(source).resolve()
        if out.resolve() == src or out.resolve() in src.parents:
            raise UsageError(f"--output {str(out)!r} holds the input {str(source)!r}; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--output {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    check_writable(out)
    return out
