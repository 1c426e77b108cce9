"""IDartsStrategy under Lightning DDP (2 CPU processes on gloo) against one process with the same global batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import ddp_worker
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name('ddp_worker.py')
PER_RANK_BATCH = 8
TIMEOUT_S = 150


def _run_worker(out: Path, mode: str, batch_size: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    # Its own session, so that on a timeout the rank Lightning started goes too.
    proc = subprocess.Popen([sys.executable, str(WORKER), str(out), mode, str(batch_size)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f'{mode} search did not finish in {TIMEOUT_S} s:\n{output[-3000:]}')
    assert proc.returncode == 0, f'{mode} search failed:\n{output[-5000:]}'


@pytest.fixture(scope='module')
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp('ddp')
    _run_worker(out, 'ddp', PER_RANK_BATCH)
    ddp_worker.main(str(out), 'single', 2 * PER_RANK_BATCH)  # in this process: one interpreter start less
    _run_worker(out, 'ddp_warmup', PER_RANK_BATCH)
    names = ('ddp_rank0', 'ddp_rank1', 'single_rank0', 'ddp_warmup_rank0', 'ddp_warmup_rank1')
    return {name: json.loads((out / f'{name}.json').read_text()) for name in names}


def test_ddp_shards_the_combined_loader_per_rank(runs: dict[str, dict]) -> None:
    rank0, rank1, single = runs['ddp_rank0']['steps'], runs['ddp_rank1']['steps'], runs['single_rank0']['steps']
    assert len(rank0) == len(rank1) == len(single) == 64 // (2 * PER_RANK_BATCH)
    for r0, r1, s in zip(rank0, rank1, single):
        for part in ('train_samples', 'val_samples'):
            assert len(r0[part]) == len(r1[part]) == PER_RANK_BATCH
            assert not set(r0[part]) & set(r1[part]), 'both ranks got the same samples'
            # Together the two ranks hold exactly the single process's global batch.
            assert sorted(r0[part] + r1[part]) == sorted(s[part])


def test_ddp_ranks_hold_identical_alphas_and_weights_after_every_step(runs: dict[str, dict]) -> None:
    rank0, rank1 = runs['ddp_rank0'], runs['ddp_rank1']
    # Rank 1 built other weights and shifted its alphas (see ddp_worker): both were replaced by rank 0's.
    assert rank0['initial']['alphas'] == rank1['initial']['alphas']
    assert rank0['initial']['weights'] == rank1['initial']['weights']
    for step, (r0, r1) in enumerate(zip(rank0['steps'], rank1['steps'])):
        assert r0['alphas'] == r1['alphas'], f'alphas differ between ranks after step {step}'
        assert r0['weights'] == r1['weights'], f'weights differ between ranks after step {step}'
    assert rank0['arch'] == rank1['arch']
    # The alphas really moved (an architecture step per batch), so equal alphas are not trivially equal.
    moved = np.abs(np.array(rank0['steps'][-1]['alphas']) - np.array(rank0['initial']['alphas'])).max()
    assert moved > 0.05


def test_ddp_equals_single_process_with_the_global_batch(runs: dict[str, dict]) -> None:
    ddp, single = runs['ddp_rank0'], runs['single_rank0']
    np.testing.assert_array_equal(ddp['initial']['alphas'], single['initial']['alphas'])
    np.testing.assert_array_equal(ddp['initial']['weights'], single['initial']['weights'])
    for step, (d, s) in enumerate(zip(ddp['steps'], single['steps'])):
        # Float32 sums in another order: ~1e-8 here. Reducing only the final hypergradient instead of every
        # Hessian-vector product is off by ~4e-3 on this problem, and no reduction at all by ~1e-1.
        np.testing.assert_allclose(d['alphas'], s['alphas'], rtol=0, atol=1e-6, err_msg=f'alphas, step {step}')
        np.testing.assert_allclose(d['weights'], s['weights'], rtol=0, atol=1e-6, err_msg=f'weights, step {step}')
    assert ddp['arch'] == single['arch']


def test_ddp_with_warmup_epochs(runs: dict[str, dict]) -> None:
    # NNI freezes the alphas during warm-up (requires_grad=False); DDP must not wait for their gradients.
    rank0, rank1 = runs['ddp_warmup_rank0'], runs['ddp_warmup_rank1']
    assert [s['epoch'] for s in rank0['steps']] == [0] * 4 + [1] * 4
    for r0, r1 in zip(rank0['steps'], rank1['steps']):
        assert r0['alphas'] == r1['alphas'] and r0['weights'] == r1['weights']
    warmup, search = rank0['steps'][:4], rank0['steps'][4:]
    assert all(s['alphas'] == rank0['initial']['alphas'] for s in warmup)
    assert all(s['weights'] != rank0['initial']['weights'] for s in warmup)
    assert search[-1]['alphas'] != rank0['initial']['alphas']
