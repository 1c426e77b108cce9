"""Architecture gradients (hypergradients) of the DARTS bilevel problem, as pure functions.

The bilevel problem is ``min_a L_val(w*(a), a)`` with ``w*(a) = argmin_w L_train(w, a)``. Every function here
takes zero-argument callables ``train_loss()`` and ``val_loss()`` returning scalar tensors that depend on the
tensors in ``weights`` (w) and ``alphas`` (a), and returns a tuple of tensors shaped like ``alphas``.

Notation: ``g_a = grad_a L_val``, ``v = grad_w L_val``, ``H = d2_w L_train`` (the weight Hessian) and
``M = d2_{a,w} L_train`` (the mixed second derivative, an |a| x |w| matrix).

- :func:`first_order`:  ``g_a``                                              (DARTS, 1st order)
- :func:`unrolled`:     ``grad_a L_val(w', a) - lr * M(w) . grad_w' L_val(w', a)``,
                        ``w' = w - lr * grad_w L_train(w, a)``                (DARTS, 2nd order)
- :func:`neumann`:      ``g_a - gamma * M . sum_{k=0..K} (I - gamma * (H + damping * I))^k . v``  (iDARTS;
                        damping = 0 in the paper)
- :func:`exact`:        ``g_a - M . H^-1 . v``, by a dense solve            (implicit function theorem)

All second-order products are exact double-backprop products (no finite differences). No function leaves a
trace on its inputs: weights are restored bit for bit, and no ``.grad`` field is written.

Data parallelism: every second-order function takes an optional ``reduce`` callable, applied to every first
derivative and every Hessian-vector or mixed product right after it is taken (identity by default). With the
global loss ``L = (1/R) sum_r L_r`` over R equally sized per-rank batches, each of those quantities is linear in
the loss: ``grad L = (1/R) sum_r grad L_r`` and, for a vector u that is the same on every rank,
``H u = (1/R) sum_r H_r u`` and ``M u = (1/R) sum_r M_r u``. So passing an all-ranks mean as ``reduce`` makes
every intermediate vector (the Neumann terms, ``w'`` of :func:`unrolled`) identical on all ranks, and the result
is the hypergradient of the mean loss over the global batch. The formulas are unchanged; the functions stay free
of any distributed library, and ``reduce`` must be called the same number of times on every rank, which they do
(no data-dependent branches).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Loss = Callable[[], torch.Tensor]
Tensors = Sequence[torch.Tensor]
#: Maps a tuple of tensors to a tuple of the same shapes, e.g. their mean over data-parallel ranks.
Reduce = Callable[[Tensors], Sequence[torch.Tensor]]


def _identity(tensors: Tensors) -> tuple[torch.Tensor, ...]:
    return tuple(tensors)

#: Above this many weights :func:`exact` refuses: its dense Hessian needs ``n`` Hessian-vector products and n^2 memory.
EXACT_MAX_WEIGHTS = 10_000

__all__ = ['first_order', 'unrolled', 'neumann', 'exact', 'power_iteration', 'largest_eigenvalue', 'auto_gamma',
           'random_vector',
           'EXACT_MAX_WEIGHTS', 'AUTO_GAMMA_SCALE', 'Reduce']

#: ``c`` of :func:`auto_gamma`: gamma * lambda_max <= c keeps every factor (1 - gamma * lambda) of the series's
#: positive-curvature directions in [0, 1), half way below the divergence bound of 2.
AUTO_GAMMA_SCALE = 1.0


def _grad(output: torch.Tensor, inputs: Tensors, grad_outputs: Tensors | None = None, *,
          create_graph: bool = False, retain_graph: bool | None = None) -> tuple[torch.Tensor, ...]:
    """``torch.autograd.grad`` where an input the output does not depend on gets a zero gradient, not None.

    A supernet has weights that a given loss never touches (e.g. an op whose path is cut), and alphas that a loss
    reaches only through the weights, so "unused" is normal here and means a zero derivative.
    """
    grads = torch.autograd.grad(output, list(inputs), grad_outputs=grad_outputs, create_graph=create_graph,
                                retain_graph=retain_graph, allow_unused=True, materialize_grads=True)
    return tuple(grads)


def _vjp(outputs: Tensors, inputs: Tensors, vectors: Tensors) -> tuple[torch.Tensor, ...]:
    """``sum_i vectors_i . d outputs_i / d inputs``, keeping the graph of ``outputs`` for further products.

    Outputs that carry no graph (a gradient that is constant in every input) contribute zero, so they are left out
    rather than handed to autograd, which rejects them.
    """
    pairs = [(o, v) for o, v in zip(outputs, vectors) if o.requires_grad]
    if not pairs:
        return tuple(torch.zeros_like(x) for x in inputs)
    return _grad([o for o, _ in pairs], inputs, [v for _, v in pairs], retain_graph=True)


def _dot(xs: Tensors, ys: Tensors) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(xs, ys))  # type: ignore[return-value]


def _unflatten(flat: torch.Tensor, like: Tensors) -> list[torch.Tensor]:
    pieces = torch.split(flat, [t.numel() for t in like])
    return [p.reshape(t.shape) for p, t in zip(pieces, like)]


def _split_val_grads(val_loss: Loss, weights: Tensors, alphas: Tensors,
                     reduce: Reduce = _identity) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``(grad_w L_val, grad_a L_val)`` from one forward and one backward pass (reduced together, in one call)."""
    grads = tuple(reduce(_grad(val_loss(), [*weights, *alphas])))
    return grads[:len(weights)], grads[len(weights):]


