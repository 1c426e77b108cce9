"""Ground truth for the digits cell space: every architecture trained from scratch, 3 seeds, one fixed recipe.

    python -m benchmarks.groundtruth                 # the committed table: 125 archs x 3 seeds (~15 min, 2 workers)
    python -m benchmarks.groundtruth --quick --out /tmp/gt.json   # smoke run: 11 archs, 1 seed, tiny recipe (~15 s)

The architectures are enumerated from the space itself (NNI's ``simplify()`` + grid), so the table follows
:class:`~search_spaces.DigitsCellSpace`. Each architecture is built by NNI's ``freeze`` and trained with
:func:`nni_idarts.retrain.train_and_evaluate` on the search's ``train`` split; its accuracy is measured on
``val`` (what a search may select by) and on ``test`` (held out; what the benchmarks report).

Every finished training is appended to ``<out>.runs.jsonl`` at once, so an interrupted run resumes where it
stopped (rows of another recipe are ignored); the table ``<out>`` is written from those rows at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ''):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import DATA_DIR, SPLIT_SEED, command_line, git_commit, machine, quiet, write_json

DEFAULT_TABLE = DATA_DIR / 'groundtruth.json'


@dataclass(frozen=True)
class Recipe:
    """How every architecture is trained. The space's size is part of the recipe."""
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

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


QUICK_RECIPE = Recipe(epochs=4, channels=8, num_cells=1, seeds=(0,))
#: ``--quick`` trains every this-many-th architecture of the enumeration only.
QUICK_STRIDE = 12


def make_space(channels: int = 16, num_cells: int = 2):
    from search_spaces.digits import DigitsCellSpace
    return DigitsCellSpace(channels=channels, num_cells=num_cells)


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
    model = fixed_model(make_space(recipe.channels, recipe.num_cells), arch)
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
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row['recipe'] == recipe.fingerprint()]


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


def build(out: Path, recipe: Recipe, workers: int = 2, stride: int = 1) -> dict[str, Any]:
    archs = architectures(make_space(recipe.channels, recipe.num_cells))[::stride]
    runs_path = out.with_suffix('.runs.jsonl')
    runs = _read_runs(runs_path, recipe)
    done = {(r['key'], r['seed']) for r in runs}
    todo = [(arch, seed) for seed in recipe.seeds for arch in archs if (arch_key(arch), seed) not in done]
    print(f'{len(archs)} architectures x {len(recipe.seeds)} seeds; {len(done)} trainings already done, '
          f'{len(todo)} to go ({workers} worker processes)', flush=True)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with runs_path.open('a') as log, ProcessPoolExecutor(workers, mp_context=get_context('spawn')) as pool:
        futures = [pool.submit(train_one, arch, seed, recipe) for arch, seed in todo]
        for i, future in enumerate(as_completed(futures), start=1):
            row = future.result()
            log.write(json.dumps(row) + '\n')
            log.flush()
            runs.append(row)
            if i % 25 == 0 or i == len(todo):
                print(f'  {i}/{len(todo)} trained, {time.perf_counter() - start:.0f} s', flush=True)
    table = {
        'command': command_line(), 'commit': git_commit(), 'recipe': asdict(recipe),
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
    def load(cls, path: Path | str = DEFAULT_TABLE) -> 'GroundTruth':
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f'No ground-truth table at {path}; make it with `python -m benchmarks.groundtruth`.')
        return cls(json.loads(path.read_text()))

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, arch: dict[str, Any]) -> dict[str, Any]:
        return self._by_key[arch_key(arch)]

    def regret(self, arch: dict[str, Any]) -> float:
        """Test accuracy lost against the best architecture of the table (0 for the best)."""
        return self.best_test_acc - self.row(arch)['test_acc_mean']

    def percentile(self, arch: dict[str, Any]) -> float:
        """Share of the table, in %, that is strictly better on mean test accuracy (0: the best; < 10: top 10%)."""
        acc = self.row(arch)['test_acc_mean']
        return 100.0 * sum(r['test_acc_mean'] > acc for r in self.rows) / len(self.rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help=f'a smoke run: every {QUICK_STRIDE}th architecture, 1 seed, a small net and 4 epochs')
    parser.add_argument('--out', type=Path, default=None, help=f'table to write (default: {DEFAULT_TABLE})')
    parser.add_argument('--workers', type=int, default=2, help='training processes (default 2)')
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error('--workers must be >= 1')
    recipe = QUICK_RECIPE if args.quick else Recipe()
    out = args.out or DEFAULT_TABLE
    if args.quick and args.out is None:
        parser.error('--quick needs --out, so that it never overwrites the committed table')
    quiet()
    table = build(out, recipe, workers=args.workers, stride=QUICK_STRIDE if args.quick else 1)
    rows = table['architectures']
    print(f'wrote {out}: {len(rows)} architectures; best test acc {rows[0]["test_acc_mean"]:.4f} ({rows[0]["key"]}), '
          f'median {statistics.median(r["test_acc_mean"] for r in rows):.4f}, worst {rows[-1]["test_acc_mean"]:.4f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
