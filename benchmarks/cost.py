"""Cost of every search mode against NNI's DARTS, and fidelity of the hypergradients against the exact one.

    python -m benchmarks.cost                                  # 3 interleaved rounds + fidelity (~10 min)
    python -m benchmarks.cost --quick --out /tmp/cost.json     # smoke run (~1 min)

Cost. Every mode searches the digits cell space (``search_quality.SHARED``: 16 channels, 2 cells, batch 64) through
:func:`nni_idarts.search.search`, each run in a fresh subprocess so its peak memory is its own; the modes are
interleaved round by round (in a rotated order), so a change of the machine's load hits all of them alike.
A Lightning callback measures, per batch, the architecture step and the weight step, bracketed by the module's
``resample()`` calls (one before each step) and the batch end: NNI's DARTS takes the architecture step first,
IDartsStrategy (the paper's loop) the weight step first, and the time per epoch (the first epoch, which includes warm-up allocations, is dropped).
Times are CPU seconds of the (single-threaded) process, which the load of other processes does not inflate;
wall-clock seconds are recorded too. Peak memory is the growth of the peak RSS (``ru_maxrss``) over the RSS just
before the search starts. Ratios are to ``nni_darts``.

Fidelity. On a supernet small enough for a dense Hessian (3 channels, 1 cell, 360 train and val images; 300-odd weights), after
``FIDELITY['weight_steps']`` full-batch SGD steps and then L-BFGS to a stationary point, at fixed random alphas, with L_train = cross-entropy + the L2
weight decay (as :class:`~nni_idarts.module.IDartsLightningModule` does), it compares
:func:`~nni_idarts.hypergradient.neumann` (K = 0..10) and :func:`~nni_idarts.hypergradient.unrolled` with
:func:`~nni_idarts.hypergradient.exact` by cosine similarity, for gamma = 1/lambda_max(H) (the series converges)
and gamma = the weight learning rate (the paper's choice). The K from which on the cosine stays above 0.9 and 0.99 is
found from the same series continued to ``FIDELITY['max_k']`` terms with the dense H (checked against ``neumann``
for K <= 10).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ''):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import DATA_DIR, SPLIT_SEED, command_line, git_commit, machine, quiet, write_json
from benchmarks.groundtruth import make_space
from benchmarks.search_quality import QUICK, SHARED, make_strategy

DEFAULT_OUT = DATA_DIR / 'cost.json'
REFERENCE = 'nni_darts'
#: Modes timed. ``idarts_K2`` (T = inner_steps = 5, K = 2) is the paper's default.
COST_MODES = ('nni_darts', 'nni_gumbel_darts', 'first_order', 'unrolled', 'idarts_K1', 'idarts_K2', 'idarts_K5')

#: The fidelity problem. ``samples``: how many train/val images make the full batches (None: all 719).
#: ``weight_decay``: the L2 term of L_train (default: the search's).
FIDELITY = {'channels': 3, 'num_cells': 1, 'weight_steps': 300, 'lbfgs_steps': 2000, 'samples': 360, 'max_k': 20000,
            'weight_decay': SHARED['weight_decay']}
FIDELITY_QUICK = {'channels': 2, 'num_cells': 1, 'weight_steps': 100, 'lbfgs_steps': 200, 'samples': 96, 'max_k': 2000,
                  'weight_decay': SHARED['weight_decay']}
FIDELITY_WEIGHT_LR = SHARED['learning_rate']        # the gamma of the paper
FIDELITY_K = tuple(range(11))


# ----- cost: one mode in one process -----

class _StepTimer:
    """A Lightning callback timing architecture steps, weight steps and epochs of a DARTS-family one-shot module."""

    def __init__(self):
        import pytorch_lightning as pl

        timer = self

        class Callback(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                from nni_idarts.module import IDartsLightningModule
                timer.weight_step_first = isinstance(pl_module, IDartsLightningModule)
                original = pl_module.resample

                def resample(*args, **kwargs):
                    timer.marks.append((time.process_time(), time.perf_counter()))
                    return original(*args, **kwargs)

                pl_module.resample = resample

            def on_train_epoch_start(self, trainer, pl_module):
                timer.epoch_start = (time.process_time(), time.perf_counter())

            def on_train_epoch_end(self, trainer, pl_module):
                cpu, wall = time.process_time(), time.perf_counter()
                timer.epochs.append((cpu - timer.epoch_start[0], wall - timer.epoch_start[1]))

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                timer.marks = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                end = (time.process_time(), time.perf_counter())

                def span(start, stop):
                    return tuple(b - a for a, b in zip(start, stop))

                if len(timer.marks) == 2:   # resample() before each of the two steps
                    first, second = span(timer.marks[0], timer.marks[1]), span(timer.marks[1], end)
                    arch, weight = (second, first) if timer.weight_step_first else (first, second)
                    timer.arch_steps.append(arch)
                    timer.weight_steps.append(weight)
                elif timer.marks:            # a batch with a weight step only
                    timer.weight_steps.append(span(timer.marks[-1], end))

        self.callback = Callback()
        self.marks: list[tuple[float, float]] = []
        self.weight_step_first = False
        self.epoch_start = (0.0, 0.0)
        self.epochs: list[tuple[float, float]] = []
        self.arch_steps: list[tuple[float, float]] = []
        self.weight_steps: list[tuple[float, float]] = []


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def measure_mode(mode: str, config: dict[str, Any]) -> dict[str, Any]:
    """Search with ``mode`` for ``config['epochs']`` epochs in this process and measure it (the child's job)."""
    import nni_idarts.search as search_module
    from nni_idarts.data import digits_splits
    quiet()
    splits = digits_splits(SPLIT_SEED)
    strategy = make_strategy(mode, config)
    timer = _StepTimer()
    space = make_space(config['channels'], config['num_cells'])
    rss_before = _rss_bytes()
    search_module.search(space, splits.train, splits.val, strategy, epochs=config['epochs'],
                         batch_size=config['batch_size'], learning_rate=config['learning_rate'],
                         weight_decay=config['weight_decay'], seed=0,
                         trainer_kwargs={'enable_progress_bar': False, 'enable_model_summary': False,
                                         'callbacks': [timer.callback]})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    epochs = timer.epochs[1:] or timer.epochs

    def median(pairs: list[tuple[float, float]], i: int) -> float:
        return statistics.median(p[i] for p in pairs) if pairs else float('nan')

    return {'mode': mode, 'epoch_cpu_s': median(epochs, 0), 'epoch_wall_s': median(epochs, 1),
            'arch_step_cpu_ms': 1e3 * median(timer.arch_steps, 0), 'arch_step_wall_ms': 1e3 * median(timer.arch_steps, 1),
            'weight_step_cpu_ms': 1e3 * median(timer.weight_steps, 0), 'arch_steps': len(timer.arch_steps),
            'peak_rss_growth_mb': (peak - rss_before) / 2**20, 'rss_before_mb': rss_before / 2**20}


def _child(mode: str, quick: bool) -> dict[str, Any]:
    """Run :func:`measure_mode` in a fresh interpreter (clean peak memory) and return its result."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1',
           'PYTHONPATH': os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get('PYTHONPATH')]))}
    cmd = [sys.executable, '-m', 'benchmarks.cost', '--child', mode] + (['--quick'] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f'cost child for {mode} failed:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cost_config(quick: bool) -> dict[str, Any]:
    return {**(QUICK if quick else SHARED), 'epochs': 2 if quick else 3}


def measure_costs(rounds: int, quick: bool, modes: Sequence[str] = COST_MODES) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    loads = []
    for r in range(rounds):
        order = list(modes[r % len(modes):]) + list(modes[:r % len(modes)])   # rotate: no mode always goes first
        for mode in order:
            loads.append(os.getloadavg()[0])
            samples[mode].append(_child(mode, quick))
            s = samples[mode][-1]
            print(f'  round {r + 1}/{rounds} {mode}: epoch {s["epoch_cpu_s"]:.2f} CPU s, arch step '
                  f'{s["arch_step_cpu_ms"]:.1f} CPU ms, peak +{s["peak_rss_growth_mb"]:.1f} MB', flush=True)
    keys = ('epoch_cpu_s', 'epoch_wall_s', 'arch_step_cpu_ms', 'arch_step_wall_ms', 'weight_step_cpu_ms',
            'peak_rss_growth_mb')
    table = {m: {k: statistics.median(s[k] for s in samples[m]) for k in keys} for m in modes}
    ref = table[REFERENCE]
    for row in table.values():
        for k in ('epoch_cpu_s', 'epoch_wall_s', 'arch_step_cpu_ms', 'peak_rss_growth_mb'):
            row[f'{k}_ratio'] = row[k] / ref[k]
    return {'config': cost_config(quick), 'rounds': rounds, 'table': table, 'samples': samples,
            'load_average_1min_during': [min(loads), max(loads)]}


# ----- fidelity -----

def _fidelity_problem(config: dict[str, Any], seed: int = 0):
    """A trained small supernet and its full-batch losses: (train_loss, val_loss, weights, alphas)."""
    import torch
    import torch.nn.functional as F
    from nni.nas.strategy import DARTS
    from nni_idarts.data import digits_splits

    torch.manual_seed(seed)
    supernet = DARTS().mutate_model(make_space(config['channels'], config['num_cells'])).double()
    alphas = [p for n, p in supernet.named_parameters() if n.endswith('_arch_alpha')]
    weights = [p for n, p in supernet.named_parameters() if not n.endswith('_arch_alpha')]
    with torch.no_grad():
        for a in alphas:  # away from uniform, so that the ops are mixed unevenly, as mid-search
            a.copy_(torch.randn_like(a))
    splits = digits_splits(SPLIT_SEED)
    (xt, yt), (xv, yv) = ([t[:config['samples']].double() if t.is_floating_point() else t[:config['samples']]
                           for t in d.tensors] for d in (splits.train, splits.val))

    def train_loss():
        return F.cross_entropy(supernet(xt), yt) + 0.5 * config['weight_decay'] * sum((w * w).sum() for w in weights)

    def val_loss():
        return F.cross_entropy(supernet(xv), yv)

    # SGD first, then L-BFGS to a stationary point: the implicit-function theorem (and the Neumann series) are about
    # w*(a), a minimum of L_train, where H is positive definite; an unconverged w gives an indefinite H.
    optimizer = torch.optim.SGD(weights, lr=0.1, momentum=0.9)
    for _ in range(config['weight_steps']):
        optimizer.zero_grad()
        train_loss().backward()
        optimizer.step()
    lbfgs = torch.optim.LBFGS(weights, lr=1, max_iter=config['lbfgs_steps'], tolerance_grad=1e-10,
                              tolerance_change=1e-14, history_size=50, line_search_fn='strong_wolfe')

    def closure():
        lbfgs.zero_grad()
        loss = train_loss()
        loss.backward()
        return loss

    lbfgs.step(closure)
    for p in supernet.parameters():
        p.grad = None
    return train_loss, val_loss, weights, alphas


def _flat(tensors) -> 'torch.Tensor':
    import torch
    return torch.cat([t.reshape(-1) for t in tensors])


def measure_fidelity(config: dict[str, Any] = FIDELITY) -> dict[str, Any]:
    import torch
    from nni_idarts import hypergradient as hg

    max_k = config['max_k']
    train_loss, val_loss, weights, alphas = _fidelity_problem(config)
    n = sum(w.numel() for w in weights)
    exact = _flat(hg.exact(train_loss, val_loss, weights, alphas))

    # The dense pieces, to continue the series beyond K = 10 cheaply (the functions under test are used for K <= 10).
    grads = torch.autograd.grad(train_loss(), weights, create_graph=True)
    flat_grads = _flat(grads)
    hessian = torch.stack([_flat(torch.autograd.grad(flat_grads[i], weights, retain_graph=True)) for i in range(n)])
    hessian = (hessian + hessian.T) / 2
    train_grad_alpha = _flat(torch.autograd.grad(train_loss(), alphas, create_graph=True))
    mixed = torch.stack([_flat(torch.autograd.grad(train_grad_alpha[i], weights, retain_graph=True, allow_unused=True,
                                                   materialize_grads=True)) for i in range(len(train_grad_alpha))])
    val_grads = torch.autograd.grad(val_loss(), [*weights, *alphas])
    v, g_a = _flat(val_grads[:len(weights)]), _flat(val_grads[len(weights):])
    eigenvalues = torch.linalg.eigvalsh(hessian)
    lam_min, lam_max = float(eigenvalues[0]), float(eigenvalues[-1])
    train_grad_norm = float(flat_grads.norm())

    def cos(x):
        return float(torch.nn.functional.cosine_similarity(x, exact, dim=0))

    def dense_series(gamma: float, max_k: int) -> list[float]:
        term, total, out = v.clone(), v.clone(), []
        for k in range(max_k + 1):
            if k:
                term = term - gamma * (hessian @ term)
                total = total + term
            out.append(cos(g_a - gamma * (mixed @ total)))
            if not torch.isfinite(total).all():
                out.extend([float('nan')] * (max_k - k))
                break
        return out

    settings = {'1/lambda_max': 1.0 / lam_max, 'weight_lr': FIDELITY_WEIGHT_LR}
    curves = {}
    for name, gamma in settings.items():
        neumann = [cos(_flat(hg.neumann(train_loss, val_loss, weights, alphas, K=k, gamma=gamma))) for k in FIDELITY_K]
        series = dense_series(gamma, max_k)
        worst_mismatch = max(abs(a - b) for a, b in zip(neumann, series))

        def first_k(threshold):
            # The K from which on the cosine stays at or above the threshold (up to max_k); None if it never does.
            below = [k for k, c in enumerate(series) if not c >= threshold]
            if not below:
                return 0
            return below[-1] + 1 if below[-1] < max_k else None

        curves[name] = {'gamma': gamma, 'converges': gamma * lam_max < 2 and lam_min > 0,
                        'cosine_by_K': neumann, 'dense_check_max_abs_diff': worst_mismatch,
                        'K_cos_0.9': first_k(0.9), 'K_cos_0.99': first_k(0.99),
                        'cosine_at_K': {k: series[k] for k in (20, 50, 100, 200, 500, 1000, 5000, 20000)
                                        if k <= max_k}}
    unrolled = cos(_flat(hg.unrolled(train_loss, val_loss, weights, alphas, lr=FIDELITY_WEIGHT_LR)))
    first_order = cos(g_a)
    return {'config': config, 'num_weights': n,
            'train_grad_norm_after_training': train_grad_norm,
            'hessian_eigenvalues': {'min': lam_min, 'max': lam_max, 'negative': int((eigenvalues < 0).sum()),
                                    'condition': lam_max / lam_min if lam_min > 0 else float('inf')},
            'neumann': curves, 'unrolled_cosine': unrolled, 'unrolled_lr': FIDELITY_WEIGHT_LR,
            'first_order_cosine': first_order}


def plot_fidelity(fidelity: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in fidelity['neumann'].items():
        ax.plot(FIDELITY_K, curve['cosine_by_K'], marker='o', label=f'neumann, gamma = {name} ({curve["gamma"]:.3g})')
    ax.axhline(fidelity['unrolled_cosine'], color='gray', linestyle='--', label=f'unrolled (lr {fidelity["unrolled_lr"]})')
    ax.axhline(fidelity['first_order_cosine'], color='gray', linestyle=':', label='first order')
    ax.set_xlabel('K (Neumann terms)')
    ax.set_ylabel('cosine similarity to exact')
    ax.set_title(f'Hypergradient fidelity ({fidelity["num_weights"]} weights, dense H)')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    lines = []
    if 'cost' in result:
        lines += ['| mode | epoch (CPU s) | x NNI DARTS | arch step (CPU ms) | x NNI DARTS | weight step (CPU ms) '
                  '| peak RSS growth (MB) | x NNI DARTS |', '|---|---|---|---|---|---|---|---|']
        for mode, r in result['cost']['table'].items():
            lines.append(f'| {mode} | {r["epoch_cpu_s"]:.2f} | {r["epoch_cpu_s_ratio"]:.2f} | {r["arch_step_cpu_ms"]:.1f} '
                         f'| {r["arch_step_cpu_ms_ratio"]:.2f} | {r["weight_step_cpu_ms"]:.1f} '
                         f'| {r["peak_rss_growth_mb"]:.1f} | {r["peak_rss_growth_mb_ratio"]:.2f} |')
        lines.append('')
    if 'fidelity' in result:
        f = result['fidelity']
        names = list(f['neumann'])
        lines += ['| K | ' + ' | '.join(f'cos, gamma = {n} ({f["neumann"][n]["gamma"]:.3g})' for n in names) + ' |',
                  '|---|' + '---|' * len(names)]
        for k in FIDELITY_K:
            lines.append(f'| {k} | ' + ' | '.join(f'{f["neumann"][n]["cosine_by_K"][k]:.4f}' for n in names) + ' |')
        for k in f['neumann'][names[0]]['cosine_at_K']:
            lines.append(f'| {k} (dense) | ' + ' | '.join(f'{f["neumann"][n]["cosine_at_K"][k]:.4f}' for n in names) + ' |')
        lines.append('| K where cos >= 0.9 | ' + ' | '.join(str(f['neumann'][n]['K_cos_0.9']) for n in names) + ' |')
        lines.append('| K where cos >= 0.99 | ' + ' | '.join(str(f['neumann'][n]['K_cos_0.99']) for n in names) + ' |')
        lines.append(f'\nunrolled (lr {f["unrolled_lr"]}): cos {f["unrolled_cosine"]:.4f}; first order: cos '
                     f'{f["first_order_cosine"]:.4f}; H: {f["num_weights"]} weights, eigenvalues '
                     f'[{f["hessian_eigenvalues"]["min"]:.3g}, {f["hessian_eigenvalues"]["max"]:.3g}], '
                     f'{f["hessian_eigenvalues"]["negative"]} negative')
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='smoke run: 1 round, small supernet, 2 epochs')
    parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds of all modes (default 3)')
    parser.add_argument('--out', type=Path, default=None, help=f'results file (default: {DEFAULT_OUT}, plot beside it)')
    parser.add_argument('--skip-cost', action='store_true', help='fidelity only')
    parser.add_argument('--fidelity-weight-decay', type=float, default=None,
                        help=f'L2 weight decay in L_train of the fidelity problem (default {SHARED["weight_decay"]})')
    parser.add_argument('--child', choices=COST_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_mode(args.child, cost_config(args.quick))))
        return 0
    if args.quick and args.out is None:
        parser.error('--quick needs --out, so that it never overwrites the committed results')
    if args.rounds < 1:
        parser.error('--rounds must be >= 1')
    quiet()
    out = args.out or DEFAULT_OUT
    start = time.perf_counter()
    result: dict[str, Any] = {'command': command_line(), 'commit': git_commit(), 'machine_at_start': machine()}
    if not args.skip_cost:
        result['cost'] = measure_costs(1 if args.quick else args.rounds, args.quick)
    fidelity_config = dict(FIDELITY_QUICK if args.quick else FIDELITY)
    if args.fidelity_weight_decay is not None:
        if not args.fidelity_weight_decay >= 0:
            parser.error('--fidelity-weight-decay must be >= 0')
        fidelity_config['weight_decay'] = args.fidelity_weight_decay
    result['fidelity'] = measure_fidelity(fidelity_config)
    plot_fidelity(result['fidelity'], out.with_suffix('.png'))
    result['machine_at_end'] = machine()
    result['wall_seconds'] = time.perf_counter() - start
    write_json(out, result)
    print(markdown(result))
    print(f'wrote {out} and {out.with_suffix(".png")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