def _check(weights: Tensors, alphas: Tensors, *, second_order: bool = True) -> None:
    if second_order and not weights:
        raise ValueError('No weights were given: a second-order hypergradient differentiates through them.')
    if not alphas:
        raise ValueError('No architecture parameters (alphas) were given: there is nothing to differentiate.')
    for name, tensors in (('weights', weights), ('alphas', alphas)):
        if any(not t.requires_grad for t in tensors):
            raise ValueError(f'Every tensor in `{name}` must have requires_grad=True.')


def first_order(val_loss: Loss, weights: Tensors, alphas: Tensors, *,
                reduce: Reduce = _identity) -> tuple[torch.Tensor, ...]:
    """DARTS first order: ``grad_a L_val(w, a)``, treating the weights as constants.

    ``weights`` is accepted for a uniform signature (and checked) but not differentiated.
    """
    _check(weights, alphas, second_order=False)
    return tuple(reduce(_grad(val_loss(), alphas)))


def unrolled(train_loss: Loss, val_loss: Loss, weights: Tensors, alphas: Tensors, *,
             lr: float, reduce: Reduce = _identity) -> tuple[torch.Tensor, ...]:
    """DARTS second order: the exact gradient of ``L_val(w - lr * grad_w L_train(w, a), a)`` with respect to a.

    ``grad_a L_val(w', a) - lr * d2_{a,w} L_train(w, a) . grad_w' L_val(w', a)``, with
    ``w' = w - lr * grad_w L_train(w, a)`` (one plain SGD step, as in Liu et al., 2019, eq. 7).

    The weights are moved to ``w'`` in place for the validation pass and restored bit for bit afterwards.
    Unlike the original DARTS code, the mixed product is taken by double backprop, not by finite differences.
    """
    _check(weights, alphas)
    if not lr > 0:
        raise ValueError(f'lr must be > 0, got {lr}.')
    with torch.no_grad():
        saved = [w.detach().clone() for w in weights]
    # Reduced before the move, so that w' is the same point on every rank.
    train_grads = reduce(_grad(train_loss(), weights))
    try:
        with torch.no_grad():
            for w, g in zip(weights, train_grads):
                w.sub_(g, alpha=lr)
        val_grad_w, val_grad_a = _split_val_grads(val_loss, weights, alphas, reduce)
    finally:
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)
    # The mixed product must be taken at the original w, so the train graph is built again after restoring:
    # a graph built before the in-place move would be invalidated by it.
    mixed = reduce(_mixed_product(train_loss, weights, alphas, val_grad_w))
    return tuple(ga - lr * m for ga, m in zip(val_grad_a, mixed))


def _mixed_product(train_loss: Loss, weights: Tensors, alphas: Tensors, vector: Tensors) -> tuple[torch.Tensor, ...]:
    """``d2_{a,w} L_train . vector``, as the alpha-gradient of ``<grad_w L_train, vector>`` (not reduced)."""
    train_grads = _grad(train_loss(), weights, create_graph=True)
    return _vjp(train_grads, alphas, vector)


