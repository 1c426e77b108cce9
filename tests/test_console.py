"""A default search's console: no third-party noise (it goes to search.log), one bar per epoch, a summary."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from nni_idarts.console import format_summary, quiet
from test_cli import write_config
from test_plot import assert_picture

ROOT = Path(__file__).resolve().parents[1]


def run_search(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    done = subprocess.run([sys.executable, '-m', 'nni_idarts.cli', 'search', str(config), *extra], env=env,
                          capture_output=True, timeout=300)
    # Decoded by hand: text=True would turn the progress bar's carriage returns into newlines.
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def screen(text: str) -> list[str]:
    """The non-empty lines a terminal would show: carriage returns, line feeds and cursor-up (ESC[A) applied."""
    lines, row, col, i = [''], 0, 0, 0
    while i < len(text):
        escape = re.match(r'\x1b\[(\d*)([A-Za-z])', text[i:])
        if escape:
            if escape[2] == 'A':
                row = max(0, row - int(escape[1] or 1))
            elif escape[2] == 'K':
                lines[row] = lines[row][:col]
            i += len(escape[0])
            continue
        char = text[i]
        if char == '\r':
            col = 0
        elif char == '\n':
            row, col = row + 1, 0
            if row == len(lines):
                lines.append('')
        else:
            lines[row] = lines[row][:col] + char + lines[row][col + 1:]
            col += 1
        i += 1
    return [line.rstrip() for line in lines if line.strip()]


def warning_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search(r'warn|deprecat|tip:|def training_step', line, re.IGNORECASE)]


def test_default_search_console_is_quiet_and_ends_with_a_summary(tmp_path):
    config = write_config(tmp_path, search={'epochs': 3})
    run = tmp_path / 'run'
    done = run_search(config)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = screen(done.stdout) + screen(done.stderr)
    assert len(warning_lines(shown)) <= 3, '\n'.join(warning_lines(shown))
    assert done.stderr.strip() == ''
    # One bar left per epoch, with the epoch's mean metrics.
    bars = [line for line in shown if line.startswith('Epoch ')]
    assert [line.split(':')[0] for line in bars] == ['Epoch 0', 'Epoch 1', 'Epoch 2'], shown
    assert all('100%' in bar and 'val_acc=' in bar and 'train_loss=' in bar for bar in bars)
    assert not any(line.startswith('Training:') for line in shown)
    # The summary: time, metrics, the chosen op per edge with its probability, the files.
    text = '\n'.join(shown)
    assert re.search(r'search finished in \d+ s \(3 epochs\)', text)
    assert re.search(r'val accuracy 0\.\d{4}', text)
    assert re.search(r'edge 0 -> 1: \w+  \(p=0\.\d\d\)', text)
    for name in ('arch.json', 'probs.png', 'search.log', 'tensorboard'):
        assert str(run / name) in text
    # The noise is in the log file: NNI's repeated warning and Lightning's ModelCheckpoint warning with its code.
    log = (run / 'search.log').read_text()
    assert log.count('`training_service` will be ignored') >= 5
    assert 'def training_step' in log
    # NNI's serializer warned about positional arguments until the loaders were built by keyword: fixed at the source.
    assert 'Found positional arguments' not in log
    hidden = int(re.search(r'(\d+) messages from NNI and Lightning are in', text)[1])
    assert hidden >= 10
    assert_picture(run / 'probs.png')


def test_quiet_keeps_our_warnings_and_errors_and_restores_everything(tmp_path, capsys):
    nni_logger = logging.getLogger('nni')
    handlers, level = list(nni_logger.handlers), nni_logger.level
    stdout = logging.StreamHandler(sys.stdout)  # a console handler like NNI's own (which holds the real stdout)
    nni_logger.addHandler(stdout)
    show = warnings.showwarning
    try:
        with pytest.warns(UserWarning, match='ours') as shown:  # pytest's recorder sees what quiet lets through
            with quiet(tmp_path / 'x.log') as log:
                warnings.warn_explicit('theirs', UserWarning, '/site-packages/lib.py', 1)
                warnings.warn_explicit('ours', UserWarning, str(ROOT / 'nni_idarts' / 'search.py'), 1)
                logging.getLogger('nni.nas.experiment').warning('noise')
                logging.getLogger('nni.nas.experiment').error('boom')
                logging.getLogger('pytorch_lightning.trainer').info('GPU available: False')
    finally:
        nni_logger.removeHandler(stdout)
    assert [str(w.message) for w in shown] == ['ours']
    assert capsys.readouterr().out == 'boom\n'  # errors still reach the console
    assert log.hidden == 3
    text = (tmp_path / 'x.log').read_text()
    assert all(word in text for word in ('theirs', 'ours', 'noise', 'boom', 'GPU available'))
    assert nni_logger.handlers == handlers and nni_logger.level == level and warnings.showwarning is show
    assert not stdout.filters

    # verbose (--verbose): everything reaches the console too, and the log file still gets it.
    stdout = logging.StreamHandler(sys.stdout)
    nni_logger.addHandler(stdout)
    try:
        with pytest.warns(UserWarning, match='theirs'):
            with quiet(tmp_path / 'y.log', verbose=True) as log:
                warnings.warn_explicit('theirs', UserWarning, '/site-packages/lib.py', 1)
                logging.getLogger('nni.nas.experiment').warning('noise')
    finally:
        nni_logger.removeHandler(stdout)
    assert log.hidden == 0
    assert 'noise' in capsys.readouterr().out
    assert 'theirs' in (tmp_path / 'y.log').read_text() and 'noise' in (tmp_path / 'y.log').read_text()


def test_format_summary():
    text = format_summary('edge 0 -> 1: conv_3x3  (p=0.66)', seconds=75.4, epochs=10,
                          metrics={'val_acc': 0.96, 'train_acc': 0.99}, files={'architecture': 'runs/x/arch.json'})
    assert text.splitlines() == [
        'search finished in 1 min 15 s (10 epochs)',
        'last epoch (means over its steps): val accuracy 0.9600, train accuracy 0.9900',
        'chosen (probability):',
        '  edge 0 -> 1: conv_3x3  (p=0.66)',
        'written:',
        '  architecture  runs/x/arch.json',
    ]
