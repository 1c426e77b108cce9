"""Search quality on the digits ground truth: which architecture each method finds, and how good it really is.

    python -m benchmarks.search_quality            # 7 one-shot methods x 5 seeds + random search (~10 CPU min, 2 workers)
    python -m benchmarks.search_quality --quick --out /tmp/sq.json   # smoke run: 1 seed, 1 epoch, a small supernet

Every one-shot method runs through the project's one search entry point, :func:`nni_idarts.search.search` (NNI's
Classification evaluator + NasExperiment), on the same data (search: w on ``train``, a on ``val``), with the same
shared hyperparameters (``SHARED``) and nothing tuned per method:

- ``idarts_K1``, ``idarts_K2``, ``idarts_K5``: IDartsStrategy, implicit hypergradient, K Neumann terms, gamma = the
  weight learning rate, T = ``inner_steps`` weight steps per architecture step (the paper's defaults);
- ``unrolled``, ``first_order``: IDartsStrategy's other hypergradients, same T;
- ``nni_darts``, ``nni_gumbel_darts``: NNI's own ``DARTS`` and ``GumbelDARTS`` (an architecture step every batch);
- ``random``: random search with the same budget. Its cost model: the budget is the mean CPU time of an
  ``idarts_K2`` search measured in this run; each sampled architecture costs the CPU time the ground-truth recipe
  needed to train it once (from the table); it samples without replacement while the budget lasts (at least one
  architecture) and keeps the one with the best validation accuracy of a single training (the table's run with
  seed ``seed % 3``), i.e. exactly what it would have seen had it trained them itself.

The found architecture is scored by the ground-truth table (:mod:`benchmarks.groundtruth`): mean test accuracy
over 3 trainings, regret to the table's best, and percentile (share of the table strictly better; < 10 = top 10%).
CPU seconds are counted per search process (single-threaded), so they do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
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
from benchmarks.groundtruth import DEFAULT_TABLE, GroundTruth, arch_key, architectures, make_space

DEFAULT_OUT = DATA_DIR / 'search_quality.json'

#: Shared by every method. ``arc_learning_rate`` is larger than the paper's 3e-4 because a search here has only
#: ~12 batches per epoch (the paper: ~390 batches x 50 epochs); it is the same for every method.
SHARED: dict[str, Any] = {
    'epochs': 15, 'batch_size': 64, 'learning_rate': 0.025, 'weight_decay': 3e-4,
    'arc_learning_rate': 3e-2, 'inner_steps': 5, 'channels': 16, 'num_cells': 2,
}
QUICK: dict[str, Any] = {**SHARED, 'epochs': 1, 'channels': 4, 'num_cells': 1}

ONE_SHOT_METHODS = ('idarts_K1', 'idarts_K2', 'idarts_K5', 'unrolled', 'first_order', 'nni_darts', 'nni_gumbel_darts')
METHODS = (*ONE_SHOT_METHODS, 'random')
BUDGET_METHOD = 'idarts_K2'   # random search gets the CPU time of this method's search


def make_strategy(method: str, config: dict[str, Any]):
    """The strategy of a one-shot method, from the shared configuration only."""
    from nni.nas.strategy import DARTS, GumbelDARTS
    from nni_idarts import IDartsStrategy

    arc_lr, inner = config['arc_learning_rate'], config['inner_steps']
    if method.startswith('idarts_K'):
        return IDartsStrategy(hypergradient='implicit', K=int(method[len('idarts_K'):]), inner_steps=inner,
                              arc_learning_rate=arc_lr)
    if method in ('unrolled', 'first_order'):
        return IDartsStrategy(hypergradient=method, inner_steps=inner, arc_learning_rate=arc_lr)
    if method == 'nni_darts':
        return DARTS(arc_learning_rate=arc_lr)
    if method == 'nni_gumbel_darts':
        return GumbelDARTS(arc_learning_rate=arc_lr)
    raise ValueError(f'Unknown method {method!r}; expected one of {", ".join(ONE_SHOT_METHODS)}.')


def run_search(method: str, seed: int, config: dict[str, Any]) -> dict[str, Any]:
    """One search in a fresh process; returns the exported architecture and its cost."""
    import nni_idarts.search as search_module
    from nni_idarts.data import digits_splits
    quiet()
    splits = digits_splits(SPLIT_SEED)
    strategy = make_strategy(method, config)
    start, start_cpu = time.perf_counter(), time.process_time()
    result = search_module.search(
        make_space(config['channels'], config['num_cells']), splits.train, splits.val, strategy,
        epochs=config['epochs'], batch_size=config['batch_size'], learning_rate=config['learning_rate'],
        weight_decay=config['weight_decay'], seed=seed,
        trainer_kwargs={'enable_progress_bar': False, 'enable_model_summary': False})
    return {'method': method, 'seed': seed, 'arch': result.arch, 'probs': result.probs,
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


def score(truth: GroundTruth, run: dict[str, Any]) -> dict[str, Any]:
    row = truth.row(run['arch'])
    return {**run, 'key': row['key'], 'test_acc': row['test_acc_mean'], 'regret': truth.regret(run['arch']),
            'percentile': truth.percentile(run['arch'])}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = []
    for method in METHODS:
        mine = [r for r in runs if r['method'] == method]
        if not mine:
            continue
        row: dict[str, Any] = {'method': method, 'seeds': len(mine)}
        for metric in ('test_acc', 'regret', 'percentile', 'cpu_seconds'):
            row[metric], row[f'{metric}_std'] = _mean_std([r[metric] for r in mine])
        row['top10_share'] = sum(r['percentile'] < 10 for r in mine) / len(mine)
        row['distinct_archs'] = len({r['key'] for r in mine})
        if method == 'random':
            row['sampled'] = statistics.fmean(r['sampled'] for r in mine)
        summary.append(row)
    return summary


def markdown(summary: list[dict[str, Any]]) -> str:
    lines = ['| method | test acc | regret (pts) | percentile | in top 10% | distinct archs | CPU s / search |',
             '|---|---|---|---|---|---|---|']
    for r in summary:
        extra = f' ({r["sampled"]:.1f} archs)' if 'sampled' in r else ''
        lines.append(f'| {r["method"]} | {100 * r["test_acc"]:.2f} ± {100 * r["test_acc_std"]:.2f} '
                     f'| {100 * r["regret"]:.2f} ± {100 * r["regret_std"]:.2f} '
                     f'| {r["percentile"]:.1f} ± {r["percentile_std"]:.1f} | {r["top10_share"]:.0%} '
                     f'| {r["distinct_archs"]}/{r["seeds"]} | {r["cpu_seconds"]:.0f}{extra} |')
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='smoke run: 1 seed, 1 epoch, a 4-channel 1-cell supernet')
    parser.add_argument('--seeds', type=int, default=5, help='search seeds per method (default 5)')
    parser.add_argument('--table', type=Path, default=DEFAULT_TABLE, help='ground-truth table')
    parser.add_argument('--out', type=Path, default=None, help=f'results file (default: {DEFAULT_OUT})')
    parser.add_argument('--workers', type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error('--quick needs --out, so that it never overwrites the committed results')
    if args.seeds < 1 or args.workers < 1:
        parser.error('--seeds and --workers must be >= 1')
    quiet()
    config = QUICK if args.quick else SHARED
    seeds = [0] if args.quick else list(range(args.seeds))
    out = args.out or DEFAULT_OUT
    runs_path = out.with_suffix('.runs.jsonl')
    fingerprint = json.dumps(config, sort_keys=True)
    runs = [r for r in (json.loads(l) for l in runs_path.read_text().splitlines() if l.strip())
            if r['config'] == fingerprint] if runs_path.exists() else []
    done = {(r['method'], r['seed']) for r in runs}
    todo = [(m, s) for s in seeds for m in ONE_SHOT_METHODS if (m, s) not in done]
    print(f'{len(ONE_SHOT_METHODS)} one-shot methods x {len(seeds)} seeds: {len(done)} done, {len(todo)} to run',
          flush=True)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with runs_path.open('a') as log, ProcessPoolExecutor(args.workers, mp_context=get_context('spawn')) as pool:
        futures = [pool.submit(run_search, m, s, config) for m, s in todo]
        for future in as_completed(futures):
            run = {**future.result(), 'config': fingerprint}
            log.write(json.dumps(run) + '\n')
            log.flush()
            runs.append(run)
            print(f'  {run["method"]} seed {run["seed"]}: {arch_key(run["arch"])} '
                  f'({run["cpu_seconds"]:.0f} CPU s, {time.perf_counter() - start:.0f} s elapsed)', flush=True)
    runs = [r for r in runs if r['seed'] in seeds]
    # Scored only now: the searches do not need the table (and are kept in the runs file if it is missing).
    try:
        truth = GroundTruth.load(args.table)
    except FileNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    if len(truth) != len(architectures(make_space())):
        print(f'error: {args.table} has {len(truth)} architectures, the space has '
              f'{len(architectures(make_space()))}; score against a complete table.', file=sys.stderr)
        return 2
    budget = statistics.fmean(r['cpu_seconds'] for r in runs if r['method'] == BUDGET_METHOD)
    scored = [score(truth, r) for r in runs] + [score(truth, random_search(truth, s, budget)) for s in seeds]
    summary = summarise(scored)
    write_json(out, {'command': command_line(), 'commit': git_commit(), 'config': config, 'seeds': seeds,
                     'ground_truth': os.path.relpath(args.table), 'best_test_acc': truth.best_test_acc,
                     'random_budget_cpu_seconds': budget, 'machine': machine(),
                     'wall_seconds_this_run': time.perf_counter() - start, 'summary': summary, 'runs': scored})
    print(markdown(summary))
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
