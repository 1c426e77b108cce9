"""Is the implicit gradient doing anything, and does its Neumann series converge, along a real search?

    python -m benchmarks.diagnostics                                   # ~15 min on 2 cores
    python -m benchmarks.diagnostics --quick --out /tmp/diag.json      # smoke run (~1 min)

Diagnostics. One search of ``examples/configs/digits.yaml`` (digits cell space, its strategy and search settings,
through :func:`nni_idarts.search.search`, cosine-annealed weight lr) for each of three settings: ``gamma=None``
(the paper's gamma = the current lr), ``gamma='auto'`` and ``gamma=None`` with ``damping`` (``--damping``, or by
default the largest |lambda_min| of the gamma=None run rounded up: :func:`damping_above`). At every architecture
step it keeps what the module logs (gamma, the correction-to-gradient ratio, the cosine of the hypergradient to the
first-order gradient, the growth |term_K| / |term_0| of the Neumann terms) and, with a probe of its own,
the spectral radius rho, lambda_max and lambda_min of H = the Hessian of that step's L_train (its training batch
plus the L2 term, at the weights after the step) by three warm-started power iterations (on H, H + rho I and
H - rho I; ``PROBE_ITERS`` Hessian-vector products each per step after ``PROBE_START_ITERS``), so gamma * lambda_max
is known for every setting. The probe restores the BatchNorm buffers it touches, so the search is the one
the user would run. Summaries are min / median / max over the steps, and per epoch.

Overhead of 'auto'. The same search with ``gamma=None`` and with ``gamma='auto'``, without the probe, each in a
fresh single-threaded process, interleaved A/B/A/B..., CPU seconds per epoch of the process (which other processes'
load does not inflate; the load average is recorded before and after every run).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ''):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import DATA_DIR, command_line, git_commit, machine, quiet, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / 'examples' / 'configs' / 'digits.yaml'
DEFAULT_OUT = DATA_DIR / 'diagnostics.json'
PROBE_START_ITERS = 20
PROBE_ITERS = 3


def damping_above(lambda_min: float) -> float:
    """The damping of the third setting when none is given: |lambda_min| (the most negative eigenvalue seen along the
    gamma=None search) rounded up to one significant digit, so that H + damping I is positive semi-definite there."""
    magnitude = abs(lambda_min)
    if magnitude == 0:
        return 0.0
    unit = 10 ** math.floor(math.log10(magnitude))
    return math.ceil(magnitude / unit) * unit


def load_setup(quick: bool) -> dict[str, Any]:
    """The digits example's space, strategy and search settings (read from the YAML, defaults where it has none)."""
    import yaml
    config = yaml.safe_load(CONFIG.read_text())
    setup = {'space': {k: v for k, v in config['space'].items() if k != 'name'},
             'data_seed': config['data'].get('seed', 0),
             'strategy': dict(config['strategy']),
             'search': {k: config['search'][k] for k in ('epochs', 'batch_size', 'learning_rate', 'seed')
                        if k in config['search']}}
    for key in ('learning_rate_min', 'weight_decay'):
        if key in config['search']:
            setup['search'][key] = config['search'][key]
    if quick:
        setup['space'] = {'channels': 4, 'num_cells': 1}
        setup['search']['epochs'] = 2
    return setup


