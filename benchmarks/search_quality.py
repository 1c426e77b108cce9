"""Search quality on a ground-truth space: which architecture each method finds, and how good it really is.

    python -m benchmarks.search_quality --space digits_deep --workers 1   # headline: 2 settings x 13 methods x 10 seeds
    python -m benchmarks.search_quality --quick --out /tmp/sq.json         # smoke run: 1 seed, 1 epoch, a small supernet

Every one-shot method runs through the project's one search entry point, :func:`nni_idarts.search.search` (NNI's
Classification evaluator + NasExperiment), on the same data (search: w on ``train``, a on ``val``), with the same
shared hyperparameters (the setting, :data:`SETTINGS`) and nothing tuned per method:

- ``idarts_K1``, ``idarts_K2``, ``idarts_K5``: IDartsStrategy, implicit hypergradient, K Neumann terms, gamma = the
  weight learning rate (the paper), T = ``inner_steps`` weight steps per architecture step;
- ``idarts_K<k>_auto``: the same with ``gamma='auto'`` (min(lr, c / lambda_max), lambda_max tracked by power
  iteration); ``idarts_K<k>_damp``: gamma = lr and ``damping`` (the series of H + damping I);
- ``first_order`` (same T) and ``unrolled`` (DARTS 2nd order; the strategy's own T for it);
- ``nni_darts``, ``nni_gumbel_darts``: NNI's own ``DARTS`` and ``GumbelDARTS`` (an architecture step every batch);
- ``random``: random search with the same budget. Its cost model: the budget is the mean CPU time of an
  ``idarts_K2`` search in the same setting; each sampled architecture costs the CPU time the ground-truth recipe
  needed to train it once (from the table); it samples without replacement while the budget lasts (at least one
  architecture) and keeps the one with the best validation accuracy of a single training (the table's run with
  seed ``seed % seeds``), i.e. exactly what it would have seen had it trained them itself.

Methods whose options the installed strategy does not have (e.g. ``gamma='auto'`` before it existed) are listed
under ``unavailable`` in the results, never silently replaced.

The found architecture is scored by the ground-truth table (:mod:`benchmarks.groundtruth`): mean test accuracy over
the table's seeds, regret to the table's best (in accuracy, 0.01 = 1 point), percentile (share of the table strictly
better; < 10 = top 10%), the share of parameter-free ops (``none``, ``skip_connect``, pooling) in the exported cell,
and ``edge_tau``: per edge, Kendall's tau between the search's final op probabilities and the op's ground-truth
marginal (the mean test accuracy of all architectures that use that op on that edge), averaged over the edges.
Per method: mean, std, a 95% bootstrap confidence interval of the mean regret, and which pairs of one-shot methods
are separated (mean regrets more than two standard errors of their difference apart).
CPU seconds are counted per search (single-threaded), so they depend little on the machine's load.
Every finished search is appended to ``<out>.runs.jsonl``, keyed by the setting and the code version (a hash of
``nni_idarts`` and the space's modules), so an interrupted run resumes and a code change re-runs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ''):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import DATA_DIR, SPLIT_SEED, command_line, git_commit, machine, quiet, write_json
from benchmarks.groundtruth import SPACE_MODULES, GroundTruth, arch_key, architectures, default_table, make_space

#: The digits space's setting of the earlier benchmark (``data/search_quality.json``): arc lr 100x the paper's.
#: ``cost.py`` times the modes with it.
SHARED: dict[str, Any] = {
    'space': 'digits', 'epochs': 15, 'batch_size': 64, 'learning_rate': 0.025, 'learning_rate_min': 0.001,
    'weight_decay': 3e-4, 'arc_learning_rate': 3e-2, 'inner_steps': 5, 'damping': 1.0, 'channels': 16,
    'num_cells': 2, 'supernet_seeded': True,
}
#: The settings of each space. ``paper`` is the headline: the paper's arc lr (3e-4, Adam as in DARTS), the paper's
#: loop and schedule; ``short`` is the same for a quarter of the epochs. Sized to the CPU this benchmark had (2
#: cores shared by ~6 jobs; RESULTS.md): the supernet is 8 channels wide (the ground truth trains the architectures
#: at 16, as DARTS searches narrower than it evaluates) and the paper setting has 12 epochs (144 weight steps).
#: The weight lr is cosine-annealed to ``learning_rate_min`` where :func:`nni_idarts.search.search` can (else
#: constant: recorded as None).
_DEEP_PAPER: dict[str, Any] = {**SHARED, 'space': 'digits_deep', 'epochs': 12, 'arc_learning_rate': 3e-4,
                               'channels': 8, 'num_cells': 1}
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    'digits': {'legacy': SHARED},
    'digits_deep': {'paper': _DEEP_PAPER, 'short': {**_DEEP_PAPER, 'epochs': 3}},
}
QUICK: dict[str, Any] = {**SHARED, 'epochs': 1, 'channels': 4, 'num_cells': 1}

#: The first nine are the core set (run first when CPU is short: ``--methods``); the last four complete the grid.
ONE_SHOT_METHODS = ('nni_darts', 'nni_gumbel_darts', 'first_order', 'unrolled',
                    'idarts_K1', 'idarts_K2', 'idarts_K5', 'idarts_K2_auto', 'idarts_K2_damp',
                    'idarts_K1_auto', 'idarts_K5_auto', 'idarts_K1_damp', 'idarts_K5_damp')
CORE_METHODS = ONE_SHOT_METHODS[:9]
METHODS = (*ONE_SHOT_METHODS, 'random')
BUDGET_METHOD = 'idarts_K2'   # random search gets the CPU time of this method's search
BOOTSTRAP_RESAMPLES = 10000


def make_strategy(method: str, config: dict[str, Any]):
    """The strategy of a one-shot method, from the shared configuration only."""
    from nni.nas.strategy import DARTS, GumbelDARTS
    from nni_idarts import IDartsStrategy

    arc_lr, inner = config['arc_learning_rate'], config['inner_steps']
    if method.startswith('idarts_K'):
        k, _, variant = method[len('idarts_K'):].partition('_')
        options: dict[str, Any] = {'auto': {'gamma': 'auto'}, 'damp': {'damping': config['damping']}, '': {}}.get(variant)
        if options is None or not k.isdigit():
            raise ValueError(f'Unknown method {method!r}; expected one of {", ".join(ONE_SHOT_METHODS)}.')
        return IDartsStrategy(hypergradient='implicit', K=int(k), inner_steps=inner, arc_learning_rate=arc_lr,
                              **options)
    if method == 'first_order':
        return IDartsStrategy(hypergradient='first_order', inner_steps=inner, arc_learning_rate=arc_lr)
    if method == 'unrolled':   # DARTS 2nd order: the strategy's own T for it
        return IDartsStrategy(hypergradient='unrolled', arc_learning_rate=arc_lr)
    if method == 'nni_darts':
        return DARTS(arc_learning_rate=arc_lr)
    if method == 'nni_gumbel_darts':
        return GumbelDARTS(arc_learning_rate=arc_lr)
    raise ValueError(f'Unknown method {method!r}; expected one of {", ".join(ONE_SHOT_METHODS)}.')


def unavailable_reason(method: str, config: dict[str, Any]) -> str | None:
    """Why the installed strategy cannot run ``method`` (an option it does not have), or None if it can."""
    try:
        make_strategy(method, config)
    except (TypeError, ValueError) as err:
        return str(err).splitlines()[0]
    return None


def effective_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as the installed code runs it: without a cosine schedule in ``search``, the lr is constant."""
    from nni_idarts.search import search
    if 'learning_rate_min' not in inspect.signature(search).parameters:
        return {**config, 'learning_rate_min': None}
    return dict(config)


