"""The README's quickstart runs as written (MiniLM-L6 and BBC News from their packages, ~7 s on one CPU
thread): a user's first copy-paste must not fail. In the default run on purpose, although it loads a
real model, because nothing else catches a quickstart that went stale."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_quickstart_runs(tmp_path, monkeypatch):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (quickstart)", "exec"), {"__name__": "readme_quickstart"})
    assert (tmp_path / "out" / "adapter").is_dir()
    assert (tmp_path / "out" / "peft" / "adapter_config.json").is_file()
