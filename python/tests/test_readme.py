# SPDX-License-Identifier: Apache-2.0
"""The README's Python example runs as written (the first ```python block of README.md)."""
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no ```python block"
    r = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    # the shapes the example's comments promise
    assert "(2, 128, 8, 64) (2, 8, 128)" in r.stdout
    assert "(2, 1, 8, 64)" in r.stdout
