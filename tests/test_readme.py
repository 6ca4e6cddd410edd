"""The README's first example runs as written (a user's first copy and paste)."""
import re
from pathlib import Path

import fastdl

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md example", "exec"), namespace)
    assert fastdl.patched_modules(namespace["model"]) == ["1", "3"]
    assert namespace["h"].shape == namespace["normed"].shape == (8, 64)
    assert "fastdl.patch: replaced 2 module(s)" in capsys.readouterr().out
