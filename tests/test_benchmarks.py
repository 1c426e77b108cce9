"""Smoke tests of the benchmarks: their --quick modes run end to end and produce numbers that make sense.

No timing is asserted here (targets live in benchmarks/RESULTS.md); each test checks a property that a broken
benchmark would violate.
"""

from __future__ import annotations

import json
import math

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
    deep = architectures(make_space(space='digits_deep'))
    assert len(deep) == 625 == len({arch_key(a) for a in deep})
    assert set(deep[0]) == {'edge_0_1', 'edge_1_2', 'edge_2_3', 'edge_0_3'}


def _deep_dead(arch: dict) -> bool:
    """digits_deep: the shortcut is 'none' and the chain 0->1->2->3 is cut somewhere: the cell outputs zeros."""
    return arch['edge_0_3'] == 'none' and 'none' in (arch['edge_0_1'], arch['edge_1_2'], arch['edge_2_3'])


def test_digits_deep_cell_computes_chain_plus_shortcut():
    import torch
    from nni_idarts.retrain import fixed_model
    space = make_space(4, 1, space='digits_deep')
    x = torch.randn(3, 4, 8, 8)
    ops = {'edge_0_1': 'skip_connect', 'edge_1_2': 'avg_pool_3x3', 'edge_2_3': 'skip_connect', 'edge_0_3': 'none'}
    cell = fixed_model(space, ops).cells[0].eval()
    pool = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    assert torch.allclose(cell(x), pool(x))
    cell = fixed_model(space, {**ops, 'edge_0_3': 'skip_connect'}).cells[0].eval()
    assert torch.allclose(cell(x), pool(x) + x)
    dead = fixed_model(space, {**ops, 'edge_1_2': 'none'}).cells[0].eval()
    assert _deep_dead({**ops, 'edge_1_2': 'none'}) and not dead(x).any()


def test_groundtruth_fingerprint_follows_the_code(monkeypatch):
    recipe = groundtruth.RECIPES['digits_deep']
    before = recipe.fingerprint()
    assert before == groundtruth.RECIPES['digits_deep'].fingerprint()   # stable
    # Another definition of the space (here: the digits module alone) is another code version: rows are not reused.
    monkeypatch.setitem(groundtruth.SPACE_MODULES, 'digits_deep', ('search_spaces.digits',))
    assert recipe.fingerprint() != before


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


