"""The ``reduce`` hook of nni_idarts.hypergradient: R ranks with a mean-reduce give the hypergradient of the global batch.

The ranks are threads, each with its own replica of the weights and alphas and its own shard of the data; the
reduce is a barrier-synchronised mean, the same collective DDP performs. No process group is needed, so every
method is checked in milliseconds.
"""

from __future__ import annotations

import threading
from typing import Callable

import pytest
import torch

from nni_idarts import hypergradient

RANKS = 2
N, D, H = 12, 3, 4   # samples (divisible by RANKS), input size, hidden size
WEIGHT_DECAY = 0.1   # keeps the weight Hessian well conditioned for exact()


class ThreadMean:
    """An all-reduce (mean) among ``n`` threads; ``calls`` counts the collectives per rank."""

    def __init__(self, n: int):
        self.n = n
        self.barrier = threading.Barrier(n, timeout=30)
        self.slots: list = [None] * n
        self.calls = [0] * n

    def for_rank(self, rank: int) -> Callable:
        def reduce(tensors):
            self.calls[rank] += 1
            self.slots[rank] = [t.detach().clone() for t in tensors]
            self.barrier.wait()
            mean = [sum(slot[i] for slot in self.slots) / self.n for i in range(len(tensors))]
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
            return tuple(mean)
        return reduce


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w0, w1 = torch.randn(D, H, generator=g, dtype=torch.float64), torch.randn(H, 1, generator=g, dtype=torch.float64)
    alpha = torch.randn(2, generator=g, dtype=torch.float64)
    data = {split: (torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, 1, generator=g, dtype=torch.float64))
            for split in ('train', 'val')}
    return (w0, w1, alpha), data


def _losses(params, data, rows):
    """L_train (with the weight decay) and L_val of a two-op mixed layer on the samples ``rows``."""
    w0, w1, alpha = params

    def loss(split: str, decay: float) -> Callable[[], torch.Tensor]:
        x, y = data[split][0][rows], data[split][1][rows]

        def f() -> torch.Tensor:
            p = torch.softmax(alpha, 0)
            hidden = p[0] * torch.tanh(x @ w0) + p[1] * (x @ w0)
            return ((hidden @ w1 - y) ** 2).mean() + 0.5 * decay * ((w0 ** 2).sum() + (w1 ** 2).sum())
        return f
    return loss('train', WEIGHT_DECAY), loss('val', 0.0)


METHODS = {
    'first_order': lambda tl, vl, w, a, **kw: hypergradient.first_order(vl, w, a, **kw),
    'unrolled': lambda tl, vl, w, a, **kw: hypergradient.unrolled(tl, vl, w, a, lr=0.1, **kw),
    'neumann': lambda tl, vl, w, a, **kw: hypergradient.neumann(tl, vl, w, a, K=3, gamma=0.05, **kw),
    'exact': lambda tl, vl, w, a, **kw: hypergradient.exact(tl, vl, w, a, **kw),
}


def _replica(params):
    return [p.clone().requires_grad_() for p in params]


def _on_ranks(method: str, reduce_factory: Callable[[int], Callable] | None):
    """Run ``method`` on every rank (thread) with its shard; return each rank's result."""
    params, data = _problem()
    results: list = [None] * RANKS
    errors: list = []

    def run(rank: int) -> None:
        try:
            replica = _replica(params)
            train_loss, val_loss = _losses(replica, data, slice(rank, N, RANKS))  # DistributedSampler-style shard
            kwargs = {'reduce': reduce_factory(rank)} if reduce_factory else {}
            results[rank] = METHODS[method](train_loss, val_loss, replica[:2], replica[2:], **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(RANKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _global(method: str):
    params, data = _problem()
    replica = _replica(params)
    train_loss, val_loss = _losses(replica, data, slice(None))
    return METHODS[method](train_loss, val_loss, replica[:2], replica[2:])


@pytest.mark.parametrize('method', list(METHODS))
def test_mean_reduce_gives_the_global_batch_hypergradient_on_every_rank(method: str) -> None:
    expected = _global(method)
    mean = ThreadMean(RANKS)
    per_rank = _on_ranks(method, mean.for_rank)
    for rank, result in enumerate(per_rank):
        for got, want in zip(result, expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f'{method}, rank {rank}')
    assert mean.calls[0] == mean.calls[1] > 0  # the ranks joined the same number of collectives


@pytest.mark.parametrize('method', ['unrolled', 'neumann', 'exact'])
def test_reducing_only_the_result_is_not_the_global_hypergradient(method: str) -> None:
    # Why every intermediate product is reduced: for the second-order methods the mean of the per-rank
    # hypergradients differs from the hypergradient of the global batch (it is a product of means, not a mean).
    expected = _global(method)
    per_rank = _on_ranks(method, None)
    mean_of_results = [sum(r[i] for r in per_rank) / RANKS for i in range(len(expected))]
    gap = max(float((m - e).abs().max()) for m, e in zip(mean_of_results, expected))
    assert gap > 1e-4


def test_default_reduce_is_the_identity() -> None:
    params, data = _problem()
    replica = _replica(params)
    train_loss, val_loss = _losses(replica, data, slice(None))
    plain = hypergradient.neumann(train_loss, val_loss, replica[:2], replica[2:], K=3, gamma=0.05)
    calls = []
    traced = hypergradient.neumann(train_loss, val_loss, replica[:2], replica[2:], K=3, gamma=0.05,
                                   reduce=lambda ts: calls.append(len(ts)) or tuple(ts))
    for a, b in zip(plain, traced):
        assert torch.equal(a, b)
    # grad_w and grad_a of L_val together (3 tensors), K = 3 Hessian-vector products (2 each), the mixed product (1).
    assert calls == [3, 2, 2, 2, 1]
