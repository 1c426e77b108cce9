"""IDartsStrategy reports to the NNI trial that runs it, by itself; outside a trial it reports nothing."""

from __future__ import annotations

import csv

import nni
import nni.trial
import pytest
from pytorch_lightning.loggers import CSVLogger

from nni_idarts import IDartsStrategy
from nni_idarts.data import digits_splits
from nni_idarts.reporting import TrialReporter
from nni_idarts.search import search
from search_spaces.digits import DigitsCellSpace
from tests.fake_nni_trial import fake_trial


def _search(strategy, epochs, trainer_kwargs=None):
    splits = digits_splits(0)
    return search(DigitsCellSpace(channels=4, num_cells=1), splits.train, splits.val, strategy, epochs=epochs,
                  batch_size=64, learning_rate=0.1, seed=0,
                  trainer_kwargs={'enable_progress_bar': False, **(trainer_kwargs or {})})


def _logged_epoch_means(metrics_csv, name, every=1):
    """Per epoch, the mean of the step values Lightning's CSV logger wrote for ``name`` (independent of the module),
    at the steps ``s`` with ``(s + 1) % every == 0``: Lightning repeats a step metric in the rows of the following
    steps until it is logged again, so a metric of the architecture steps is fresh only after every T-th batch."""
    values = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get(name) and (int(row['step']) + 1) % every == 0:
                values.setdefault(int(row['epoch']), []).append(float(row[name]))
    return {epoch: sum(v) / len(v) for epoch, v in values.items()}


def test_search_in_a_trial_reports_epoch_means_and_one_final_result(monkeypatch, tmp_path):
    strategy = IDartsStrategy(K=1, inner_steps=2, arc_learning_rate=0.05, warmup_epochs=1)
    with fake_trial(monkeypatch, {'K': 1}) as channel:
        record = nni.get_next_parameter()
        assert record == {'K': 1}
        logger = CSVLogger(str(tmp_path), name='log')
        _search(strategy, epochs=3, trainer_kwargs={'logger': logger, 'log_every_n_steps': 1})
        # NasExperiment's engine replaced the trial's parameter record with its own; search() put it back.
        assert nni.trial._params['parameter_id'] == channel.parameter_id

    periodical = channel.of_type('PERIODICAL')
    # Epoch 0 is warm-up (no architecture step, no validation metric): nothing to report. Then one per epoch.
    assert [m['sequence'] for m in periodical] == [0, 1]
    assert all(m['parameter_id'] == channel.parameter_id for m in channel.sent)
    expected = _logged_epoch_means(f'{logger.log_dir}/metrics.csv', 'val_acc', every=strategy.inner_steps)
    assert sorted(expected) == [1, 2]
    for message, epoch in zip(periodical, [1, 2]):
        value = message['value']
        assert value['default'] == value['val_acc'] == pytest.approx(expected[epoch])
        assert value['train_loss'] > 0 and value['hypergradient_norm'] > 0
        assert not any('/' in key for key in value)  # the per-choice probabilities stay in the logger

    final = channel.of_type('FINAL')
    assert len(final) == 1 and final[0]['value'] == periodical[-1]['value']


def test_search_outside_a_trial_reports_nothing(monkeypatch):
    strategy = IDartsStrategy(K=1, inner_steps=2, arc_learning_rate=0.05)
    with fake_trial(monkeypatch, in_trial=False) as channel:
        nni.get_next_parameter()  # even with NNI's trial API initialised, a plain process is no trial
        _search(strategy, epochs=1)
    assert strategy.oneshot_module.nni_trial is None
    assert channel.sent == []


def test_no_reporting_with_parameters_left_behind_by_an_earlier_nas_experiment(monkeypatch):
    with fake_trial(monkeypatch) as channel:
        nni.get_next_parameter()
        assert TrialReporter.capture().record['parameter_id'] == channel.parameter_id
        # What NasExperiment's engine leaves as the current record: its model, under parameter id 0.
        monkeypatch.setattr(nni.trial, '_params', {'parameter_id': 0, 'parameters': DigitsCellSpace(channels=4)})
        with pytest.warns(UserWarning, match='replaced by an earlier NasExperiment'):
            assert TrialReporter.capture() is None