def test_committed_digits_deep_table_is_complete_and_ranks():
    truth = GroundTruth.load(space='digits_deep')
    assert {r['key'] for r in truth.rows} == {arch_key(a) for a in architectures(make_space(space='digits_deep'))}
    assert all(r['seeds'] == [0, 1] for r in truth.rows)
    dead = [r for r in truth.rows if _deep_dead(r['arch'])]
    live = [r for r in truth.rows if not _deep_dead(r['arch'])]
    assert len(dead) == 61   # shortcut 'none' and a 'none' on the chain: 5^3 - 4^3 chains
    for i in range(2):       # a zero cell output: every dead architecture predicts the same constant per seed
        assert len({round(r['test_acc'][i], 9) for r in dead}) == 1
    assert max(r['test_acc_mean'] for r in dead) < 0.2 < 0.9 < max(r['test_acc_mean'] for r in live)
    # The ranking means something: the seed noise is small next to the spread, and val (what a search sees)
    # predicts test (what is reported).
    means = sorted(r['test_acc_mean'] for r in live)
    spread = means[(3 * len(means)) // 4] - means[len(means) // 4]
    assert sorted(r['test_acc_std'] for r in live)[len(live) // 2] < 0.1 * spread
    from scipy.stats import spearmanr
    assert spearmanr([r['val_acc_mean'] for r in live], [r['test_acc_mean'] for r in live]).statistic > 0.9


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
    assert result['space'] == 'digits' and result['num_architectures'] == 125 and not result['unavailable']
    assert list(result['methods']) == list(search_quality.METHODS)
    setting = result['settings'][result['headline_setting']]
    truth = GroundTruth.load()
    for run in setting['runs']:
        assert run['test_acc'] == truth.row(run['arch'])['test_acc_mean']
        assert run['regret'] == pytest.approx(truth.best_test_acc - run['test_acc'])
        assert run['percentile'] == pytest.approx(truth.percentile(run['arch']))
        assert run['parameter_free_share'] == search_quality.parameter_free_share(run['arch'])
        assert result['methods'][run['method']]['regret'] == [run['regret']]
    random_run = next(r for r in setting['runs'] if r['method'] == 'random')
    assert random_run['sampled'] >= 1
    assert random_run['cpu_seconds'] <= max(setting['random_budget_cpu_seconds'],
                                            max(r['train_cpu_seconds'] for r in truth.rows))
    assert setting['separated_pairs'] == []   # one seed has no standard error: nothing may be called separated


def test_search_quality_metrics():
    truth = GroundTruth.load()
    marginals = truth.op_marginals()
    assert set(marginals) == {'edge_0_1', 'edge_0_2', 'edge_1_2'}
    # A marginal is the mean over the 25 architectures with that op on that edge.
    same = [r['test_acc_mean'] for r in truth.rows if r['arch']['edge_0_1'] == 'conv_3x3']
    assert len(same) == 25 and marginals['edge_0_1']['conv_3x3'] == pytest.approx(sum(same) / 25)
    # Probabilities ordered like the marginals give tau = 1 on every edge, reversed ones -1.
    assert search_quality.edge_tau(truth, marginals) == pytest.approx(1.0)
    reversed_probs = {label: {op: -acc for op, acc in by_op.items()} for label, by_op in marginals.items()}
    assert search_quality.edge_tau(truth, reversed_probs) == pytest.approx(-1.0)
    uniform = {label: {op: 0.2 for op in by_op} for label, by_op in marginals.items()}
    assert search_quality.edge_tau(truth, uniform) is None   # alphas that never moved rank nothing
    assert search_quality.parameter_free_share({'a': 'none', 'b': 'conv_3x3', 'c': 'avg_pool_3x3',
                                                'd': 'skip_connect'}) == 0.75
    lo, hi = search_quality.bootstrap_ci([0.0, 0.0, 0.1, 0.2, 0.0, 0.3])
    assert 0.0 <= lo < sum([0.1, 0.2, 0.3]) / 6 < hi <= 0.3
    # Separated: mean regrets more than two standard errors of the difference apart.
    summary = {'nni_darts': {'seeds': [0, 1, 2, 3], 'regret_mean': 0.05, 'regret_se': 0.01},
               'first_order': {'seeds': [0, 1, 2, 3], 'regret_mean': 0.01, 'regret_se': 0.01},
               'idarts_K2': {'seeds': [0, 1, 2, 3], 'regret_mean': 0.03, 'regret_se': 0.01}}
    pairs = search_quality.separated_pairs(summary)
    assert [(p['better'], p['worse']) for p in pairs] == [('first_order', 'nni_darts')]


def test_random_search_spends_its_budget_and_picks_by_validation():
    truth = GroundTruth.load()
    budget = 10 * statistics_mean([r['train_cpu_seconds'] for r in truth.rows])
    run = search_quality.random_search(truth, seed=1, budget_cpu_seconds=budget)
    assert 5 <= run['sampled'] <= 40 and run['cpu_seconds'] <= budget
    assert search_quality.random_search(truth, 1, 1e9)['arch'] == max(truth.rows, key=lambda r: r['val_acc'][1])['arch']


def statistics_mean(values):
    return sum(values) / len(values)


def test_cost_quick_measures_both_spaces_and_fidelity(tmp_path):
    out = tmp_path / 'cost.json'
    assert cost.main(['--quick', '--out', str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result['cost']['spaces']) == set(cost.COST_SPACES) and not result['cost']['unavailable']
    for space, part in result['cost']['spaces'].items():
        table = part['table']
        assert set(table) == set(cost.QUICK_MODES)
        assert table['nni_darts']['epoch_cpu_s_ratio'] == 1.0
        for row in table.values():
            assert row['arch_step_cpu_ms'] > 0 and row['epoch_cpu_s'] > 0 and row['peak_rss_growth_mb'] >= 0
            assert len(part['samples'][next(iter(table))]) == 1
        # The implicit step does 5 Hessian-vector products and a mixed product more than a first-order one.
        assert table['idarts_K5']['arch_step_cpu_ms'] > table['first_order']['arch_step_cpu_ms'], space
    assert out.with_suffix('.png').stat().st_size > 1000
    fidelity = result['fidelity']
    curve = fidelity['neumann']['1/lambda_max']
    # gamma comes from the dense Hessian's spectrum, and neumann() agrees with the dense series term for term. (No
    # claim that more terms help: on the full-size problem the cosine to exact falls from K = 0 to K = 50.)
    assert curve['gamma'] == pytest.approx(1 / fidelity['hessian_eigenvalues']['max'], rel=1e-12)
    for each in fidelity['neumann'].values():
        assert each['dense_check_max_abs_diff'] < 1e-6
    # With gamma = 1/lambda_max every factor |1 - gamma * lambda| is <= 1 (up to the tiny negative curvature), so
    # the series stays finite over thousands of terms; a wrong Hessian-vector product would blow it up.
    assert all(math.isfinite(c) for c in [*curve['cosine_by_K'], *curve['cosine_at_K'].values()])


def test_search_seed_fixes_the_supernet_weights():
    """The same method and seed twice in one process give the same alphas: the supernet is built after seeding,
    not from whatever generator state the previous search left."""
    config = {**search_quality.QUICK, 'arc_learning_rate': 3e-4}
    first = search_quality.run_search('first_order', 3, config)['probs']
    search_quality.run_search('nni_darts', 5, config)   # moves the generators on
    assert search_quality.run_search('first_order', 3, config)['probs'] == first
