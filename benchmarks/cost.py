"""Cost of every search mode against NNI's DARTS, and fidelity of the hypergradients against the exact one.

    python -m benchmarks.cost                                  # 3 interleaved rounds + fidelity (~10 min)
    python -m benchmarks.cost --quick --out /tmp/cost.json     # smoke run (~1 min)

Cost. Every mode searches two spaces (:data:`COST_SPACES`): ``digits_deep`` (the search-quality supernet,
``search_quality.SETTINGS['digits_deep']['paper']``, on sklearn's digits) and NNI's NAS-Bench-201 space at a small
width (:class:`~search_spaces.NasBench201Space`, 8 channels, 1 cell per stage) on random 32x32 images. Each
(space, mode) measurement runs through :func:`nni_idarts.search.search` in a fresh subprocess with one torch
thread, so its peak memory is its own; all (space, mode) pairs are interleaved round by round in a rotated order
(A/B/A/B), so a change of the machine's load hits all of them alike, and the 1-minute load average is recorded
before each. A Lightning callback measures, per batch, the architecture step (NNI's DARTS: from the step's
first ``resample()`` to the weight step's; IDartsStrategy, whose loop is T weight steps and then an architecture
step: its ``architecture_step`` call) and the weight step, and the time per epoch (the first epoch, which includes warm-up
allocations, is dropped). Times are CPU seconds of the (single-threaded) process, which the load of other
processes inflates less than wall time; wall-clock seconds are recorded beside them. Peak memory is the growth of
the peak RSS (``ru_maxrss``) over the RSS just before the search starts. Ratios are to ``nni_darts`` of the same
space and round; the table gives their median and their min-max over the rounds.

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
from benchmarks.search_quality import SETTINGS, SHARED, effective_config, make_strategy, unavailable_reason

DEFAULT_OUT = DATA_DIR / 'cost.json'
REFERENCE = 'nni_darts'
#: Modes timed. ``idarts_K2`` (T = inner_steps = 5, K = 2) is the paper's default. Modes the installed strategy
#: refuses (``search_quality.unavailable_reason``) are left out and listed.
COST_MODES = ('nni_darts', 'nni_gumbel_darts', 'first_order', 'unrolled', 'idarts_K1', 'idarts_K2', 'idarts_K5',
              'idarts_K2_auto', 'idarts_K2_damp')
#: ``--quick`` times these only (the reference, the cheapest and the most expensive architecture step).
QUICK_MODES = ('nni_darts', 'first_order', 'idarts_K5')
#: The two spaces timed. ``samples``: random images per split (nasbench201 only).
COST_SPACES: dict[str, dict[str, Any]] = {
    'digits_deep': {**SETTINGS['digits_deep']['paper'], 'epochs': 3},
    'nasbench201': {**SETTINGS['digits_deep']['paper'], 'space': 'nasbench201', 'channels': 8, 'num_cells': 1,
                    'batch_size': 32, 'samples': 256, 'image_size': 32, 'epochs': 3},
}

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
        from nni_idarts.module import IDartsLightningModule

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
                if isinstance(pl_module, IDartsLightningModule):
                    # IDartsStrategy's loop is weight step, then (every T-th batch) architecture_step(), which calls
                    # resample() itself: time that method directly, and the weight step up to it.
                    step = pl_module.architecture_step

                    def architecture_step(*args, **kwargs):
                        timer.arch_start = (time.process_time(), time.perf_counter())
                        try:
                            return step(*args, **kwargs)
                        finally:
                            timer.arch_end = (time.process_time(), time.perf_counter())

                    pl_module.architecture_step = architecture_step
                    timer.idarts = True

            def on_train_epoch_start(self, trainer, pl_module):
                timer.epoch_start = (time.process_time(), time.perf_counter())

            def on_train_epoch_end(self, trainer, pl_module):
                cpu, wall = time.process_time(), time.perf_counter()
                timer.epochs.append((cpu - timer.epoch_start[0], wall - timer.epoch_start[1]))

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                timer.marks, timer.arch_start, timer.arch_end = [], None, None

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                end = (time.process_time(), time.perf_counter())

                def span(a, b):
                    return tuple(y - x for x, y in zip(a, b))

                if timer.idarts:
                    if timer.marks:
                        timer.weight_steps.append(span(timer.marks[0], timer.arch_start or end))
                    if timer.arch_start is not None:
                        timer.arch_steps.append(span(timer.arch_start, timer.arch_end))
                    return
                # NNI's DARTS: resample() before the architecture step, then before the weight step.
                if len(timer.marks) == 2:
                    timer.arch_steps.append(span(timer.marks[0], timer.marks[1]))
                if timer.marks:
                    timer.weight_steps.append(span(timer.marks[-1], end))

        self.callback = Callback()
        self.idarts = False
        self.arch_start: tuple[float, float] | None = None
        self.arch_end: tuple[float, float] | None = None
        self.marks: list[tuple[float, float]] = []
        self.weight_step_first = False
        self.epoch_start = (0.0, 0.0)
        self.epochs: list[tuple[float, float]] = []
        self.arch_steps: list[tuple[float, float]] = []
        self.weight_steps: list[tuple[float, float]] = []


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _space_and_data(config: dict[str, Any]):
    """The supernet and (train, val) data of a cost space: digits, or random images for NAS-Bench-201."""
    import torch
    from torch.utils.data import TensorDataset
    from nni_idarts.data import digits_splits
    if config['space'] == 'nasbench201':
        from search_spaces import NasBench201Space
        generator = torch.Generator().manual_seed(0)
        n, size = config['samples'], config['image_size']
        data = [TensorDataset(torch.randn(n, 3, size, size, generator=generator),
                              torch.randint(0, 10, (n,), generator=generator)) for _ in range(2)]
        return NasBench201Space(channels=config['channels'], cells_per_stage=config['num_cells']), data[0], data[1]
    splits = digits_splits(SPLIT_SEED)
    return make_space(config['channels'], config['num_cells'], config['space']), splits.train, splits.val


def measure_mode(mode: str, config: dict[str, Any]) -> dict[str, Any]:
    """Search with ``mode`` for ``config['epochs']`` epochs in this process and measure it (the child's job)."""
    import nni_idarts.search as search_module
    quiet()
    space, train, val = _space_and_data(config)
    strategy = make_strategy(mode, config)
    timer = _StepTimer()
    extra = {} if config.get('learning_rate_min') is None else {'learning_rate_min': config['learning_rate_min']}
    rss_before = _rss_bytes()
    search_module.search(space, train, val, strategy, epochs=config['epochs'],
                         batch_size=config['batch_size'], learning_rate=config['learning_rate'],
                         weight_decay=config['weight_decay'], seed=0, **extra,
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


def _child(mode: str, space: str, quick: bool) -> dict[str, Any]:
    """Run :func:`measure_mode` in a fresh interpreter (clean peak memory) and return its result."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1',
           'PYTHONPATH': os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get('PYTHONPATH')]))}
    cmd = [sys.executable, '-m', 'benchmarks.cost', '--child', mode, '--child-space', space] + \
        (['--quick'] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f'cost child for {mode} on {space} failed:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cost_config(space: str, quick: bool) -> dict[str, Any]:
    config = effective_config(COST_SPACES[space])
    if quick:   # a smoke run: tiny widths, 2 epochs (the first is dropped), few samples
        config.update(epochs=2, channels=4, samples=160, image_size=16)   # NB201: 5 batches, an arch step each epoch
    return config


_KEYS = ('epoch_cpu_s', 'epoch_wall_s', 'arch_step_cpu_ms', 'arch_step_wall_ms', 'weight_step_cpu_ms',
         'peak_rss_growth_mb')
_RATIO_KEYS = ('epoch_cpu_s', 'epoch_wall_s', 'arch_step_cpu_ms', 'peak_rss_growth_mb')


def measure_costs(rounds: int, quick: bool, spaces: Sequence[str] = tuple(COST_SPACES),
                  modes: Sequence[str] = COST_MODES) -> dict[str, Any]:
    """All (space, mode) pairs, ``rounds`` times, interleaved in a rotated order; medians and per-round ratios."""
    pairs = [(space, mode) for mode in modes for space in spaces]   # A/B: the spaces alternate
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {sp: {m: [] for m in modes} for sp in spaces}
    for r in range(rounds):
        shift = (r * len(pairs)) // rounds   # rotate: no pair always goes first or last
        for space, mode in pairs[shift:] + pairs[:shift]:
            load = os.getloadavg()[0]
            sample = {**_child(mode, space, quick), 'round': r, 'load_1min_before': load}
            samples[space][mode].append(sample)
            print(f'  round {r + 1}/{rounds} {space} {mode}: epoch {sample["epoch_cpu_s"]:.2f} CPU s '
                  f'({sample["epoch_wall_s"]:.2f} wall), arch step {sample["arch_step_cpu_ms"]:.1f} CPU ms, peak '
                  f'+{sample["peak_rss_growth_mb"]:.1f} MB, load {load:.1f}', flush=True)
    tables = {}
    for space in spaces:
        table = {m: {k: statistics.median(s[k] for s in samples[space][m]) for k in _KEYS} for m in modes}
        for mode, row in table.items():
            for k in _RATIO_KEYS:   # the ratio within each round, then its median and range over the rounds
                ratios = [s[k] / ref[k] for s, ref in zip(samples[space][mode], samples[space][REFERENCE])]
                row[f'{k}_ratio'] = statistics.median(ratios)
                row[f'{k}_ratio_range'] = (min(ratios), max(ratios))
        tables[space] = {'config': cost_config(space, quick), 'table': table, 'samples': samples[space]}
    loads = [s['load_1min_before'] for sp in samples.values() for m in sp.values() for s in m]
    return {'rounds': rounds, 'modes': list(modes), 'spaces': tables,
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
    for space, part in result.get('cost', {}).get('spaces', {}).items():
        lines += [f'{space}:', '', '| mode | epoch CPU s (wall) | x NNI DARTS [min-max] | arch step CPU ms (wall) '
                  '| x NNI DARTS [min-max] | weight step CPU ms | peak RSS growth MB | x NNI DARTS [min-max] |',
                  '|---|---|---|---|---|---|---|---|']

        def ratio(r: dict[str, Any], k: str) -> str:
            lo, hi = r[f'{k}_ratio_range']
            return f'{r[f"{k}_ratio"]:.2f} [{lo:.2f}-{hi:.2f}]'

        for mode, r in part['table'].items():
            lines.append(f'| {mode} | {r["epoch_cpu_s"]:.2f} ({r["epoch_wall_s"]:.2f}) | {ratio(r, "epoch_cpu_s")} '
                         f'| {r["arch_step_cpu_ms"]:.1f} ({r["arch_step_wall_ms"]:.1f}) | {ratio(r, "arch_step_cpu_ms")} '
                         f'| {r["weight_step_cpu_ms"]:.1f} | {r["peak_rss_growth_mb"]:.1f} '
                         f'| {ratio(r, "peak_rss_growth_mb")} |')
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
    parser.add_argument('--skip-fidelity', action='store_true', help='cost only')
    parser.add_argument('--fidelity-weight-decay', type=float, default=None,
                        help=f'L2 weight decay in L_train of the fidelity problem (default {SHARED["weight_decay"]})')
    parser.add_argument('--child', choices=COST_MODES, help=argparse.SUPPRESS)
    parser.add_argument('--child-space', choices=tuple(COST_SPACES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_mode(args.child, cost_config(args.child_space, args.quick))))
        return 0
    if args.skip_cost and args.skip_fidelity:
        parser.error('--skip-cost and --skip-fidelity together leave nothing to measure')
    if args.quick and args.out is None:
        parser.error('--quick needs --out, so that it never overwrites the committed results')
    if args.rounds < 1:
        parser.error('--rounds must be >= 1')
    if args.fidelity_weight_decay is not None and not args.fidelity_weight_decay >= 0:
        parser.error('--fidelity-weight-decay must be >= 0')
    quiet()
    out = args.out or DEFAULT_OUT
    start = time.perf_counter()
    result: dict[str, Any] = {'command': command_line(), 'commit': git_commit(), 'machine_at_start': machine()}
    if not args.skip_cost:
        config = cost_config(next(iter(COST_SPACES)), args.quick)
        unavailable = {m: reason for m in COST_MODES if (reason := unavailable_reason(m, config)) is not None}
        for mode, reason in unavailable.items():
            print(f'warning: {mode} is not timed: the installed strategy refuses it ({reason})', file=sys.stderr)
        result['cost'] = measure_costs(1 if args.quick else args.rounds, args.quick,
                                       modes=[m for m in (QUICK_MODES if args.quick else COST_MODES)
                                              if m not in unavailable])
        result['cost']['unavailable'] = unavailable
    if not args.skip_fidelity:
        result['fidelity'] = run_fidelity(args)
        plot_fidelity(result['fidelity'], out.with_suffix('.png'))
    result['machine_at_end'] = machine()
    result['wall_seconds'] = time.perf_counter() - start
    write_json(out, result)
    print(markdown(result))
    print(f'wrote {out}' + ('' if args.skip_fidelity else f' and {out.with_suffix(".png")}'))
    return 0


def run_fidelity(args: argparse.Namespace) -> dict[str, Any]:
    fidelity_config = dict(FIDELITY_QUICK if args.quick else FIDELITY)
    if args.fidelity_weight_decay is not None:
        fidelity_config['weight_decay'] = args.fidelity_weight_decay
    return measure_fidelity(fidelity_config)


if __name__ == '__main__':
    sys.exit(main())
