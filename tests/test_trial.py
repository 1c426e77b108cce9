"""nni_idarts.trial without nnictl: parameter checking, and one trial against a recording stand-in for NNI."""

from __future__ import annotations

import json

import pytest
import torch

from nni_idarts import trial
from nni_idarts.data import digits_splits
from nni_idarts.retrain import retrain
from nni_idarts.trial import TrialConfig, TrialParameterError, trial_config
from search_spaces.digits import DIGITS_OPS, DigitsCellSpace
from tests.fake_nni_trial import fake_trial


def test_defaults_and_tuner_number_types():
    assert trial_config({}) == trial_config(None) == TrialConfig()
    # quniform/randint-like tuners send integral floats; choice sends the JSON values as they are.
    config = trial_config({'K': 1, 'inner_steps': 4.0, 'arc_learning_rate': 0.01, 'gamma': None,
                           'hypergradient': 'unrolled', 'channels': 12})
    assert (config.K, config.inner_steps, config.channels) == (1, 4, 12)
    assert isinstance(config.inner_steps, int)
    assert config.arc_learning_rate == 0.01 and config.gamma is None and config.hypergradient == 'unrolled'
    assert config.epochs == TrialConfig().epochs  # not given: the default


@pytest.mark.parametrize('parameters, message', [
    ({'lr': 0.1}, "unknown parameter(s) 'lr'; known: hypergradient, K,"),
    ({'K': 'two'}, "parameter 'K' must be a finite number; got 'two'"),
    ({'K': 1.5}, "parameter 'K' must be an integer; got 1.5"),
    ({'K': True}, "parameter 'K' must be a finite number; got True"),
    ({'inner_steps': 0}, "parameter 'inner_steps' must be >= 1; got 0"),
    ({'learning_rate': -0.1}, "parameter 'learning_rate' must be > 0.0; got -0.1"),
    ({'gamma': float('nan')}, "parameter 'gamma' must be a finite number; got nan"),
    ({'arc_learning_rate': None}, "parameter 'arc_learning_rate' must be a finite number; got None"),
    ({'hypergradient': 'second_order'}, "parameter 'hypergradient' must be one of 'implicit', 'unrolled', 'first_order'"),
    ([0.1, 2], 'the trial parameters must be a dict; got list'),
])
def test_bad_parameters_are_refused_with_a_clear_message(parameters, message):
    with pytest.raises(TrialParameterError) as error:
        trial_config(parameters)
    assert message in str(error.value)


def test_main_refuses_bad_parameters_with_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    with fake_trial(monkeypatch, {'K': -1, 'epochs': 1}) as channel:
        assert trial.main(['--output-dir', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "nni_idarts.trial: parameter 'K' must be >= 0; got -1"
    assert channel.sent == [] and not (tmp_path / 'out').exists()


def test_trial_reports_each_search_epoch_and_the_retrained_accuracy_once(monkeypatch, tmp_path):
    parameters = {'epochs': 2, 'retrain_epochs': 2, 'channels': 4, 'K': 1, 'inner_steps': 2,
                  'arc_learning_rate': 0.05}
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
    assert stored['parameters'] == {**vars(TrialConfig()), **parameters}

    config = TrialConfig(**parameters)
    splits = digits_splits(config.seed)
    torch.manual_seed(config.seed + 12345)  # retrain() seeds the fixed model's weights itself: other RNG state is fine
    again = retrain(DigitsCellSpace(channels=config.channels, num_cells=config.num_cells), arch, splits.train,
                    splits.val, epochs=config.retrain_epochs, batch_size=config.batch_size,
                    learning_rate=config.retrain_learning_rate, weight_decay=config.weight_decay, seed=config.seed,
                    trainer_kwargs={'enable_progress_bar': False})
    assert final[0]['value']['default'] == pytest.approx(again.accuracy)
    assert final[0]['value']['num_parameters'] == again.num_parameters
    assert not list(out.glob('.*.tmp'))  # the atomic writes left no temporary files
