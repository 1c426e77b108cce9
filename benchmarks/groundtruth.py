"""Ground truth for a digits cell space: every architecture trained from scratch, one fixed recipe, >= 2 seeds.

    python -m benchmarks.groundtruth                 # digits: 125 archs x 3 seeds (~22 CPU min)
    python -m benchmarks.groundtruth --space digits_deep --workers 1   # 625 archs x 2 seeds (~20 CPU min)
    python -m benchmarks.groundtruth --quick --out /tmp/gt.json   # smoke run: 11 archs, 1 seed, tiny recipe (~15 s)

Spaces (``--space``, see :data:`RECIPES`): ``digits`` (:class:`~search_spaces.DigitsCellSpace`, 3 edges, 125
architectures, table ``data/groundtruth.json``) and ``digits_deep`` (:class:`~search_spaces.DigitsDeepCellSpace`,
4 edges with parameter-free ops anywhere, 625 architectures, table ``data/groundtruth_digits_deep.json``).
The architectures are enumerated from the space itself (NNI's ``simplify()`` + grid). Each architecture is built
by NNI's ``freeze`` and trained with :func:`nni_idarts.retrain.train_and_evaluate` on the search's ``train``
split; its accuracy is measured on ``val`` (what a search may select by) and on ``test`` (held out; what the
benchmarks report).

Every finished training is appended to ``<out>.runs.jsonl`` at once, so an interrupted run resumes where it
stopped. Rows are keyed by :meth:`Recipe.fingerprint`: the recipe's values **and the code version** (a hash of
the source of the space's modules and of the functions that build, train and score a model, and the library
versions), so rows trained by other code are ignored rather than mixed in.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ''):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import DATA_DIR, SPLIT_SEED, command_line, git_commit, machine, quiet, write_json

DEFAULT_TABLE = DATA_DIR / 'groundtruth.json'


def default_table(space: str = 'digits') -> Path:
    """Where the committed table of ``space`` lives (``digits`` keeps its historical name)."""
    return DEFAULT_TABLE if space == 'digits' else DATA_DIR / f'groundtruth_{space}.json'


#: The modules (files) that define each space: part of the code version of its rows.
SPACE_MODULES = {'digits': ('search_spaces.digits',),
                 'digits_deep': ('search_spaces.digits_deep', 'search_spaces.digits')}


def code_version(space: str) -> str:
    """A hash of the code a training depends on: the space's modules, the recipe's functions, the libraries."""
    import importlib

    import nni
    import pytorch_lightning
    import torch
    from nni_idarts import retrain
    from nni_idarts.data import digits_splits
    from nni_idarts.search import MomentumSGD
    parts = [inspect.getsource(importlib.import_module(name)) for name in SPACE_MODULES[space]]
    # The functions, not their whole files: other changes to search.py or data.py do not retrain the table.
    parts += [inspect.getsource(obj) for obj in (retrain.fixed_model, retrain.CosineClassificationModule,
                                                 retrain.train_and_evaluate, MomentumSGD, digits_splits,
                                                 train_one, accuracy)]
    parts += [torch.__version__, nni.__version__, pytorch_lightning.__version__]
    return hashlib.sha1('\0'.join(parts).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Recipe:
    """How every architecture is trained. The space and its size are part of the recipe."""
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 0.05
    #: train_and_evaluate's schedule (cosine annealing to 0 over the epochs); part of the fingerprint, so rows
    #: trained with the earlier constant rate are not mixed in.
    lr_schedule: str = 'cosine'
    weight_decay: float = 3e-4
    channels: int = 16
    num_cells: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)
    space: str = 'digits'

    def fingerprint(self) -> str:
        """The recipe's values and the code version: rows of ``<out>.runs.jsonl`` are reused only if both match."""
        return hashlib.sha1(json.dumps({**asdict(self), 'code': code_version(self.space)},
                                       sort_keys=True).encode()).hexdigest()[:12]


#: The committed recipe of each space. ``digits_deep``: 16 channels and 1 cell, so that 625 x 2 trainings take
#: ~20 CPU minutes (~1 CPU s each) while the seed noise stays below the spread (RESULTS.md).
RECIPES = {'digits': Recipe(),
           'digits_deep': Recipe(space='digits_deep', channels=16, num_cells=1, seeds=(0, 1))}