def neumann(train_loss: Loss, val_loss: Loss, weights: Tensors, alphas: Tensors, *,
            K: int = 2, gamma: float, damping: float = 0.0, reduce: Reduce = _identity,
            diagnostics: dict[str, float] | None = None) -> tuple[torch.Tensor, ...]:
    """iDARTS (Zhang et al., 2021): the implicit hypergradient with a K-term Neumann series for the inverse Hessian.

    ``grad_a L_val - gamma * d2_{a,w} L_train . sum_{k=0..K} (I - gamma * (H + damping * I))^k . grad_w L_val``,
    ``H = d2_w L_train``.

    ``gamma * sum_{k=0..K} (I - gamma * (H + damping * I))^k`` tends to ``(H + damping * I)^-1`` as K grows when
    every eigenvalue of ``H + damping * I`` lies in ``(0, 2 / gamma)``: for ``damping = 0`` (the paper) that needs a
    positive definite H and ``gamma * lambda_max < 2``; on an indefinite H (a supernet away from a strict minimum)
    it needs ``damping > |lambda_min|`` and ``gamma * (lambda_max + damping) < 2``. K = 0 gives ``gamma * I``.
    The graph of ``grad_w L_train`` is built once (one forward pass) and each of the K Hessian-vector products and
    the final mixed product is one more backward pass through it.

    ``diagnostics``: if a dict is given, it receives, at no extra pass, ``correction_ratio`` (the norm of the
    implicit correction ``gamma * M . sum`` over the norm of ``grad_a L_val``), ``cosine_to_first_order`` (cosine
    between the result and ``grad_a L_val``) and ``term_growth`` (``|term_K| / |term_0|`` of the series; above 1 the
    terms grow, i.e. the series is not converging; 1.0 for K = 0).
    """
    _check(weights, alphas)
    if not isinstance(K, int) or isinstance(K, bool) or K < 0:
        raise ValueError(f'K (the number of Neumann terms) must be an integer >= 0, got {K!r}.')
    if not gamma > 0:
        raise ValueError(f'gamma must be > 0, got {gamma}.')
    if not damping >= 0:
        raise ValueError(f'damping must be >= 0, got {damping}.')
    val_grad_w, val_grad_a = _split_val_grads(val_loss, weights, alphas, reduce)

    train_grads = _grad(train_loss(), weights, create_graph=True)
    term = val_grad_w        # (I - gamma (H + damping I))^k v, for k = 0
    total = list(val_grad_w)  # sum of the terms so far
    shrink = 1.0 - gamma * damping
    for _ in range(K):
        # Reduced before the next term: the next product must be taken with the global H's term on every rank.
        hvp = reduce(_vjp(train_grads, weights, term))
        term = tuple(shrink * t - gamma * h for t, h in zip(term, hvp))
        total = [s + t for s, t in zip(total, term)]
    mixed = reduce(_vjp(train_grads, alphas, total))
    correction = tuple(gamma * m for m in mixed)
    result = tuple(ga - c for ga, c in zip(val_grad_a, correction))
    if diagnostics is not None:
        diagnostics.update(_series_diagnostics(val_grad_a, correction, result, val_grad_w, term))
    return result


def _norm(tensors: Tensors) -> float:
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors)))  # type: ignore[arg-type]


def _series_diagnostics(first: Tensors, correction: Tensors, result: Tensors, first_term: Tensors,
                        last_term: Tensors) -> dict[str, float]:
    """What :func:`neumann` reports in ``diagnostics`` (see there); ratios of zero norms are reported as 0."""
    first_norm, result_norm = _norm(first), _norm(result)
    dot = float(sum((a.detach().double() * b.detach().double()).sum() for a, b in zip(first, result)))
    term0 = _norm(first_term)
    return {
        'correction_ratio': _norm(correction) / first_norm if first_norm > 0 else 0.0,
        'cosine_to_first_order': dot / (first_norm * result_norm) if first_norm > 0 and result_norm > 0 else 0.0,
        'term_growth': _norm(last_term) / term0 if term0 > 0 else 0.0,
    }


def exact(train_loss: Loss, val_loss: Loss, weights: Tensors, alphas: Tensors, *,
          max_weights: int = EXACT_MAX_WEIGHTS, reduce: Reduce = _identity) -> tuple[torch.Tensor, ...]:
    """The implicit hypergradient with the inverse Hessian by a dense solve: ``g_a - M . H^-1 . v``.

    For small problems, tests and diagnostics: it builds the full ``n x n`` weight Hessian with n Hessian-vector
    products, so it refuses more than ``max_weights`` weights. H must be non-singular (a strict local minimum of
    L_train); a singular H raises ``torch.linalg.LinAlgError``.
    """
    _check(weights, alphas)
    n = sum(w.numel() for w in weights)
    if n > max_weights:
        raise ValueError(f'exact() builds a dense {n} x {n} Hessian; that is more than max_weights={max_weights}. '
                         'Use neumann() for a supernet of this size, or raise max_weights.')
    val_grad_w, val_grad_a = _split_val_grads(val_loss, weights, alphas, reduce)

    train_grads = _grad(train_loss(), weights, create_graph=True)
    # Row i of H is the Hessian-vector product with the i-th unit vector.
    eye = torch.eye(n, dtype=weights[0].dtype, device=weights[0].device)
    hessian = torch.stack([
        torch.cat([h.reshape(-1) for h in _vjp(train_grads, weights, _unflatten(eye[i], weights))])
        for i in range(n)
    ])
    (hessian,) = reduce((hessian,))  # the mean of the rank Hessians is the global one (one reduction, not n)
    v = torch.cat([g.reshape(-1) for g in val_grad_w])
    solution = torch.linalg.solve(hessian, v)
    mixed = reduce(_vjp(train_grads, alphas, _unflatten(solution, weights)))
    return tuple(ga - m for ga, m in zip(val_grad_a, mixed))