#: The files of ``nni_idarts`` that decide what a search does.
SEARCH_MODULES = ('hypergradient', 'module', 'strategy', 'search', 'checkpoint')


def code_version(space: str) -> str:
    """A hash of what a search runs: the modules of ``nni_idarts`` a search executes, the space's modules and the
    libraries (not the CLI, config or trial modules, which a benchmark search does not go through)."""
    import nni
    import pytorch_lightning
    import torch
    package = Path(importlib.import_module('nni_idarts').__file__).parent
    parts = [(package / f'{name}.py').read_text() for name in SEARCH_MODULES]
    parts += [inspect.getsource(importlib.import_module(name)) for name in SPACE_MODULES[space]]
    parts += [torch.__version__, nni.__version__, pytorch_lightning.__version__]
    return hashlib.sha1('\0'.join(parts).encode()).hexdigest()[:12]


def run_search(method: str, seed: int, config: dict[str, Any]) -> dict[str, Any]:
    """One search; returns the exported architecture, the final op probabilities and the CPU time."""
    import nni_idarts.search as search_module
    from nni_idarts.data import digits_splits
    import pytorch_lightning as pl
    quiet()
    splits = digits_splits(SPLIT_SEED)
    strategy = make_strategy(method, config)
    extra = {} if config.get('learning_rate_min') is None else {'learning_rate_min': config['learning_rate_min']}
    start, start_cpu = time.perf_counter(), time.process_time()
    if config.get('supernet_seeded'):
        # search() seeds only after the space exists: without this the supernet's initial weights would come from
        # whatever state the previous search left in the generator (the CLI seeds before building, too).
        pl.seed_everything(seed, workers=True, verbose=False)
    result = search_module.search(
        make_space(config['channels'], config['num_cells'], config['space']), splits.train, splits.val, strategy,
        epochs=config['epochs'], batch_size=config['batch_size'], learning_rate=config['learning_rate'],
        weight_decay=config['weight_decay'], seed=seed, **extra,
        trainer_kwargs={'enable_progress_bar': False, 'enable_model_summary': False})
    return {'method': method, 'seed': seed, 'arch': result.arch, 'probs': result.probs,
            'inner_steps': getattr(strategy, 'inner_steps', 1),
            'seconds': time.perf_counter() - start, 'cpu_seconds': time.process_time() - start_cpu}


