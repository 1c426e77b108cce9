"""The README's Python example runs as written (a doc that drifts from the code is a bug)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_python_example_runs_and_exports_an_architecture(tmp_path):
    readme = (ROOT / 'README.md').read_text()
    code = re.search(r'```python\n(.*?)```', readme, re.DOTALL)[1]
    # The one shortening for the test: 1 epoch instead of the example's 5 (the CosineAnnealedLR call uses the name).
    assert 'epochs = 5\n' in code
    code = code.replace('epochs = 5\n', 'epochs = 1\n')
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1', 'HOME': str(tmp_path)}
    done = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # (NNI logs to stdout too, also after the print, when it stops the experiment at exit.)
    (printed,) = [line for line in done.stdout.splitlines() if line.startswith('{')]
    exported = ast.literal_eval(printed)
    # DigitsMLPSpace's three choices, each given a value.
    assert set(exported) == {'width', 'op', 'skip'}, exported
    # The example uses SGD: the warning about a non-SGD learning rate must not appear.
    assert 'not SGD' not in done.stderr