QUICK_RECIPE = Recipe(epochs=4, channels=8, num_cells=1, seeds=(0,))
#: ``--quick`` trains every this-many-th architecture of the enumeration only.
QUICK_STRIDE = 12


def make_space(channels: int = 16, num_cells: int = 2, space: str = 'digits'):
    from search_spaces import SPACES
    return SPACES[space](channels=channels, num_cells=num_cells)


def architectures(model_space) -> list[dict[str, Any]]:
    """Every architecture of ``model_space``, from NNI's own enumeration of its (categorical) mutables."""
    from nni.mutable import MutableDict
    return [dict(sample) for sample in MutableDict(model_space.simplify()).grid()]


def arch_key(arch: dict[str, Any]) -> str:
    """A stable, readable name: the chosen values in label order, e.g. ``conv_3x3|skip_connect|conv_1x1``."""
    return '|'.join(str(arch[label]) for label in sorted(arch))


def accuracy(model, data) -> float:
    """Plain accuracy of a trained model on a dataset, in eval mode (BatchNorm running statistics)."""
    import torch
    from torch.utils.data import DataLoader
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=512):
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct / total


def train_one(arch: dict[str, Any], seed: int, recipe: Recipe) -> dict[str, Any]:
    """Train ``arch`` from scratch with ``recipe`` and ``seed``; one row of ``<out>.runs.jsonl``."""
    import pytorch_lightning as pl
    from nni_idarts.data import digits_splits
    from nni_idarts.retrain import fixed_model, train_and_evaluate
    quiet()  # after the imports: Lightning sets its log level when imported

    splits = digits_splits(SPLIT_SEED)
    start, start_cpu = time.perf_counter(), time.process_time()
    pl.seed_everything(seed, verbose=False)  # the initial weights depend on the seed too, not only the data order
    model = fixed_model(make_space(recipe.channels, recipe.num_cells, recipe.space), arch)
    val = train_and_evaluate(model, splits.train, splits.val, epochs=recipe.epochs, batch_size=recipe.batch_size,
                             learning_rate=recipe.learning_rate, weight_decay=recipe.weight_decay, seed=seed,
                             trainer_kwargs={'enable_progress_bar': False})
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return {'recipe': recipe.fingerprint(), 'key': arch_key(arch), 'arch': arch, 'seed': seed,
            'val_acc': val.accuracy, 'test_acc': accuracy(model, splits.test),
            'num_parameters': val.num_parameters, 'train_seconds': seconds,
            'train_cpu_seconds': cpu_seconds}


def _read_runs(path: Path, recipe: Recipe) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    fingerprint = recipe.fingerprint()
    # A line cut short by a kill is skipped (it is the last one; its training is simply redone).
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [row for row in rows if row.get('recipe') == fingerprint]


def _summarise(runs: list[dict[str, Any]], archs: list[dict[str, Any]], recipe: Recipe) -> list[dict[str, Any]]:
    by_key: dict[str, list[dict[str, Any]]] = {}
    for row in runs:
        by_key.setdefault(row['key'], []).append(row)
    table = []
    for arch in archs:
        rows = sorted(by_key[arch_key(arch)], key=lambda r: r['seed'])
        val = [r['val_acc'] for r in rows]
        test = [r['test_acc'] for r in rows]
        table.append({
            'key': arch_key(arch), 'arch': arch, 'num_parameters': rows[0]['num_parameters'],
            'val_acc_mean': statistics.fmean(val), 'val_acc_std': statistics.pstdev(val),
            'test_acc_mean': statistics.fmean(test), 'test_acc_std': statistics.pstdev(test),
            'seeds': [r['seed'] for r in rows], 'val_acc': val, 'test_acc': test,
            # Wall time depends on the machine's load; CPU time (one thread) is what random search's budget uses.
            'train_seconds': statistics.fmean(r['train_seconds'] for r in rows),
            'train_cpu_seconds': statistics.fmean(r['train_cpu_seconds'] for r in rows),
        })
    table.sort(key=lambda r: -r['test_acc_mean'])
    for rank, row in enumerate(table, start=1):
        row['test_rank'] = rank
    return table