def random_search(truth: GroundTruth, seed: int, budget_cpu_seconds: float) -> dict[str, Any]:
    """Random search under the cost model of the module docstring."""
    rows = list(truth.rows)
    random.Random(seed).shuffle(rows)
    run = seed % len(rows[0]['seeds'])
    spent, sampled = 0.0, []
    for row in rows:
        if sampled and spent + row['train_cpu_seconds'] > budget_cpu_seconds:
            break
        spent += row['train_cpu_seconds']
        sampled.append(row)
    best = max(sampled, key=lambda r: r['val_acc'][run])
    return {'method': 'random', 'seed': seed, 'arch': best['arch'], 'sampled': len(sampled), 'cpu_seconds': spent}


def parameter_free_share(arch: dict[str, Any]) -> float:
    """Share of the cell's edges whose op has no weights (``none``, ``skip_connect``, pooling)."""
    from search_spaces import PARAMETER_FREE_OPS
    return sum(arch[label] in PARAMETER_FREE_OPS for label in arch) / len(arch)


def edge_tau(truth: GroundTruth, probs: dict[str, dict[str, float]]) -> float | None:
    """Mean over edges of Kendall's tau (tau-b) between the final op probabilities of an edge and the ground-truth
    marginal of each op on that edge (:meth:`GroundTruth.op_marginals`). None without probabilities."""
    from scipy.stats import kendalltau
    marginals = truth.op_marginals()
    taus = []
    for label, by_op in marginals.items():
        ops = sorted(by_op)
        tau = kendalltau([probs[label][op] for op in ops], [by_op[op] for op in ops]).statistic
        if tau == tau:   # NaN when the probabilities are all equal (alphas that never moved): no ranking
            taus.append(float(tau))
    return statistics.fmean(taus) if taus else None


def score(truth: GroundTruth, run: dict[str, Any]) -> dict[str, Any]:
    row = truth.row(run['arch'])
    return {**run, 'key': row['key'], 'test_acc': row['test_acc_mean'], 'regret': truth.regret(run['arch']),
            'percentile': truth.percentile(run['arch']), 'parameter_free_share': parameter_free_share(run['arch']),
            'edge_tau': edge_tau(truth, run['probs']) if 'probs' in run else None}


