"""nni_idarts.trial without nnictl: parameter checking, and one trial against a recording stand-in for NNI."""

from __future__ import annotations

import json
import os
import signal

import pytest
import pytorch_lightning as pl
import torch

from nni_idarts import trial
from nni_idarts.data import digits_splits
from nni_idarts.retrain import retrain
from nni_idarts.trial import TRIAL_CONFIG, TrialParameterError, trial_config
from search_spaces.digits import DIGITS_OPS, DigitsCellSpace
from tests.fake_nni_trial import fake_trial


def test_defaults_and_tuner_number_types():
    assert trial_config({}) == trial_config(None)
    assert trial_config({}).search['epochs'] == TRIAL_CONFIG['search']['epochs']
    assert trial_config({}).strategy['report_final_result'] is False  # the trial reports its own final result
    # quniform/randint-like tuners send integral floats; choice sends the JSON values as they are.
    config = trial_config({'strategy.K': 1, 'strategy.inner_steps': 4.0, 'strategy.arc_learning_rate': 0.01,
                           'strategy.gamma': None, 'strategy.hypergradient': 'unrolled', 'space.channels': 12})
    assert (config.strategy['K'], config.strategy['inner_steps'], config.space['channels']) == (1, 4, 12)
    assert isinstance(config.strategy['inner_steps'], int)
    assert config.strategy['arc_learning_rate'] == 0.01 and config.strategy['gamma'] is None


@pytest.mark.parametrize('parameters, message', [
    ({'lr': 0.1}, "unknown parameter 'lr': parameters are dotted names (known: space.name, space.channels,"),
    ({'K': 1}, "unknown parameter 'K'"),
    ({'strategy.K2': 1}, "unknown key 'strategy.K2'"),
    ({'strategy.K': 'two'}, "'strategy.K' must be int, got str 'two'"),
    ({'strategy.K': 1.5}, "'strategy.K' must be int, got float 1.5"),
    ({'strategy.K': True}, "'strategy.K' must be int, got bool True"),
    ({'strategy.inner_steps': 0}, "'strategy.inner_steps' must be >= 1"),
    ({'search.learning_rate': -0.1}, "'search.learning_rate' must be > 0, got -0.1"),
    ({'strategy.gamma': float('nan')}, "'strategy.gamma' must be a finite number, got nan"),
    ({'strategy.arc_learning_rate': None}, "'strategy.arc_learning_rate' must be float, got null"),
    ({'strategy.hypergradient': 'second_order'}, "'strategy.hypergradient' must be one of implicit, unrolled, first_order"),
    ({'search.batch_size': 2**20}, "'search.batch_size' must be >= 1 and <= 65536"),
    ({'strategy.report_final_result': True}, "'strategy.report_final_result' is set by the trial itself"),
    ({'output_dir': '/tmp'}, "unknown parameter 'output_dir'"),
    ([0.1, 2], 'the parameters must be a mapping of dotted names to values, got list'),
])
def test_bad_parameters_are_refused_with_a_clear_message(parameters, message):
    with pytest.raises(TrialParameterError) as error:
        trial_config(parameters)
    assert message in str(error.value)


def test_main_refuses_bad_parameters_with_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    with fake_trial(monkeypatch, {'strategy.K': -1, 'search.epochs': 1}) as channel:
        assert trial.main(['--output-dir', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "nni_idarts.trial: config error: 'strategy.K' must be >= 0 and <= 10000, got -1"
    assert channel.sent == [] and not (tmp_path / 'out').exists()


def test_trial_reports_each_search_epoch_and_the_retrained_accuracy_once(monkeypatch, tmp_path):
    parameters = {'search.epochs': 2, 'retrain.epochs': 2, 'space.channels': 4, 'strategy.K': 1,
                  'strategy.inner_steps': 2, 'strategy.arc_learning_rate': 0.05}
    out = tmp_path / 'trial'
    with fake_trial(monkeypatch, parameters) as channel:
        assert trial.main(['--output-dir', str(out)]) == 0

    # Intermediate results come from the strategy, one per search epoch, credited to the tuner's parameter set.
    periodical = channel.of_type('PERIODICAL')
    assert [m['sequence'] for m in periodical] == [0, 1]
    assert all(m['parameter_id'] == channel.parameter_id for m in channel.sent)
    assert all(m['value']['default'] == m['value']['val_acc'] for m in periodical)

    # Exactly one final result: the exported architecture, retrained on train and measured on val.
    final = channel.of_type('FINAL')
    assert len(final) == 1
    arch = json.loads((out / 'arch.json').read_text())
    assert set(arch) == {'edge_0_1', 'edge_0_2', 'edge_1_2'} and set(arch.values()) <= set(DIGITS_OPS)
    stored = json.loads((out / 'result.json').read_text())
    assert stored['arch'] == arch and stored['final'] == final[0]['value']
    assert stored['parameters'] == {**trial_config({}).flat(), **parameters}

    config = trial_config(parameters)
    splits = digits_splits(config.data['seed'])
    torch.manual_seed(12345)  # retrain() seeds the fixed model's weights itself: other RNG state is fine
    options = {k: v for k, v in config.retrain.items() if k != 'accelerator'}
    again = retrain(DigitsCellSpace(channels=config.space['channels'], num_cells=config.space['num_cells']), arch,
                    splits.train, splits.val, trainer_kwargs={'enable_progress_bar': False}, **options)
    assert final[0]['value']['default'] == pytest.approx(again.accuracy)
    assert final[0]['value']['num_parameters'] == again.num_parameters
    assert not list(out.glob('.*.tmp'))  # the atomic writes left no temporary files


class SignalAtBatch(pl.Callback):
    """Sends this process a real signal (os.kill) after its ``at``-th training batch."""

    def __init__(self, signum: int, at: int):
        self.signum, self.at, self.seen = signum, at, 0

    def on_train_batch_end(self, trainer, *args):
        self.seen += 1
        if self.seen == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_the_trial_non_zero_without_a_final_result(monkeypatch, tmp_path, capsys, signum, code):
    run_trial = trial.run_trial
    monkeypatch.setattr(trial, 'run_trial', lambda config, out, callbacks: run_trial(
        config, out, callbacks=[SignalAtBatch(signum, 2), *callbacks]))
    with fake_trial(monkeypatch, {'search.epochs': 2, 'space.channels': 4}) as channel:
        assert trial.main(['--output-dir', str(tmp_path / 'out')]) == code
    err = capsys.readouterr().err.strip()
    assert err == f'nni_idarts.trial: stopped by {signal.Signals(signum).name}; no final result was reported'
    assert channel.of_type('FINAL') == [] and not (tmp_path / 'out' / 'arch.json').exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_a_diverged_retraining_is_not_reported(monkeypatch, tmp_path, capsys):
    parameters = {'search.epochs': 1, 'retrain.epochs': 1, 'space.channels': 4, 'retrain.learning_rate': 1e30}
    with fake_trial(monkeypatch, parameters) as channel:
        assert trial.main(['--output-dir', str(tmp_path / 'out')]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('nni_idarts.trial: trial failed: the retraining diverged (loss nan') and '\n' not in err
    assert channel.of_type('FINAL') == [] and not (tmp_path / 'out' / 'result.json').exists()
