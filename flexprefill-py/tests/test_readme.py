"""The README's Python example, as written there, runs and prints what it promises."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {})
    out = printed.getvalue()
    assert out.startswith("(1, 4096, 8, 64) "), out
    assert "density" in out, out
