"""What the search tells a user about its implicit gradient: the logged diagnostics, the warnings, and the
diagnostics benchmark's quick mode."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from benchmarks import diagnostics
from nni_idarts import IDartsStrategy
from nni_idarts import search as search_module
from nni_idarts.data import digits_splits
from nni_idarts.module import NeumannSeriesWarning
from search_spaces import DigitsMLPSpace

QUIET = {'enable_progress_bar': False, 'enable_model_summary': False}


@pytest.fixture(scope='module')
def splits():
    return digits_splits(seed=0)


def _search(strategy, splits, tmp_path, **kwargs):
    torch.manual_seed(0)
    return search_module.search(DigitsMLPSpace(), splits.train, splits.val, strategy, epochs=1, seed=0,
                                workdir=str(tmp_path), trainer_kwargs=QUIET, **kwargs)


def test_growing_neumann_terms_warn_once_in_words(splits, tmp_path):
    # gamma = 3 is far above 2 / lambda_max on this MLP: the terms (I - gamma H)^k v grow
    strategy = IDartsStrategy(K=4, gamma=3.0, inner_steps=1, arc_learning_rate=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _search(strategy, splits, tmp_path, learning_rate=0.05)
    ours = [w for w in caught if issubclass(w.category, NeumannSeriesWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    message = str(ours[0].message)
    assert 'not converging' in message and 'damping' in message and "gamma='auto'" in message and 'smaller K' in message
    assert strategy.oneshot_module.trainer.callback_metrics['term_growth'] > 1.1


def test_no_warning_when_the_series_converges(splits, tmp_path):
    strategy = IDartsStrategy(K=2, gamma=0.01, inner_steps=2, arc_learning_rate=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _search(strategy, splits, tmp_path, learning_rate=0.05)
    assert not [w for w in caught if issubclass(w.category, NeumannSeriesWarning)]
    metrics = strategy.oneshot_module.trainer.callback_metrics
    assert metrics['term_growth'] < 1 and metrics['gamma'] == pytest.approx(0.01)


class DecoupledAdamW(torch.optim.AdamW):
    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay)


@pytest.mark.parametrize('weight_decay, warned', [(1e-2, True), (0.0, False)])
def test_decoupled_weight_decay_is_warned_about(splits, tmp_path, monkeypatch, weight_decay, warned):
    monkeypatch.setattr(search_module, 'MomentumSGD', DecoupledAdamW)
    strategy = IDartsStrategy(K=1, inner_steps=4, arc_learning_rate=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _search(strategy, splits, tmp_path, learning_rate=0.001, learning_rate_min=None, weight_decay=weight_decay)
    assert isinstance(strategy.oneshot_module.weight_optimizer(), torch.optim.AdamW)
    found = [w for w in caught if 'decoupled weight decay' in str(w.message)]
    assert bool(found) == warned


class PlainAdam(torch.optim.Adam):
    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay)


@pytest.mark.parametrize('optimizer, options, warned', [
    (PlainAdam, {}, True),                                      # gamma = Adam's lr: the evaluator trap
    (PlainAdam, {'gamma': 'auto'}, False),                      # gamma chosen from the curvature instead
    (PlainAdam, {'hypergradient': 'unrolled'}, True),           # w' = w - lr * grad with Adam's lr
    (PlainAdam, {'hypergradient': 'first_order'}, False),       # no lr in the hypergradient
    (None, {}, False),                                          # SGD (search()'s default)
])
def test_a_learning_rate_that_is_no_sgd_step_is_warned_about(splits, tmp_path, monkeypatch, optimizer, options,
                                                              warned):
    if optimizer is not None:
        monkeypatch.setattr(search_module, 'MomentumSGD', optimizer)
    strategy = IDartsStrategy(K=1, inner_steps=4, arc_learning_rate=0.01, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _search(strategy, splits, tmp_path, learning_rate=0.001, learning_rate_min=None)
    found = [w for w in caught if 'not SGD' in str(w.message)]
    assert len(found) == int(warned), [str(w.message) for w in found]


def test_diagnostics_benchmark_quick(tmp_path):
    out = tmp_path / 'diagnostics.json'
    assert diagnostics.main(['--quick', '--out', str(out)]) == 0
    result = json.loads(out.read_text())
    runs = result['diagnostics']
    none, auto = runs['gamma=None'], runs["gamma='auto'"]
    # the third setting's damping is |lambda_min| of the gamma=None search, rounded up
    damping = diagnostics.damping_above(none['summary']['probe_lambda_min']['min'])
    damped = runs[f'damping={damping:g}']
    assert damped['overrides'] == {'damping': damping} and damping >= -none['summary']['probe_lambda_min']['min']
    for step in none['steps']:
        assert step['gamma'] == pytest.approx(step['lr'])                      # the paper's gamma = the current lr
        assert step['gamma_lambda_max'] == pytest.approx(step['gamma'] * step['probe_lambda_max'])
        assert step['probe_lambda_min'] <= step['probe_lambda_max'] <= step['probe_radius'] * (1 + 1e-6)
    for step in auto['steps']:
        assert step['gamma'] == pytest.approx(min(step['lr'], 1 / abs(step['lambda_max'])))
    assert len(none['steps']) == len(auto['steps']) == len(damped['steps']) > 0
    timing = result['overhead']
    assert all(len(r['epoch_cpu_s']) == 1 for runs_ in timing['runs'].values() for r in runs_)
    assert timing['auto_overhead_cpu_s_per_epoch'] == pytest.approx(
        timing['median_epoch_cpu_s']["gamma='auto'"] - timing['median_epoch_cpu_s']['gamma=None'])