def bootstrap_ci(values: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap confidence interval of the mean of ``values``."""
    import numpy as np
    data = np.asarray(values, dtype=float)
    means = np.random.default_rng(seed).choice(data, size=(resamples, len(data))).mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: the per-seed lists (``regret`` etc., in seed order) and their statistics."""
    summary = {}
    for method in METHODS:
        mine = sorted((r for r in runs if r['method'] == method), key=lambda r: r['seed'])
        if not mine:
            continue
        row: dict[str, Any] = {'seeds': [r['seed'] for r in mine]}
        for metric in ('regret', 'test_acc', 'percentile', 'parameter_free_share', 'cpu_seconds'):
            row[metric] = [r[metric] for r in mine]
            row[f'{metric}_mean'], row[f'{metric}_std'] = _mean_std(row[metric])
        row['regret_se'] = row['regret_std'] / len(mine) ** 0.5
        row['regret_ci95'] = bootstrap_ci(row['regret'])
        taus = [r['edge_tau'] for r in mine if r.get('edge_tau') is not None]
        row['edge_tau'] = [r.get('edge_tau') for r in mine]
        row['edge_tau_mean'], row['edge_tau_std'] = _mean_std(taus) if taus else (None, None)
        row['top10_share'] = sum(r['percentile'] < 10 for r in mine) / len(mine)
        keys = [r['key'] for r in mine]
        row['distinct_archs'] = len(set(keys))
        row['most_found'] = max(set(keys), key=keys.count)
        row['most_found_count'] = keys.count(row['most_found'])
        if method == 'random':
            row['sampled_mean'] = statistics.fmean(r['sampled'] for r in mine)
        else:
            row['inner_steps'] = mine[0].get('inner_steps')
        summary[method] = row
    return summary


def separated_pairs(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs of one-shot methods whose mean regrets differ by more than two standard errors of the difference
    (only methods with at least 2 seeds: one seed has no standard error)."""
    methods = [m for m in ONE_SHOT_METHODS if m in summary and len(summary[m]['seeds']) >= 2]
    pairs = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            ra, rb = summary[a], summary[b]
            diff = ra['regret_mean'] - rb['regret_mean']
            se = (ra['regret_se'] ** 2 + rb['regret_se'] ** 2) ** 0.5
            if abs(diff) > 2 * se:
                better, worse = (a, b) if diff < 0 else (b, a)
                pairs.append({'better': better, 'worse': worse, 'difference': abs(diff), 'se': se})
    return sorted(pairs, key=lambda p: -p['difference'] / max(p['se'], 1e-12))


def markdown(summary: dict[str, dict[str, Any]]) -> str:
    lines = ['| method | regret (pts): mean ± std [95% CI] | percentile | top 10% | parameter-free share '
             '| edge tau | distinct archs (most found) | CPU s / search |',
             '|---|---|---|---|---|---|---|---|']
    for method, r in summary.items():
        lo, hi = r['regret_ci95']
        name = f'{method} (~{r["sampled_mean"]:.0f} archs)' if 'sampled_mean' in r else method
        tau = '–' if r['edge_tau_mean'] is None else f'{r["edge_tau_mean"]:+.2f} ± {r["edge_tau_std"]:.2f}'
        lines.append(f'| {name} | {100 * r["regret_mean"]:.2f} ± {100 * r["regret_std"]:.2f} '
                     f'[{100 * lo:.2f}, {100 * hi:.2f}] | {r["percentile_mean"]:.1f} | {r["top10_share"]:.0%} '
                     f'| {r["parameter_free_share_mean"]:.2f} | {tau} '
                     f'| {r["distinct_archs"]}/{len(r["seeds"])} ({r["most_found_count"]}x '
                     f'{r["most_found"].replace("|", chr(92) + "|")}) '
                     f'| {r["cpu_seconds_mean"]:.1f} |')
    return '\n'.join(lines)


def _read_runs(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:   # a line cut short by a kill: that search is redone
                continue
    return rows


def _complete_table(path: Path, space: str) -> GroundTruth | None:
    """The ground-truth table at ``path`` if it covers the whole space; else an error line and None."""
    try:   # before any search: a missing or incomplete table would make the searches worthless
        truth = GroundTruth.load(path, space=space)
    except FileNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return None
    num_archs = len(architectures(make_space(space=space)))
    if len(truth) != num_archs:
        print(f'error: {path} has {len(truth)} architectures, the space has {num_archs}; score against a '
              'complete table.', file=sys.stderr)
        return None
    return truth


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='smoke run: 1 seed, 1 epoch, a 4-channel 1-cell supernet')
    parser.add_argument('--space', choices=sorted(SETTINGS), default='digits')
    parser.add_argument('--settings', nargs='+', default=None, help='settings of the space to run (default: all)')
    parser.add_argument('--methods', nargs='+', default=list(ONE_SHOT_METHODS), help='one-shot methods (default all)')
    parser.add_argument('--seeds', type=int, default=10, help='search seeds per method (default 10)')
    parser.add_argument('--table', type=Path, default=None, help='ground-truth table (default: the space\'s)')
    parser.add_argument('--out', type=Path, default=None, help='results file (default: data/search_quality_<space>.json)')
    parser.add_argument('--workers', type=int, default=1, help='search processes (default 1: in this one)')
    parser.add_argument('--search-only', action='store_true',
                        help='run the searches (into <out>.runs.jsonl) without scoring them: the table may not exist yet')
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error('--quick needs --out, so that it never overwrites the committed results')
    if args.seeds < 1 or args.workers < 1:
        parser.error('--seeds and --workers must be >= 1')
    unknown = sorted(set(args.methods) - set(ONE_SHOT_METHODS))
    if unknown:
        parser.error(f'unknown method(s) {unknown}; choose from {", ".join(ONE_SHOT_METHODS)}')
    settings = SETTINGS[args.space]
    names = args.settings or list(settings)
    if set(names) - set(settings):
        parser.error(f'unknown setting(s) {sorted(set(names) - set(settings))}; {args.space} has {", ".join(settings)}')
    if args.quick:
        settings = {name: {**settings[name], 'epochs': 1, 'channels': 4, 'num_cells': 1} for name in names[:1]}
        names = names[:1]
    table_path = args.table or default_table(args.space)
    truth = None if args.search_only else _complete_table(table_path, args.space)
    if truth is None and not args.search_only:
        return 2
    quiet()
    seeds = [0] if args.quick else list(range(args.seeds))
    out = args.out or DATA_DIR / f'search_quality_{args.space}.json'
    runs_path = out.with_suffix('.runs.jsonl')
    version = code_version(args.space)
    configs = {name: effective_config(settings[name]) for name in names}
    fingerprints = {name: json.dumps({**configs[name], 'code': version}, sort_keys=True) for name in names}
    unavailable = {m: reason for m in args.methods
                   if (reason := unavailable_reason(m, configs[names[0]])) is not None}
    for method, reason in unavailable.items():
        print(f'warning: {method} is not run: the installed strategy refuses it ({reason})', file=sys.stderr)
    methods = [m for m in args.methods if m not in unavailable]
    runs = [r for r in _read_runs(runs_path) if r.get('config') in fingerprints.values()]
    done = {(r['config'], r['method'], r['seed']) for r in runs}
    # Seed-major, so that an interrupted run has the same seeds for every method and setting.
    todo = [(name, m, s) for s in seeds for name in names for m in methods if (fingerprints[name], m, s) not in done]
    print(f'{len(methods)} one-shot methods x {len(names)} settings x {len(seeds)} seeds: {len(done)} done, '
          f'{len(todo)} to run (code {version})', flush=True)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with runs_path.open('a') as log:
        def record(name: str, run: dict[str, Any]) -> None:
            run = {**run, 'setting': name, 'config': fingerprints[name]}
            log.write(json.dumps(run) + '\n')
            log.flush()
            runs.append(run)
            print(f'  {name} {run["method"]} seed {run["seed"]}: {arch_key(run["arch"])} '
                  f'({run["cpu_seconds"]:.1f} CPU s, {time.perf_counter() - start:.0f} s elapsed)', flush=True)

        if args.workers == 1:
            for name, m, s in todo:
                record(name, run_search(m, s, configs[name]))
        else:
            with ProcessPoolExecutor(args.workers, mp_context=get_context('spawn')) as pool:
                futures = {pool.submit(run_search, m, s, configs[name]): name for name, m, s in todo}
                for future in as_completed(futures):
                    record(futures[future], future.result())
    if truth is None:
        print(f'searched only; {runs_path} holds the runs. Score them by running without --search-only.')
        return 0
    results: dict[str, Any] = {}
    for name in names:
        mine = [r for r in runs if r['config'] == fingerprints[name] and r['seed'] in seeds and r['method'] in methods]
        budget_runs = [r['cpu_seconds'] for r in mine if r['method'] == BUDGET_METHOD]
        budget = statistics.fmean(budget_runs) if budget_runs else statistics.fmean(r['cpu_seconds'] for r in mine)
        scored = [score(truth, r) for r in mine] + [score(truth, random_search(truth, s, budget)) for s in seeds]
        summary = summarise(scored)
        results[name] = {'config': configs[name], 'random_budget_cpu_seconds': budget,
                         'random_budget_method': BUDGET_METHOD if budget_runs else 'mean of all searches',
                         'methods': summary, 'separated_pairs': separated_pairs(summary), 'runs': scored}
        print(f'\n{args.space} / {name}:\n{markdown(summary)}')
        print(f'separated pairs: {len(results[name]["separated_pairs"])}')
    headline = names[0]
    write_json(out, {'space': args.space, 'num_architectures': len(truth), 'headline_setting': headline,
                     'methods': results[headline]['methods'], 'settings': results,
                     'unavailable': unavailable, 'seeds': seeds, 'code_version': version,
                     'command': command_line(), 'commit': git_commit(),
                     'ground_truth': os.path.relpath(table_path), 'best_test_acc': truth.best_test_acc,
                     'regret_unit': 'accuracy (fraction): 0.01 = 1 point',
                     'machine': machine(), 'wall_seconds_this_run': time.perf_counter() - start})
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
