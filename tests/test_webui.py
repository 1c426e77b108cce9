"""``nni-idarts search CONFIG --webui``: the search as one nnictl trial, checked through NNI's REST API.

Runs inside ``unshare -n`` (NNI's manager listens on every interface), like test_nnictl.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nni_idarts.webui import experiment_config, metric_value
from test_cli import write_config
from test_nnictl import _network_namespace_unavailable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 2


def test_experiment_config_runs_one_trial_of_this_search(tmp_path):
    config = experiment_config('examples/configs/digits.yaml', tmp_path / 'run', python='/x/python', resume=True)
    assert config['maxTrialNumber'] == 1 and config['trialConcurrency'] == 1
    assert config['trialCommand'] == (f'/x/python -m nni_idarts.webui {os.path.abspath("examples/configs/digits.yaml")}'
                                      ' --resume')
    assert config['experimentWorkingDirectory'] == str(tmp_path / 'run' / 'webui')
    assert list(config['searchSpace']['config']['_value']) == [os.path.abspath('examples/configs/digits.yaml')]


def test_bad_port_is_refused_before_nni_starts(tmp_path, capsys):
    from nni_idarts.cli import EXIT_BAD_INPUT, main

    config = write_config(tmp_path)
    assert main(['search', str(config), '--webui', '--port', '70000']) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == 'nni-idarts search: --port must be between 1 and 65535; got 70000'
    assert not (tmp_path / 'run').exists()
    assert main(['search', str(config), '--keep']) == EXIT_BAD_INPUT  # --keep without --webui means nothing
    assert capsys.readouterr().err.strip() == 'nni-idarts search: --port and --keep go with --webui'


def test_search_in_the_web_ui(tmp_path):
    reason = _network_namespace_unavailable()
    if reason:
        pytest.skip(reason)
    config = write_config(tmp_path, search={'epochs': EPOCHS}, output_dir='run')  # relative: the trial runs in cwd
    result_file = tmp_path / 'result.json'
    driver = subprocess.run(['unshare', '-n', sys.executable, os.path.join(REPO, 'tests', 'webui_driver.py'),
                             '--config', str(config), '--workdir', str(tmp_path), '--result', str(result_file)],
                            capture_output=True, text=True, timeout=600)
    assert result_file.exists(), driver.stdout[-3000:] + driver.stderr[-3000:]
    result = json.loads(result_file.read_text())
    kept = result['keep']
    report = json.dumps({k: v for k, v in kept.items() if k != 'metrics'}, indent=1)[-5000:]
    assert kept['returncode'] == 0, report
    assert 'listens on all network interfaces' in kept['stderr']
    assert 'NNI web UI: http://localhost:8080' in kept['stdout']
    assert 'nnictl stop' in kept['stdout']  # --keep: how to stop it

    # Through the REST API: one trial, SUCCEEDED; one intermediate result per epoch; one final result.
    assert [t['status'] for t in kept['trials']] == ['SUCCEEDED'], report
    assert kept['status'] == 'DONE'
    [trial] = kept['trials']
    periodical = sorted((m for m in kept['metrics'] if m['type'] == 'PERIODICAL'), key=lambda m: m['sequence'])
    assert [m['sequence'] for m in periodical] == list(range(EPOCHS))
    values = [metric_value(m) for m in periodical]
    assert all(v['default'] == v['val_acc'] and v['hypergradient_norm'] > 0 for v in values)
    final = [metric_value(m) for m in kept['metrics'] if m['type'] == 'FINAL']
    assert final == [values[-1]]  # the search reports its last epoch as the final result
    # The search wrote its files in the config's output_dir, and the trial folder links its TensorBoard logs.
    doc = json.loads((tmp_path / 'run' / 'arch.json').read_text())
    assert set(doc['arch']) == {'edge_0_1', 'edge_0_2', 'edge_1_2'}
    trial_dir = trial['logPath'].removeprefix('file://')
    assert os.path.realpath(os.path.join(trial_dir, 'tensorboard')) == str((tmp_path / 'run' / 'tensorboard').resolve())
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path / 'run' / 'tensorboard'))
    assert kept['stopped'] is True

    # Without --keep the command stops the experiment itself.
    plain = result['plain']
    assert plain['returncode'] == 0, plain
    assert 'trial SUCCEEDED: 2 intermediate results' in plain['stdout'] and 'experiment stopped' in plain['stdout']
    assert plain['reachable_after'] is False