class Probe:
    """A Lightning callback: after each architecture step, the module's diagnostics and the probe's lambda_max."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # a pl.Callback made lazily (imports after quiet())
        import pytorch_lightning as pl
        import torch

        from nni_idarts import hypergradient

        class _Probe(pl.Callback):
            def __init__(self) -> None:
                self.steps: list[dict[str, Any]] = []
                self.vectors: dict[str, Any] = {}

            def _power(self, name: str, loss: Any, weights: Any, seed: int) -> float:
                """Warm-started power iteration ``name`` (its own vector): PROBE_START_ITERS, then PROBE_ITERS."""
                vector = self.vectors.get(name)
                if vector is None:
                    vector, iters = hypergradient.random_vector(weights, seed=seed), PROBE_START_ITERS
                else:
                    iters = PROBE_ITERS
                estimate, self.vectors[name] = hypergradient.power_iteration(loss, weights, vector, iters=iters)
                return estimate

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
                if module.last_val_batch is None:
                    return
                buffers = [(b, b.detach().clone()) for b in module.training_module.buffers()]
                weights = module.weight_parameters()
                train_loss, _ = module.loss_closures(batch['train'], None)

                def shifted(shift: float) -> Any:  # L_train + shift/2 |w|^2 has the Hessian H + shift * I
                    return lambda: train_loss() + 0.5 * shift * sum((w * w).sum() for w in weights)

                # max |lambda| first; then on H + rho I (eigenvalues in [0, 2 rho]) the dominant one is
                # lambda_max + rho, and on H - rho I (in [-2 rho, 0]) it is lambda_min - rho.
                rho = abs(self._power('radius', train_loss, weights, seed=1))
                lambda_max = self._power('max', shifted(rho), weights, seed=2) - rho
                lambda_min = self._power('min', shifted(-rho), weights, seed=3) + rho
                with torch.no_grad():
                    for buffer, saved in buffers:
                        buffer.copy_(saved)
                record = {'epoch': trainer.current_epoch, 'lr': module.current_weight_lr(), **module.last_diagnostics,
                          'probe_radius': rho, 'probe_lambda_max': lambda_max, 'probe_lambda_min': lambda_min}
                record['gamma_lambda_max'] = record['gamma'] * lambda_max
                record['gamma_lambda_min'] = record['gamma'] * lambda_min
                self.steps.append(record)

        return _Probe()


def run_search(overrides: dict[str, Any], setup: dict[str, Any], callbacks: list[Any]) -> Any:
    import pytorch_lightning as pl

    from nni_idarts import IDartsStrategy
    from nni_idarts.data import digits_splits
    from nni_idarts.search import search
    from search_spaces import build_space

    splits = digits_splits(setup['data_seed'])
    seed = setup['search'].get('seed', 0)
    pl.seed_everything(seed, verbose=False)  # the supernet's initial weights, as the command line does
    space = build_space('digits', in_channels=1, num_classes=10, **setup['space'])
    strategy = IDartsStrategy(**{**setup['strategy'], **overrides})
    trainer = {'enable_progress_bar': False, 'enable_model_summary': False, 'callbacks': callbacks}
    return search(space, splits.train, splits.val, strategy, trainer_kwargs=trainer, **setup['search'])


def summary(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {'min': min(values), 'median': statistics.median(values), 'max': max(values), 'n': len(values)}


KEYS = ('gamma', 'lambda_max', 'probe_radius', 'probe_lambda_max', 'probe_lambda_min', 'gamma_lambda_max',
        'gamma_lambda_min', 'correction_ratio', 'cosine_to_first_order', 'term_growth')


def measure_diagnostics(setup: dict[str, Any], damping: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    todo: list[tuple[str, dict[str, Any]]] = [('gamma=None', {}), ("gamma='auto'", {'gamma': 'auto'})]
    while todo:
        name, overrides = todo.pop(0)
        probe = Probe()
        start = time.perf_counter()
        result = run_search(overrides, setup, [probe])
        steps = probe.steps
        by_epoch = {}
        for epoch in sorted({s['epoch'] for s in steps}):
            rows = [s for s in steps if s['epoch'] == epoch]
            by_epoch[epoch] = {key: summary([r.get(key) for r in rows]) for key in
                               ('gamma_lambda_max', 'probe_lambda_min', 'correction_ratio', 'cosine_to_first_order',
                                'term_growth')}
            by_epoch[epoch]['lr'] = rows[0]['lr']
        out[name] = {'overrides': overrides, 'arch': result.arch,
                     'summary': {key: summary([s.get(key) for s in steps]) for key in KEYS},
                     'by_epoch': by_epoch, 'steps': steps,
                     'wall_s': time.perf_counter() - start}
        print(f'{name}: ' + ', '.join(f'{k} {v["min"]:.3g}/{v["median"]:.3g}/{v["max"]:.3g}'
                                       for k, v in out[name]['summary'].items() if v), flush=True)
        if name == 'gamma=None':
            chosen = damping if damping is not None else damping_above(out[name]['summary']['probe_lambda_min']['min'])
            todo.append((f'damping={chosen:g}', {'damping': chosen}))
    return out


def time_child(overrides: dict[str, Any], setup: dict[str, Any]) -> dict[str, Any]:
    """One search in this (fresh) process: CPU seconds per epoch."""
    import os

    import pytorch_lightning as pl

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.epochs: list[float] = []

        def on_train_epoch_start(self, *args: Any) -> None:
            self.start = time.process_time()

        def on_train_epoch_end(self, *args: Any) -> None:
            self.epochs.append(time.process_time() - self.start)

    timer = EpochTimer()
    load_before = os.getloadavg()
    run_search(overrides, setup, [timer])
    return {'epoch_cpu_s': timer.epochs, 'load_before': load_before, 'load_after': os.getloadavg()}


def measure_overhead(setup: dict[str, Any], rounds: int, quick: bool) -> dict[str, Any]:
    import os
    modes = {'gamma=None': {}, "gamma='auto'": {'gamma': 'auto'}}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    for round_ in range(rounds):
        order = list(modes) if round_ % 2 == 0 else list(reversed(modes))
        for mode in order:
            args = [sys.executable, '-m', 'benchmarks.diagnostics', '--child', json.dumps(modes[mode])]
            if quick:
                args.append('--quick')
            done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f'timing round {round_} {mode}: {sum(runs[mode][-1]["epoch_cpu_s"]):.1f} CPU s', flush=True)
    per_epoch = {m: [statistics.mean(r['epoch_cpu_s']) for r in rs] for m, rs in runs.items()}
    base, auto = statistics.median(per_epoch['gamma=None']), statistics.median(per_epoch["gamma='auto'"])
    return {'runs': runs, 'epoch_cpu_s_mean_per_run': per_epoch,
            'median_epoch_cpu_s': {'gamma=None': base, "gamma='auto'": auto},
            'auto_overhead_cpu_s_per_epoch': auto - base, 'auto_overhead_ratio': auto / base - 1,
            'paired_ratios': [a / b - 1 for a, b in zip(per_epoch["gamma='auto'"], per_epoch['gamma=None'])]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='smoke run: a small supernet, 2 epochs, 1 timing round')
    parser.add_argument('--rounds', type=int, default=3, help='interleaved A/B timing rounds (default 3)')
    parser.add_argument('--damping', type=float, default=None,
                        help='damping of the third setting (default: |lambda_min| of the gamma=None run, rounded up)')
    parser.add_argument('--out', type=Path, default=None, help=f'results file (default: {DEFAULT_OUT})')
    parser.add_argument('--skip-timing', action='store_true', help='diagnostics only')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet()
    if args.child is not None:
        print(json.dumps(time_child(json.loads(args.child), load_setup(args.quick))))
        return 0
    if args.quick and args.out is None:
        parser.error('--quick needs --out, so that it never overwrites the committed results')
    if args.rounds < 1 or (args.damping is not None and not args.damping >= 0):
        parser.error('--rounds must be >= 1 and --damping >= 0')
    out = args.out or DEFAULT_OUT
    setup = load_setup(args.quick)
    result: dict[str, Any] = {'command': command_line(), 'commit': git_commit(), 'machine_at_start': machine(),
                              'setup': setup, 'config': str(CONFIG.relative_to(ROOT))}
    result['diagnostics'] = measure_diagnostics(setup, args.damping)
    if not args.skip_timing:
        result['overhead'] = measure_overhead(setup, 1 if args.quick else args.rounds, args.quick)
        o = result['overhead']
        print(f"auto overhead: {o['auto_overhead_cpu_s_per_epoch']:+.3f} CPU s per epoch "
              f"({100 * o['auto_overhead_ratio']:+.1f}%)")
    result['machine_at_end'] = machine()
    write_json(out, result)
    print(f'written to {out}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
