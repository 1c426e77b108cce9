"""The ``nni-idarts`` command: search -> TensorBoard/checkpoint/arch.json -> show -> retrain, --resume, bad input."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nni_idarts.cli import EXIT_BAD_INPUT, main

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, **sections) -> Path:
    config = {
        'space': {'name': 'digits', 'channels': 4, 'num_cells': 1},
        'data': {'name': 'digits', 'subset': 96},
        'strategy': {'inner_steps': 2, 'K': 1, 'arc_learning_rate': 0.05, 'log_prob_every_n_step': 1},
        'search': {'epochs': 2, 'batch_size': 32, 'learning_rate': 0.05, 'checkpoint_every_n_steps': 4,
                   'log_every_n_steps': 1},
        'retrain': {'epochs': 2, 'batch_size': 32},
        'output_dir': str(tmp_path / 'run'),
    }
    for name, value in sections.items():
        config[name] = {**config[name], **value} if isinstance(value, dict) else value
    path = tmp_path / 'config.yaml'
    path.write_text(yaml.safe_dump(config))
    return path


def event_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in folder.rglob('events.out.tfevents.*'):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()['scalars'])
    return tags


def test_search_show_retrain_and_resume(tmp_path, capsys):
    config = write_config(tmp_path)
    run = tmp_path / 'run'
    assert main(['search', str(config)]) == 0
    doc = json.loads((run / 'arch.json').read_text())
    assert doc['space'] == {'name': 'digits', 'channels': 4, 'num_cells': 1}
    assert set(doc['arch']) == {'edge_0_1', 'edge_0_2', 'edge_1_2'}
    # the alphas moved: some probability is well away from the uniform 1/5
    assert max(abs(p - 0.2) for choices in doc['probs'].values() for p in choices.values()) > 0.01
    assert (run / 'checkpoints' / 'last.ckpt').is_file()
    assert yaml.safe_load((run / 'config.yaml').read_text())['strategy']['hypergradient'] == 'implicit'

    tags = event_tags(run / 'tensorboard')
    expected = {'hypergradient_norm', 'train_loss', 'train_acc', 'val_loss', 'val_acc'}
    expected |= {f'prob/{label}/{op}' for label in doc['arch'] for op in doc['probs'][label]}
    assert expected <= tags, expected - tags

    capsys.readouterr()
    assert main(['show', str(run / 'arch.json')]) == 0
    shown = capsys.readouterr().out
    assert 'space: digits (channels=4, num_cells=1)' in shown
    assert f"edge 0 -> 1: {doc['arch']['edge_0_1']}" in shown

    assert main(['retrain', str(config), '--arch', str(run / 'arch.json')]) == 0
    result = json.loads((run / 'retrain.json').read_text())
    # The accuracy is a count over the 96 test digits (data.subset), the loss a real cross-entropy, and the parameter
    # count that of the exported architecture built from the space (not of the supernet).
    assert result['test_accuracy'] * 96 == pytest.approx(round(result['test_accuracy'] * 96), abs=1e-6)
    assert 0 < result['test_loss'] < float('inf')
    from search_spaces import build_space
    frozen = build_space('digits', in_channels=1, num_classes=10, channels=4, num_cells=1).freeze(doc['arch'])
    assert result['num_parameters'] == sum(p.numel() for p in frozen.parameters())
    assert f"test accuracy: {result['test_accuracy']:.4f}" in capsys.readouterr().out

    # --resume continues from last.ckpt, taken before the end of the run, and ends with the same architecture
    # weights as the uninterrupted run, since the data order and all state are restored.
    import torch
    saved = torch.load(run / 'checkpoints' / 'last.ckpt', weights_only=False)
    batches_done = saved['loops']['fit_loop']['epoch_loop.batch_progress']['current']['processed']
    assert (saved['epoch'], batches_done) < (1, 3), (saved['epoch'], batches_done)  # 2 epochs of 3 batches
    first_events = set((run / 'tensorboard').rglob('events.out.tfevents.*'))
    assert main(['search', str(config), '--resume']) == 0
    resumed = json.loads((run / 'arch.json').read_text())
    assert resumed['probs'] == doc['probs']
    # It resumed rather than restarted: the new event file starts at the checkpoint's batch, not at batch 0.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (new_events,) = set((run / 'tensorboard').rglob('events.out.tfevents.*')) - first_events
    accumulator = EventAccumulator(str(new_events))
    accumulator.Reload()
    assert min(event.step for event in accumulator.Scalars('train_loss')) == 3 * saved['epoch'] + batches_done


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, '-m', 'nni_idarts.cli', *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    config = write_config(tmp_path, search={'epochs': 'ten'})
    done = run_cli('search', str(config), cwd=tmp_path)
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.strip() == "nni-idarts search: config error: 'search.epochs' must be int, got str 'ten'"
    assert 'Traceback' not in done.stdout + done.stderr


def bad_input(capsys, *argv: str) -> str:
    assert main(list(argv)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and 'Traceback' not in err
    return err


def test_config_errors(tmp_path, capsys):
    config = tmp_path / 'broken.yaml'
    config.write_text('search:\n  epochs: [1\n')
    assert 'is not valid YAML (line' in bad_input(capsys, 'search', str(config))
    assert 'cannot read' in bad_input(capsys, 'search', str(tmp_path / 'missing.yaml'))
    assert "unknown key 'strategy.K2'" in bad_input(capsys, 'search', str(write_config(tmp_path, strategy={'K2': 1})))
    assert "unknown key 'space.width'" in bad_input(capsys, 'search', str(write_config(tmp_path, space={'width': 8})))
    # gamma accepts the string 'auto', so another string is refused by IDartsStrategy, still in one line
    assert "gamma must be a number > 0, None (the weight learning rate) or 'auto'" in bad_input(
        capsys, 'search', str(write_config(tmp_path, strategy={'gamma': 'big'})))
    assert "'search.batch_size' must be int, got float 3.5" in bad_input(
        capsys, 'search', str(write_config(tmp_path, search={'batch_size': 3.5})))
    assert "'space.name' must be one of" in bad_input(capsys, 'search', str(write_config(tmp_path, space={'name': 'x'})))
    assert 'hypergradient must be one of' in bad_input(
        capsys, 'search', str(write_config(tmp_path, strategy={'hypergradient': 'magic'})))
    assert '--resume: no checkpoint' in bad_input(capsys, 'search', str(write_config(tmp_path)), '--resume')


def test_missing_cifar_files(tmp_path, capsys):
    (tmp_path / 'cifar' / 'cifar-10-batches-py').mkdir(parents=True)
    config = write_config(tmp_path, data={'name': 'cifar10', 'root': str(tmp_path / 'cifar')})
    err = bad_input(capsys, 'search', str(config))
    assert 'CIFAR-10 files missing in' in err and 'data_batch_1' in err and 'batches.meta' in err


def test_arch_file_errors(tmp_path, capsys):
    config = write_config(tmp_path)
    arch = tmp_path / 'arch.json'
    arch.write_text(json.dumps({'arch': {'edge_0_1': 'conv_3x3', 'edge_0_2': 'conv_3x3'}}))
    assert "misses 'edge_1_2'" in bad_input(capsys, 'retrain', str(config), '--arch', str(arch))
    arch.write_text(json.dumps({'edge_0_1': 'conv_3x3', 'edge_0_2': 'conv_3x3', 'edge_1_2': 'conv_9x9'}))
    assert "'edge_1_2' = 'conv_9x9' is not a choice" in bad_input(capsys, 'retrain', str(config), '--arch', str(arch))
    arch.write_text(json.dumps({'space': {'name': 'darts'}, 'arch': {'normal/op_2_0': 'skip_connect'}}))
    assert "searched in space 'darts'" in bad_input(capsys, 'retrain', str(config), '--arch', str(arch))
    arch.write_text('{not json')
    assert 'is not JSON' in bad_input(capsys, 'show', str(arch))
    assert 'cannot read' in bad_input(capsys, 'show', str(tmp_path / 'nope.json'))