def power_iteration(train_loss: Loss, weights: Tensors, vector: Tensors, *, iters: int,
                    reduce: Reduce = _identity) -> tuple[float, tuple[torch.Tensor, ...]]:
    """``iters`` steps of the power iteration on ``H = d2_w L_train`` from ``vector``: ``(estimate, next vector)``.

    The estimate is ``|H u|`` for the last unit vector u, with the sign of ``u . H u``: it tends to the eigenvalue of
    largest magnitude, and its magnitude never exceeds ``max |lambda|`` (so ``gamma * |estimate| <= c`` is a bound on
    ``gamma * |lambda|`` in the limit). The norm, not the Rayleigh quotient, because on an indefinite H whose extreme
    eigenvalues have similar magnitudes (a supernet away from a minimum) the vector mixes both eigenvectors and the
    Rayleigh quotient cancels towards 0, while ``|H u|`` stays ``max |lambda|``. A strongly negative estimate shows
    H is far from a minimum. The returned vector is the last ``H u``: pass it back as ``vector`` to continue (a
    warm start), e.g. a few steps per architecture step while the weights move. One forward pass and ``iters``
    Hessian-vector products; the weights are not changed.
    """
    if not weights:
        raise ValueError('No weights were given: there is no Hessian to estimate.')
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f'iters must be an integer >= 1, got {iters!r}.')
    current = [v.detach() for v in vector]
    train_grads = _grad(train_loss(), weights, create_graph=True)
    estimate = 0.0
    for _ in range(iters):
        norm = torch.sqrt(_dot(current, current))
        if not norm > 0:
            raise ValueError('The power iteration reached a zero vector (H u = 0): restart it from a random vector.')
        current = [v / norm for v in current]
        product = reduce(_vjp(train_grads, weights, current))
        rayleigh = float(_dot(current, product))
        estimate = math.copysign(float(torch.sqrt(_dot(product, product))), rayleigh)
        current = [p.detach() for p in product]
    return estimate, tuple(current)


def random_vector(weights: Tensors, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A start vector for :func:`power_iteration` shaped like ``weights``, the same on every rank for one seed."""
    generator = torch.Generator(device='cpu').manual_seed(seed)
    return tuple(torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device) for w in weights)


def largest_eigenvalue(train_loss: Loss, weights: Tensors, *, iters: int = 30, seed: int = 0,
                       reduce: Reduce = _identity) -> float:
    """Estimate ``lambda_max(d2_w L_train)`` by :func:`power_iteration` from a random vector, to choose ``gamma``.

    :func:`neumann` converges only when ``0 < gamma < 2 / lambda_max`` (and H is positive definite). One forward
    pass and ``iters`` backward passes; the result is the eigenvalue of largest magnitude (see
    :func:`power_iteration`). The weights are not changed.
    """
    if not weights:
        raise ValueError('No weights were given: there is no Hessian to estimate.')
    return power_iteration(train_loss, weights, random_vector(weights, seed), iters=iters, reduce=reduce)[0]


def auto_gamma(lr: float, lambda_max: float, scale: float = AUTO_GAMMA_SCALE) -> float:
    """``min(lr, scale / |lambda_max|)``: the paper's gamma = lr unless the curvature makes it too large.

    The magnitude is used because the power iteration returns the eigenvalue of largest magnitude, which may be
    negative; ``gamma * |lambda| <= scale`` bounds the series's factors either way.
    """
    if not lr > 0:
        raise ValueError(f'lr must be > 0, got {lr}.')
    if not scale > 0:
        raise ValueError(f'scale must be > 0, got {scale}.')
    magnitude = abs(lambda_max)
    return lr if magnitude == 0 or not math.isfinite(magnitude) else min(lr, scale / magnitude)
