"""A real NNI experiment: ``nnictl create --config examples/nnictl/config.yml`` runs iDARTS trials to DONE.

NNI's manager listens on every network interface, so the experiment runs in a fresh network namespace that has
only loopback (``unshare -n``, needs root); tests/nnictl_driver.py starts it there, polls the REST API from inside
and stops it. Skipped only where a network namespace cannot be created.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from nni_idarts.trial import TRIAL_CONFIG
from search_spaces.digits import DIGITS_OPS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIALS = 3  # the example's TPE search space, fewer trials than its maxTrialNumber to keep CI short


def _network_namespace_unavailable() -> str | None:
    if shutil.which('unshare') is None:
        return 'unshare (util-linux) is not installed'
    if hasattr(os, 'geteuid') and os.geteuid() != 0:
        return 'creating a network namespace with unshare -n needs root'
    probe = subprocess.run(['unshare', '-n', 'true'], capture_output=True, text=True)
    if probe.returncode != 0:
        return f'unshare -n failed: {probe.stderr.strip()}'
    return None


def _metric_value(entry: dict) -> dict:
    # The REST API returns what the trial reported JSON-encoded as a string, itself JSON-encoded.
    value = json.loads(entry['data'])
    return json.loads(value) if isinstance(value, str) else value


def test_nnictl_experiment_runs_idarts_trials_to_done(tmp_path):
    reason = _network_namespace_unavailable()
    if reason:
        pytest.skip(reason)
    result_file = tmp_path / 'result.json'
    command = ['unshare', '-n', sys.executable, os.path.join(REPO, 'tests', 'nnictl_driver.py'),
               '--workdir', str(tmp_path), '--result', str(result_file), '--max-trials', str(TRIALS),
               '--timeout', '240']
    driver = subprocess.run(command, capture_output=True, text=True, timeout=330)
    assert result_file.exists(), driver.stdout[-3000:] + driver.stderr[-3000:]
    result = json.loads(result_file.read_text())
    report = json.dumps({k: v for k, v in result.items() if k not in ('metrics',)}, indent=1)[-6000:]
    assert driver.returncode == 0, report
    assert result['status'] == 'DONE', report
    assert [t['status'] for t in result['trials']] == ['SUCCEEDED'] * TRIALS, report
    # nnictl stop really stopped the manager.
    assert result['stop_returncode'] == 0 and result['reachable_after_stop'] is False

    epochs = TRIAL_CONFIG['search']['epochs']
    seen_parameters = []
    for trial in result['trials']:
        trial_id = trial['trialJobId']
        parameters = json.loads(trial['hyperParameters'][0])['parameters']
        seen_parameters.append(parameters)
        outputs = result['outputs'][trial_id]

        # The tuner's parameters reached the search.
        stored = outputs['result']
        assert stored is not None, f'no result.json for trial {trial_id}'
        for name, value in parameters.items():
            assert stored['parameters'][name] == pytest.approx(value), name

        # One intermediate result per search epoch, reported by the strategy itself.
        periodical = sorted((m for m in result['metrics'] if m['trialJobId'] == trial_id and m['type'] == 'PERIODICAL'),
                            key=lambda m: m['sequence'])
        assert [m['sequence'] for m in periodical] == list(range(epochs)), trial_id
        for entry in periodical:
            value = _metric_value(entry)
            assert value['default'] == value['val_acc'] and 0.0 <= value['default'] <= 1.0
            assert value['hypergradient_norm'] > 0.0  # the architecture steps ran

        # Exactly one final result: the retrained architecture's validation accuracy that the trial stored.
        final = [m for m in result['metrics'] if m['trialJobId'] == trial_id and m['type'] == 'FINAL']
        assert len(final) == 1, final
        assert _metric_value(final[0])['default'] == pytest.approx(stored['final']['default'])
        assert 0.0 <= stored['final']['default'] <= 1.0

        # The exported architecture, in the trial's output directory.
        arch = outputs['arch']
        assert arch == stored['arch']
        assert set(arch) == {'edge_0_1', 'edge_0_2', 'edge_1_2'} and set(arch.values()) <= set(DIGITS_OPS)

    # TPE proposed different hyperparameters for different trials.
    assert len({json.dumps(p, sort_keys=True) for p in seen_parameters}) == TRIALS