def build(out: Path, recipe: Recipe, workers: int = 2, stride: int = 1,
          shard: tuple[int, int] = (0, 1)) -> dict[str, Any] | None:
    """Train what ``<out>.runs.jsonl`` lacks and write the table ``out``; None if trainings are still missing.

    ``shard=(i, n)``: train only every n-th missing training from the i-th on, so that n independent processes
    (each appending to the same runs file) share the work; the one that finds all rows present writes the table.
    """
    archs = architectures(make_space(recipe.channels, recipe.num_cells, recipe.space))[::stride]
    runs_path = out.with_suffix('.runs.jsonl')
    runs = _read_runs(runs_path, recipe)
    done = {(r['key'], r['seed']) for r in runs}
    todo = [(arch, seed) for seed in recipe.seeds for arch in archs if (arch_key(arch), seed) not in done]
    todo = todo[shard[0]::shard[1]]
    print(f'{len(archs)} architectures x {len(recipe.seeds)} seeds; {len(done)} trainings already done, '
          f'{len(todo)} to go ({workers} worker processes, shard {shard[0]} of {shard[1]})', flush=True)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with runs_path.open('a') as log:
        def record(i: int, row: dict[str, Any]) -> None:
            log.write(json.dumps(row) + '\n')
            log.flush()
            runs.append(row)
            if i % 25 == 0 or i == len(todo):
                print(f'  {i}/{len(todo)} trained, {time.perf_counter() - start:.0f} s', flush=True)

        if workers == 1:   # in this process: no pool start-up, and a kill loses at most the training under way
            for i, (arch, seed) in enumerate(todo, start=1):
                record(i, train_one(arch, seed, recipe))
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context('spawn')) as pool:
                futures = [pool.submit(train_one, arch, seed, recipe) for arch, seed in todo]
                for i, future in enumerate(as_completed(futures), start=1):
                    record(i, future.result())
    runs = _read_runs(runs_path, recipe)   # with the rows other shards appended meanwhile
    missing = {(arch_key(a), s) for s in recipe.seeds for a in archs} - {(r['key'], r['seed']) for r in runs}
    if missing:
        print(f'{len(missing)} trainings are still missing (other shards?): the table is not written.', flush=True)
        return None
    table = {
        'command': command_line(), 'commit': git_commit(), 'recipe': asdict(recipe),
        'recipe_fingerprint': recipe.fingerprint(), 'code_version': code_version(recipe.space),
        'data': f'nni_idarts.data.digits_splits({SPLIT_SEED}): train on train, val_acc on val, test_acc on test',
        'machine': machine(), 'wall_seconds_this_run': time.perf_counter() - start, 'workers': workers,
        'architectures': _summarise(runs, archs, recipe),
    }
    write_json(out, table)
    return table


class GroundTruth:
    """A ground-truth table, looked up by architecture."""

    def __init__(self, table: dict[str, Any]):
        self.table = table
        self.rows = table['architectures']
        self._by_key = {row['key']: row for row in self.rows}
        self.best_test_acc = max(row['test_acc_mean'] for row in self.rows)

    @classmethod
    def load(cls, path: Path | str | None = None, space: str = 'digits') -> 'GroundTruth':
        path = Path(path) if path is not None else default_table(space)
        if not path.exists():
            raise FileNotFoundError(f'No ground-truth table at {path}; make it with '
                                    f'`python -m benchmarks.groundtruth --space {space}`.')
        return cls(json.loads(path.read_text()))

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, arch: dict[str, Any]) -> dict[str, Any]:
        return self._by_key[arch_key(arch)]

    def regret(self, arch: dict[str, Any]) -> float:
        """Test accuracy lost against the best architecture of the table (0 for the best)."""
        return self.best_test_acc - self.row(arch)['test_acc_mean']

    def op_marginals(self) -> dict[str, dict[str, float]]:
        """label -> op -> mean test accuracy of the architectures that use ``op`` on ``label`` (the ground-truth
        value of an op on an edge, averaged over everything else)."""
        sums: dict[str, dict[str, list[float]]] = {}
        for row in self.rows:
            for label, op in row['arch'].items():
                sums.setdefault(label, {}).setdefault(op, []).append(row['test_acc_mean'])
        return {label: {op: statistics.fmean(accs) for op, accs in by_op.items()} for label, by_op in sums.items()}

    def percentile(self, arch: dict[str, Any]) -> float:
        """Share of the table, in %, that is strictly better on mean test accuracy (0: the best; < 10: top 10%)."""
        acc = self.row(arch)['test_acc_mean']
        return 100.0 * sum(r['test_acc_mean'] > acc for r in self.rows) / len(self.rows)


