"""What every benchmark script shares: quiet CPU-only runs, the space and the data, and result files."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / 'data'
#: The one data split of every benchmark: search trains w on ``train`` and a on ``val``; ``test`` is held out.
SPLIT_SEED = 0


def quiet(threads: int = 1) -> None:
    """One intra-op thread (the machine is small and shared) and no Lightning/NNI chatter on stdout."""
    os.environ.setdefault('OMP_NUM_THREADS', str(threads))
    import torch
    torch.set_num_threads(threads)
    warnings.filterwarnings('ignore')
    for name in ('pytorch_lightning', 'lightning', 'lightning.pytorch', 'nni'):
        logging.getLogger(name).setLevel(logging.ERROR)


def command_line() -> str:
    """The command as one would type it: ``python -m benchmarks.<script> <args>`` (argv[0] is the file's path)."""
    script = Path(sys.argv[0])
    head = f'python -m benchmarks.{script.stem}' if script.parent.name == 'benchmarks' else f'python {script}'
    return ' '.join([head, *sys.argv[1:]])


def machine() -> dict[str, Any]:
    """Where the numbers were measured, including the load other processes put on the machine."""
    import torch
    cpu = platform.processor()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return {'cpu': cpu, 'cores': os.cpu_count(), 'python': platform.python_version(), 'torch': torch.__version__,
            'load_average': os.getloadavg(), 'torch_threads': torch.get_num_threads()}


def git_commit() -> str:
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def write_json(path: Path, payload: Any) -> None:
    """Write atomically, so an interrupted run never leaves a half-written result file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + '\n')
    tmp.replace(path)
