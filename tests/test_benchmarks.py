"""Smoke tests of the benchmarks: their --quick modes run end to end and produce numbers that make sense.

No timing is asserted here (targets live in benchmarks/RESULTS.md); each test checks a property that a broken
benchmark would violate.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import cost, groundtruth, search_quality
from benchmarks.groundtruth import GroundTruth, architectures, arch_key, make_space


def _dead(arch: dict) -> bool:
    """Cell output identically zero: edge 0->2 is 'none' and the path 0->1->2 is cut. The net then predicts a constant."""
    return arch['edge_0_2'] == 'none' and 'none' in (arch['edge_0_1'], arch['edge_1_2'])


def test_architectures_enumerates_the_whole_space():
    archs = architectures(make_space())
    assert len(archs) == 125 == len({arch_key(a) for a in archs})
    assert {a['edge_1_2'] for a in archs} == {'none', 'skip_connect', 'conv_1x1', 'conv_3x3', 'avg_pool_3x3'}


def test_committed_groundtruth_table_is_complete_and_plausible():
    truth = GroundTruth.load()
    recipe = truth.table['recipe']
    assert {r['key'] for r in truth.rows} == {arch_key(a) for a in architectures(make_space())}
    assert all(r['seeds'] == recipe['seeds'] == [0, 1, 2] for r in truth.rows)
    dead = [r for r in truth.rows if _dead(r['arch'])]
    live = [r for r in truth.rows if not _dead(r['arch'])]
    # A constant predictor's accuracy is one class's share of the test set. Which class depends on the seed only
    # (the dead archs' trainable parts, stem and head, start and train alike), so per seed all dead archs agree.
    assert len(dead) == 9
    for i in range(3):
        assert len({round(r['test_acc'][i], 9) for r in dead}) == 1
    assert max(r['test_acc_mean'] for r in dead) < 0.2
    assert max(r['test_acc_mean'] for r in live) > 0.9
    # Accuracies are multiples of 1/359 (test set size), so ties happen (more since the retraining recipe anneals its
    # learning rate and the seeds agree better); the table must still rank: many distinct means, and an
    # architecture's rank on val (what a search sees) predicts its rank on the held-out test images.
    assert len({round(r['test_acc_mean'], 9) for r in live}) > 0.4 * len(live)
    from scipy.stats import spearmanr
    assert spearmanr([r['val_acc_mean'] for r in live], [r['test_acc_mean'] for r in live]).statistic > 0.9
    assert truth.regret(truth.rows[0]['arch']) == 0 and truth.percentile(truth.rows[0]['arch']) == 0


def test_groundtruth_quick_trains_resumes_and_counts_parameters(tmp_path, capsys):
    out = tmp_path / 'gt.json'
    assert groundtruth.main(['--quick', '--out', str(out)]) == 0
    table = json.loads(out.read_text())
    rows = {r['key']: r for r in table['architectures']}
    assert len(rows) == len(architectures(make_space())[::groundtruth.QUICK_STRIDE])
    recipe = groundtruth.QUICK_RECIPE
    # Parameters: a conv_k x k edge adds channels^2 * k^2 weights per cell; the other ops add none.
    base = rows['none|none|none']['num_parameters']
    for r in rows.values():
        extra = sum({'conv_1x1': 1, 'conv_3x3': 9}.get(op, 0) for op in r['arch'].values())
        assert r['num_parameters'] == base + recipe.num_cells * recipe.channels ** 2 * extra
    assert rows['none|none|none']['test_acc_mean'] < 0.2
    assert max(r['test_acc_mean'] for r in rows.values()) > rows['none|none|none']['test_acc_mean'] + 0.1
    # A second run finds every training in the runs file and trains nothing.
    capsys.readouterr()
    assert groundtruth.main(['--quick', '--out', str(out)]) == 0
    assert f'{len(rows)} trainings already done, 0 to go' in capsys.readouterr().out
    assert json.loads(out.read_text())['architectures'] == table['architectures']


def test_search_quality_quick_scores_every_method(tmp_path):
    out = tmp_path / 'sq.json'
    assert search_quality.main(['--quick', '--out', str(out)]) == 0
    result = json.loads(out.read_text())
    assert [s['method'] for s in result['summary']] == list(search_quality.METHODS)
    truth = GroundTruth.load()
    for run in result['runs']:
        assert run['test_acc'] == truth.row(run['arch'])['test_acc_mean']
        assert run['regret'] == pytest.approx(truth.best_test_acc - run['test_acc'])
        assert 0 <= run['percentile'] < 100
    random_run = next(r for r in result['runs'] if r['method'] == 'random')
    assert random_run['sampled'] >= 1
    assert random_run['cpu_seconds'] <= max(result['random_budget_cpu_seconds'],
                                            max(r['train_cpu_seconds'] for r in truth.rows))


def test_random_search_spends_its_budget_and_picks_by_validation():
    truth = GroundTruth.load()
    budget = 10 * statistics_mean([r['train_cpu_seconds'] for r in truth.rows])
    run = search_quality.random_search(truth, seed=1, budget_cpu_seconds=budget)
    assert 5 <= run['sampled'] <= 40 and run['cpu_seconds'] <= budget
    assert search_quality.random_search(truth, 1, 1e9)['arch'] == max(truth.rows, key=lambda r: r['val_acc'][1])['arch']


def statistics_mean(values):
    return sum(values) / len(values)


def test_cost_quick_measures_every_mode_and_fidelity_rises_with_K(tmp_path):
    out = tmp_path / 'cost.json'
    assert cost.main(['--quick', '--out', str(out)]) == 0
    result = json.loads(out.read_text())
    table = result['cost']['table']
    assert set(table) == set(cost.COST_MODES)
    assert table['nni_darts']['epoch_cpu_s_ratio'] == 1.0
    for row in table.values():
        assert row['arch_step_cpu_ms'] > 0 and row['epoch_cpu_s'] > 0 and row['peak_rss_growth_mb'] >= 0
    # The implicit step does K Hessian-vector products more than a first-order one: it cannot be cheaper.
    assert table['idarts_K5']['arch_step_cpu_ms'] > table['first_order']['arch_step_cpu_ms']
    assert out.with_suffix('.png').stat().st_size > 1000
    fidelity = result['fidelity']
    curve = fidelity['neumann']['1/lambda_max']
    # gamma comes from the dense Hessian's spectrum, and neumann() agrees with the dense series term for term. (No
    # claim that more terms help: on the full-size problem the cosine to exact falls from K = 0 to K = 50.)
    assert curve['gamma'] == pytest.approx(1 / fidelity['hessian_eigenvalues']['max'], rel=1e-12)
    assert curve['dense_check_max_abs_diff'] < 1e-6