def describe(truth: GroundTruth, top: int = 10) -> str:
    """The table in numbers: best/median/worst, seed noise against the spread, the top architectures, and the
    ground-truth marginal of each op on each edge (what a search's per-edge ranking is compared with)."""
    from search_spaces import PARAMETER_FREE_OPS
    rows = truth.rows
    means = sorted(r['test_acc_mean'] for r in rows)
    q1, q3 = means[len(means) // 4], means[(3 * len(means)) // 4]
    stds = [r['test_acc_std'] for r in rows]
    lines = [f'{len(rows)} architectures x {len(rows[0]["seeds"])} seeds; test accuracy best '
             f'{100 * means[-1]:.2f}%, median {100 * statistics.median(means):.2f}%, worst {100 * means[0]:.2f}%; '
             f'interquartile range {100 * q1:.2f}-{100 * q3:.2f}%; seed std (population, per architecture): median '
             f'{100 * statistics.median(stds):.2f} points, 90th percentile {100 * sorted(stds)[int(0.9 * len(stds))]:.2f};'
             f' mean CPU s per training {statistics.fmean(r["train_cpu_seconds"] for r in rows):.2f}.', '',
             '| rank | architecture | test acc % (mean ± std) | val acc % | parameter-free edges | params |',
             '|---|---|---|---|---|---|']
    for r in rows[:top]:
        free = sum(op in PARAMETER_FREE_OPS for op in r['arch'].values())
        lines.append(f'| {r["test_rank"]} | {r["key"].replace("|", chr(92) + "|")} | {100 * r["test_acc_mean"]:.2f} ± '
                     f'{100 * r["test_acc_std"]:.2f} | {100 * r["val_acc_mean"]:.2f} | {free}/{len(r["arch"])} '
                     f'| {r["num_parameters"]} |')
    marginals = truth.op_marginals()
    ops = sorted({op for by_op in marginals.values() for op in by_op})
    lines += ['', '| edge | ' + ' | '.join(ops) + ' |', '|---|' + '---|' * len(ops)]
    for label in sorted(marginals):
        lines.append(f'| {label} | ' + ' | '.join(f'{100 * marginals[label][op]:.1f}' if op in marginals[label]
                                                  else '–' for op in ops) + ' |')   # '–': a partial table
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help=f'a smoke run: every {QUICK_STRIDE}th architecture, 1 seed, a small net and 4 epochs')
    parser.add_argument('--space', choices=sorted(RECIPES), default='digits', help='the space (default digits)')
    parser.add_argument('--out', type=Path, default=None,
                        help=f'table to write (default: {DEFAULT_TABLE} or data/groundtruth_<space>.json)')
    parser.add_argument('--workers', type=int, default=2, help='training processes (default 2; 1 trains in this one)')
    parser.add_argument('--shard', default='0/1', help='I/N: train every N-th missing training from the I-th '
                        '(N independent processes share one runs file; default 0/1: all)')
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error('--workers must be >= 1')
    try:
        shard = tuple(int(x) for x in args.shard.split('/'))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        parser.error(f'--shard must be I/N with 0 <= I < N, got {args.shard!r}')
    recipe = replace(QUICK_RECIPE, space=args.space) if args.quick else RECIPES[args.space]
    out = args.out or default_table(args.space)
    if args.quick and args.out is None:
        parser.error('--quick needs --out, so that it never overwrites the committed table')
    quiet()
    table = build(out, recipe, workers=args.workers, stride=QUICK_STRIDE if args.quick else 1, shard=shard)
    if table is None:
        return 3
    print(describe(GroundTruth(table)))
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
