"""The README's example of using jaxnet.train_step with one's own model runs as written."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    text = README.read_text()
    section = text[text.index("## Use with your own model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "jaxnet.jit_train_step" in code
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'loss'" in result.stdout
