"""The command under bad input and faults: one line and a non-zero exit before anything is written, a previous
run never destroyed, a user's files never deleted, signals that end non-zero with a resumable checkpoint, a lock
against a second search, unreadable or mismatched checkpoints refused on --resume, no non-finite results."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nni_idarts.cli import EXIT_BAD_INPUT, main
from tests.test_cli import ROOT, bad_input, write_config


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


#: "Billion laughs": a list whose last item expands to 9**9 strings (its repr: gigabytes), in about 300 bytes.
BOMB = '[&a [lol,lol,lol,lol,lol,lol,lol,lol,lol], ' + ', '.join(
    f'&{n} [' + ','.join([f'*{p}'] * 9) + ']' for p, n in zip('abcdefgh', 'bcdefghi')) + ']'


@pytest.mark.parametrize('sections, message', [
    ({'search': {'batch_size': 0}}, "'search.batch_size' must be >= 1 and <= 65536, got 0"),
    ({'search': {'learning_rate': -0.05}}, "'search.learning_rate' must be > 0, got -0.05"),
    ({'search': {'seed': -1}}, "'search.seed' must be >= 0 and <= 4294967295, got -1"),
    ({'search': {'seed': 2**64}}, "'search.seed' must be >= 0 and <= 4294967295, got 18446744073709551616"),
    ({'space': {'channels': 0}}, "'space.channels' must be >= 1 and <= 1024, got 0"),
    ({'search': {'epochs': 0}}, "'search.epochs' must be >= 1 and <= 100000, got 0"),
    ({'search': {'epochs': -1}}, "'search.epochs' must be >= 1 and <= 100000, got -1"),
    ({'retrain': {'epochs': 0}}, "'retrain.epochs' must be >= 1 and <= 100000, got 0"),
    ({'retrain': {'epochs': -1}}, "'retrain.epochs' must be >= 1 and <= 100000, got -1"),
    ({'search': {'checkpoint_every_n_steps': 0}}, "'search.checkpoint_every_n_steps' must be >= 1, got 0"),
    ({'strategy': {'gradient_clip_val': -1}}, "'strategy.gradient_clip_val' must be > 0, got -1.0"),
    ({'strategy': {'warmup_epochs': 2}}, "'strategy.warmup_epochs' (2) must be less than 'search.epochs' (2)"),
    ({'strategy': {'gamma': 0}}, "'strategy.gamma' must be > 0, got 0.0"),
    ({'search': {'accelerator': 'tpu2'}}, "'search.accelerator' must be one of auto, cpu, cuda, gpu, mps, tpu"),
    ({'retrain': {'accelerator': 'cuda'}}, "'retrain.accelerator' is 'cuda', but this machine has no such"),
    ({'search': {'learning_rate': float('nan')}}, "'search.learning_rate' must be a finite number, got nan"),
    ({'output_dir': ''}, "'output_dir' is empty (use '.' for the current folder)"),
    ({'data': {'name': 'image_folder'}}, "dataset 'image_folder' needs data.root"),
])
def test_bad_config_is_one_line_before_anything_is_written(tmp_path, capsys, sections, message):
    config = write_config(tmp_path, **sections)
    for command in (['search', str(config)], ['retrain', str(config), '--arch', str(tmp_path / 'arch.json')]):
        if command[0] == 'retrain':
            (tmp_path / 'arch.json').write_text(json.dumps(
                {'edge_0_1': 'conv_3x3', 'edge_0_2': 'conv_3x3', 'edge_1_2': 'conv_3x3'}))
        err = bad_input(capsys, *command)
        assert message in err, err
        assert err.startswith(f'nni-idarts {command[0]}: ') and len(err) < 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ['arch.json', 'config.yaml']  # no output_dir


@pytest.mark.parametrize('text, message', [
    (b'search:\n  learning_rate: 5e-2\n', "'search.learning_rate' must be float, got str '5e-2' (YAML reads 5e-2 "
                                          'as text: write 5.0e-2)'),
    ('output_dir: r\xe9sultats\n'.encode('latin-1'), 'is not UTF-8 text (byte 0xe9 at offset 13)'),
    (f'search: {{batch_size: {BOMB}}}\n'.encode(), "'search.batch_size' must be int, got list [['lol', 'lol', "),
    (f'{BOMB}: 1\n'.encode(), 'is not valid YAML (line 1, column 1): found unhashable key'),
    (f'search: {{{BOMB}: 1}}\n'.encode(), 'is not valid YAML'),
])
def test_unreadable_yaml_is_one_short_line(tmp_path, capsys, text, message):
    config = tmp_path / 'config.yaml'
    config.write_bytes(text)
    err = bad_input(capsys, 'search', str(config))
    assert message in err and len(err) < 300, err
    assert [p.name for p in tmp_path.iterdir()] == ['config.yaml']


def test_a_previous_search_survives_refused_commands_and_overwrite_removes_only_its_files(tmp_path, capsys):
    config = write_config(tmp_path)
    run = tmp_path / 'run'
    assert main(['search', str(config)]) == 0
    (run / 'notes.txt').write_text('mine')
    (run / '.mine.tmp').write_text('mine too')
    before = files(run)
    last = run / 'checkpoints' / 'last.ckpt'

    def refused(*argv: str, **sections) -> str:
        err = bad_input(capsys, 'search', str(write_config(tmp_path, **sections)), *argv)
        assert files(run) == before, 'a refused command changed the output folder'
        return err

    assert 'holds a previous search (config.yaml, arch.json, probs.png, search.log, checkpoints/, tensorboard/, nni/): continue it with ' \
           '--resume, or pass --overwrite to replace it' in refused()
    assert "'strategy.gamma' must be > 0" in refused('--overwrite', strategy={'gamma': 0})
    assert 'give one of them' in refused('--overwrite', '--resume')
    # --resume refuses a config that would make it another search; the first differing key is named.
    for sections, key, was, now in [
            ({'search': {'batch_size': 16}}, 'search.batch_size', 32, 16),
            ({'data': {'subset': 64}}, 'data.subset', 96, 64),
            ({'data': {'seed': 3}}, 'data.seed', 0, 3),
            ({'data': {'name': 'cifar10', 'root': '/nonexistent'}}, 'data.name', "'digits'", "'cifar10'"),
            ({'space': {'channels': 8}}, 'space.channels', 4, 8),
            ({'search': {'seed': 1}}, 'search.seed', 0, 1)]:
        err = refused('--resume', **sections)
        assert f"was made with '{key}' = {was}, but the config has {now}; restore it" in err, err

    # Unreadable or foreign checkpoints are one line each.
    good = last.read_bytes()
    stripped = torch.load(last, weights_only=True)
    del stripped['nni_idarts_config']

    class Payload:
        def __reduce__(self):
            return (os.system, ('touch ' + str(tmp_path / 'pwned'),))

    for content, message in [(b'', 'is empty'), (good[:len(good) // 2], 'is not a readable torch checkpoint'),
                             (b'not a checkpoint at all', 'is not a readable torch checkpoint'),
                             (pickle.dumps(Payload()), 'is not a readable torch checkpoint'),
                             ({'a': 1}, 'is not a Lightning checkpoint of a search'),
                             (stripped, 'does not record the config it was made with')]:
        if isinstance(content, bytes):
            last.write_bytes(content)
        else:
            torch.save(content, last)
        err = bad_input(capsys, 'search', str(write_config(tmp_path)), '--resume')
        assert err.startswith('nni-idarts search: --resume: ') and message in err, err
    assert not (tmp_path / 'pwned').exists()
    last.write_bytes(good)

    # A second run into a folder that a running one holds is refused (the lock is held here by this process).
    fd = os.open(run / '.nni-idarts.lock', os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert 'is in use by another nni-idarts run' in refused('--resume')
        assert 'is in use by another nni-idarts run' in bad_input(
            capsys, 'retrain', str(config), '--arch', str(run / 'arch.json'))
    finally:
        os.close(fd)
    assert files(run) == before

    # A retraining, then a new search with --overwrite: only what the tool wrote goes, stale retrain.json included;
    # temporary files of killed atomic writes are cleaned up, a user's own files stay.
    assert main(['retrain', str(config), '--arch', str(run / 'arch.json')]) == 0
    (run / '.arch.json.k1ll3d.tmp').write_text('torn')
    (run / 'checkpoints' / '.last.ckpt.k1ll3d.tmp').write_bytes(b'torn')
    assert main(['search', str(write_config(tmp_path, search={'seed': 1})), '--overwrite']) == 0
    after = files(run)
    assert after['notes.txt'] == b'mine' and after['.mine.tmp'] == b'mine too'
    assert 'retrain.json' not in after and not [n for n in after if 'k1ll3d' in n]
    assert after['arch.json'] != before['arch.json']
    assert yaml.safe_load(after['config.yaml'])['search']['seed'] == 1


def test_a_users_own_files_under_output_dir_dot_are_never_deleted(tmp_path, capsys, monkeypatch):
    work = tmp_path / 'work'
    (work / 'checkpoints').mkdir(parents=True)
    (work / 'checkpoints' / 'mine.ckpt').write_bytes(b'precious')
    monkeypatch.chdir(work)
    config = write_config(tmp_path, output_dir='.')
    for extra in ([], ['--overwrite']):
        err = bad_input(capsys, 'search', str(config), *extra)
        assert "already holds checkpoints/, which nni-idarts did not write" in err, err
    (work / 'checkpoints' / 'mine.ckpt').unlink()
    (work / 'config.yaml').write_text('# my own notes\n')  # the name the tool writes its config to
    assert "already holds config.yaml, which nni-idarts did not write" in bad_input(
        capsys, 'search', str(config), '--overwrite')
    assert files(work) == {'config.yaml': b'# my own notes\n'}


def test_a_diverged_retraining_writes_no_result(tmp_path, capsys):
    config = write_config(tmp_path, retrain={'epochs': 1, 'learning_rate': 1e30})
    arch = tmp_path / 'arch.json'
    arch.write_text(json.dumps({'edge_0_1': 'conv_3x3', 'edge_0_2': 'conv_3x3', 'edge_1_2': 'conv_3x3'}))
    assert main(['retrain', str(config), '--arch', str(arch)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('nni-idarts retrain: retrain failed: the retraining diverged (loss nan') and '\n' not in err
    assert not (tmp_path / 'run' / 'retrain.json').exists()


def start_search(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    return subprocess.Popen([sys.executable, '-m', 'nni_idarts.cli', 'search', str(config), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_after_first_checkpoint(process: subprocess.Popen, last: Path, signum: int) -> tuple[int, str]:
    deadline = time.time() + 120
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # into the next steps, so that the checkpoint is stale
    assert process.poll() is None, 'the search ended before it could be stopped'
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_search_exits_non_zero_and_resumes_to_the_same_architecture(tmp_path, capsys, signum):
    sections = {'search': {'epochs': 12, 'checkpoint_every_n_steps': 5}}
    config = write_config(tmp_path, **sections)
    run = tmp_path / 'run'
    last = run / 'checkpoints' / 'last.ckpt'
    process_code, err = signal_after_first_checkpoint(start_search(config), last, signum)
    assert not (run / 'arch.json').exists()
    if signum != signal.SIGKILL:
        name = signal.Signals(signum).name
        code = 128 + signum
        lines = err.strip().splitlines()
        assert lines[-1] == f'nni-idarts search: stopped by {name}; the search can continue with --resume ' \
                            f'(checkpoint {last})', err[-2000:]
        assert 'Traceback' not in err
    else:
        code = -signal.SIGKILL
    assert last.is_file()
    assert torch.load(last, weights_only=True)['nni_idarts_config']['search']['epochs'] == 12
    # A killed run leaves no stuck lock: --resume runs, and ends where an uninterrupted search does.
    assert main(['search', str(config), '--resume']) == 0
    resumed = json.loads((run / 'arch.json').read_text())
    if signum == signal.SIGTERM:
        sections['output_dir'] = str(tmp_path / 'whole')
        assert main(['search', str(write_config(tmp_path, **sections))]) == 0
        assert json.loads((tmp_path / 'whole' / 'arch.json').read_text())['probs'] == resumed['probs']
    assert process_code == code


def test_ctrl_c_stops_at_a_batch_end_with_a_fresh_checkpoint(tmp_path, capsys, monkeypatch):
    """SIGINT (a real one, sent to this process after batch 5) in-process: exit 130, one line, a checkpoint of the
    batch it stopped after although the periodic one was older, no arch.json, signal handlers restored."""
    import pytorch_lightning as pl

    from nni_idarts import checkpoint

    class RecordConfigAndInterrupt(checkpoint.RecordConfig):
        def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
            if trainer.fit_loop.total_batch_idx == 4:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(checkpoint, 'RecordConfig', RecordConfigAndInterrupt)
    config = write_config(tmp_path, search={'epochs': 4, 'checkpoint_every_n_steps': 100})
    last = tmp_path / 'run' / 'checkpoints' / 'last.ckpt'
    capsys.readouterr()
    assert main(['search', str(config)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f'nni-idarts search: stopped by SIGINT; the search can continue with --resume (checkpoint {last})'
    saved = torch.load(last, weights_only=True)
    assert saved['loops']['fit_loop']['epoch_loop.batch_progress']['total']['processed'] == 5
    assert not (tmp_path / 'run' / 'arch.json').exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_json_results_refuse_nan_and_leave_no_file(tmp_path):
    from nni_idarts.checkpoint import atomic_write_json

    with pytest.raises(ValueError, match='Out of range float values are not JSON compliant'):
        atomic_write_json(tmp_path / 'retrain.json', {'test_loss': float('nan')})
    assert list(tmp_path.iterdir()) == []


def test_lightnings_own_sigterm_exit_is_never_a_success(tmp_path, capsys, monkeypatch):
    """Lightning raises SIGTERMException (a SystemExit without a code: exit status 0) when SIGTERM lands after this
    package's batch-end check; the command still exits 143 with its line."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from nni_idarts import checkpoint

    class RecordConfigAndLightningSigterm(checkpoint.RecordConfig):
        def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
            if trainer.fit_loop.total_batch_idx == 1:
                raise SIGTERMException()

    monkeypatch.setattr(checkpoint, 'RecordConfig', RecordConfigAndLightningSigterm)
    config = write_config(tmp_path)
    capsys.readouterr()
    assert main(['search', str(config)]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith('nni-idarts search: stopped by SIGTERM')
    assert not (tmp_path / 'run' / 'arch.json').exists()
