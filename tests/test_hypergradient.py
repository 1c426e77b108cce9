"""The hypergradient functions against closed forms, dense solves and finite differences."""

from __future__ import annotations

import pytest
import torch

from nni_idarts import hypergradient as hg

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


class Quadratic:
    """A bilevel problem whose every derivative is known in closed form.

    L_train(w, a) = 1/2 w'Aw - w'Ba            (A symmetric positive definite, so w*(a) = A^-1 B a)
    L_val(w, a)   = 1/2 |w - t|^2 + a'Ew + c'a

    H = A, d2_{a,w} L_train = -B', grad_a L_val = Ew + c, grad_w L_val = w - t + E'a.
    """

    def __init__(self, n: int = 5, m: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0,
                 eigenvalues: tuple[float, float] = (0.5, 2.0)):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        eigenvalues = torch.linspace(*eigenvalues, n, dtype=torch.float64)  # type: ignore[assignment]
        self.A = (q @ torch.diag(eigenvalues) @ q.T).to(dtype)
        self.B = torch.randn(n, m, generator=g, dtype=torch.float64).to(dtype)
        self.E = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)
        self.t = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        self.c = torch.randn(m, generator=g, dtype=torch.float64).to(dtype)
        # Two weight tensors and two alpha tensors, to exercise the tuple handling.
        w = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        a = torch.randn(m, generator=g, dtype=torch.float64).to(dtype)
        self.weights = [w[:2].clone().requires_grad_(), w[2:].clone().requires_grad_()]
        self.alphas = [a[:1].clone().requires_grad_(), a[1:].clone().requires_grad_()]

    @property
    def w(self) -> torch.Tensor:
        return torch.cat(self.weights)

    @property
    def a(self) -> torch.Tensor:
        return torch.cat(self.alphas)

    def train_loss(self) -> torch.Tensor:
        w, a = self.w, self.a
        return 0.5 * w @ self.A @ w - w @ self.B @ a

    def val_loss(self) -> torch.Tensor:
        w, a = self.w, self.a
        return 0.5 * (w - self.t) @ (w - self.t) + a @ self.E @ w + self.c @ a

    # closed forms, with detached values
    def grad_a_val(self, w: torch.Tensor) -> torch.Tensor:
        return self.E @ w + self.c

    def grad_w_val(self, w: torch.Tensor) -> torch.Tensor:
        return w - self.t + self.E.T @ self.a.detach()


def _cat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.parametrize('dtype', DTYPES)
def test_first_order_is_the_partial_alpha_gradient(dtype):
    p = Quadratic(dtype=dtype)
    w = p.w.detach()
    got = hg.first_order(p.val_loss, p.weights, p.alphas)
    assert [g.shape for g in got] == [a.shape for a in p.alphas]
    assert all(g.dtype == dtype for g in got)
    torch.testing.assert_close(_cat(got), p.grad_a_val(w), **TOL[dtype])


@pytest.mark.parametrize('dtype', DTYPES)
def test_unrolled_matches_the_closed_form(dtype):
    p = Quadratic(dtype=dtype)
    lr = 0.1
    w, a = p.w.detach(), p.a.detach()
    w_prime = w - lr * (p.A @ w - p.B @ a)
    # grad_a L_val(w', a) - lr * (-B') (grad_w' L_val(w', a))
    expected = p.grad_a_val(w_prime) + lr * p.B.T @ p.grad_w_val(w_prime)
    got = hg.unrolled(p.train_loss, p.val_loss, p.weights, p.alphas, lr=lr)
    torch.testing.assert_close(_cat(got), expected, **TOL[dtype])


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('K', [0, 1, 2, 7])
def test_neumann_matches_the_closed_form(dtype, K):
    p = Quadratic(dtype=dtype)
    gamma = 0.3
    w = p.w.detach()
    n = len(w)
    series = sum(torch.linalg.matrix_power(torch.eye(n, dtype=dtype) - gamma * p.A, k) for k in range(K + 1))
    expected = p.grad_a_val(w) + gamma * p.B.T @ series @ p.grad_w_val(w)
    got = hg.neumann(p.train_loss, p.val_loss, p.weights, p.alphas, K=K, gamma=gamma)
    torch.testing.assert_close(_cat(got), expected, **TOL[dtype])


@pytest.mark.parametrize('dtype', DTYPES)
def test_exact_matches_the_closed_form_and_neumann_converges_to_it(dtype):
    p = Quadratic(dtype=dtype)
    w = p.w.detach()
    expected = p.grad_a_val(w) + p.B.T @ torch.linalg.solve(p.A, p.grad_w_val(w))
    got = _cat(hg.exact(p.train_loss, p.val_loss, p.weights, p.alphas))
    torch.testing.assert_close(got, expected, **TOL[dtype])
    # eigenvalues of A lie in [0.5, 2]: gamma = 0.5 makes |1 - gamma * lambda| <= 0.75, so the series converges.
    errors = [(_cat(hg.neumann(p.train_loss, p.val_loss, p.weights, p.alphas, K=K, gamma=0.5)) - got).norm().item()
              for K in (0, 5, 20, 80)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4 * got.norm().item()


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('K', [0, 1, 3])
def test_damped_neumann_matches_the_closed_form(dtype, K):
    p = Quadratic(dtype=dtype, eigenvalues=(-0.6, 2.0))  # an indefinite H, as on a supernet away from a minimum
    gamma, damping = 0.5, 0.9
    w, n = p.w.detach(), len(p.w)
    step = torch.eye(n, dtype=dtype) - gamma * (p.A + damping * torch.eye(n, dtype=dtype))
    series = sum(torch.linalg.matrix_power(step, k) for k in range(K + 1))
    expected = p.grad_a_val(w) + gamma * p.B.T @ series @ p.grad_w_val(w)
    got = hg.neumann(p.train_loss, p.val_loss, p.weights, p.alphas, K=K, gamma=gamma, damping=damping)
    torch.testing.assert_close(_cat(got), expected, **TOL[dtype])


def test_damping_makes_the_series_converge_on_an_indefinite_hessian():
    """eig(H) in [-0.6, 2]: undamped, the factor 1 + 0.6 gamma > 1 makes the terms grow; with damping 0.9 > 0.6 and
    gamma (2 + 0.9) = 1.45 < 2 every factor of (I - gamma (H + damping I)) lies in (-0.45, 0.85), and the series
    converges to the damped closed form ``g_a - M (H + damping I)^-1 v``."""
    p = Quadratic(eigenvalues=(-0.6, 2.0))
    gamma, damping = 0.5, 0.9
    w, n = p.w.detach(), len(p.w)
    damped = p.grad_a_val(w) + p.B.T @ torch.linalg.solve(p.A + damping * torch.eye(n, dtype=p.A.dtype),
                                                         p.grad_w_val(w))

    def run(K, d):
        info: dict = {}
        got = _cat(hg.neumann(p.train_loss, p.val_loss, p.weights, p.alphas, K=K, gamma=gamma, damping=d,
                              diagnostics=info))
        return got, info

    errors = [(run(K, damping)[0] - damped).norm().item() for K in (0, 10, 40, 250)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12 * damped.norm().item(), errors
    assert run(40, damping)[1]['term_growth'] < 1e-2
    # undamped, the terms grow along the negative-curvature direction (factor 1.3 per term)
    undamped = [run(K, 0.0)[1]['term_growth'] for K in (10, 40)]
    assert 1 < undamped[0] < undamped[1], undamped
    with pytest.raises(ValueError, match='damping must be >= 0'):
        hg.neumann(p.train_loss, p.val_loss, p.weights, p.alphas, K=1, gamma=gamma, damping=-0.1)


@pytest.mark.parametrize('K', [0, 3])
def test_neumann_diagnostics_match_their_closed_forms(K):
    p = Quadratic()
    gamma = 0.3
    w, n = p.w.detach(), len(p.w)
    step = torch.eye(n, dtype=p.A.dtype) - gamma * p.A
    v = p.grad_w_val(w)
    correction = -gamma * p.B.T @ sum(torch.linalg.matrix_power(step, k) for k in range(K + 1)) @ v
    first = p.grad_a_val(w)
    result = first - correction
    info: dict = {}
    hg.neumann(p.train_loss, p.val_loss, p.weights, p.alphas, K=K, gamma=gamma, diagnostics=info)
    assert info['correction_ratio'] == pytest.approx((correction.norm() / first.norm()).item(), rel=1e-10)
    cosine = torch.nn.functional.cosine_similarity(result, first, dim=0).item()
    assert info['cosine_to_first_order'] == pytest.approx(cosine, rel=1e-10)
    growth = (torch.linalg.matrix_power(step, K) @ v).norm() / v.norm()
    assert info['term_growth'] == pytest.approx(growth.item(), rel=1e-10)
    assert (info['term_growth'] < 1) == (K > 0)  # eig(H) in [0.5, 2], gamma 0.3: every term shrinks


def test_power_iteration_warm_start_continues_where_it_stopped():
    p = Quadratic(eigenvalues=(-0.6, 2.0))  # dominant eigenvalue 2.0
    start = hg.random_vector(p.weights, seed=3)
    at_once, _ = hg.power_iteration(p.train_loss, p.weights, start, iters=12)
    estimate, vector = hg.power_iteration(p.train_loss, p.weights, start, iters=5)
    resumed, _ = hg.power_iteration(p.train_loss, p.weights, vector, iters=7)
    assert resumed == pytest.approx(at_once, rel=1e-12)
    assert abs(resumed - 2.0) < abs(estimate - 2.0)
    converged, _ = hg.power_iteration(p.train_loss, p.weights, vector, iters=200)
    assert converged == pytest.approx(2.0, rel=1e-8)
    assert [v.shape for v in vector] == [w.shape for w in p.weights]
    assert hg.auto_gamma(0.1, converged) == pytest.approx(0.1)            # lr already below 1 / lambda_max
    assert hg.auto_gamma(0.9, converged) == pytest.approx(0.5)            # capped at 1 / lambda_max
    assert hg.auto_gamma(0.9, -4.0) == pytest.approx(0.25)                # a dominant negative eigenvalue counts too


def test_exact_at_the_inner_solution_is_the_total_derivative():
    """At w = w*(a) the implicit gradient is d/da L_val(w*(a), a): check it by central differences."""
    p = Quadratic(dtype=torch.float64)
    a = p.a.detach()
    w_star = torch.linalg.solve(p.A, p.B @ a)
    with torch.no_grad():
        p.weights[0].copy_(w_star[:2])
        p.weights[1].copy_(w_star[2:])

    def response(alpha: torch.Tensor) -> torch.Tensor:
        w = torch.linalg.solve(p.A, p.B @ alpha)
        return 0.5 * (w - p.t) @ (w - p.t) + alpha @ p.E @ w + p.c @ alpha

    eps = 1e-6
    finite = torch.stack([(response(a + eps * e) - response(a - eps * e)) / (2 * eps)
                          for e in torch.eye(len(a), dtype=torch.float64)])
    got = _cat(hg.exact(p.train_loss, p.val_loss, p.weights, p.alphas))
    torch.testing.assert_close(got, finite, rtol=1e-6, atol=1e-7)


class TinySupernet(torch.nn.Module):
    """A nonlinear mixed-op network: softmax(alpha) weights three candidate layers, as a DARTS edge does."""

    def __init__(self, dtype=torch.float64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ops = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)]).to(dtype)
        self.head = torch.nn.Linear(4, 3).to(dtype)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
        self.alpha = torch.nn.Parameter(torch.randn(3, generator=g, dtype=dtype) * 0.1)
        self.x_train = torch.randn(32, 4, generator=g, dtype=dtype)
        self.y_train = torch.randint(0, 3, (32,), generator=g)
        self.x_val = torch.randn(32, 4, generator=g, dtype=dtype)
        self.y_val = torch.randint(0, 3, (32,), generator=g)
        self.weight_decay = 1e-2

    def weights(self):
        return [p for name, p in self.named_parameters() if name != 'alpha']

    def forward(self, x):
        mix = torch.softmax(self.alpha, 0)
        h = sum(m * torch.tanh(op(x)) for m, op in zip(mix, self.ops))
        return self.head(h)

    def train_loss(self):
        l2 = sum((p * p).sum() for p in self.weights())
        return torch.nn.functional.cross_entropy(self(self.x_train), self.y_train) + 0.5 * self.weight_decay * l2

    def val_loss(self):
        return torch.nn.functional.cross_entropy(self(self.x_val), self.y_val)


def test_unrolled_matches_finite_differences_of_the_one_step_objective():
    net = TinySupernet()
    lr = 0.5
    weights = net.weights()
    got = hg.unrolled(net.train_loss, net.val_loss, weights, [net.alpha], lr=lr)[0]

    def one_step_objective(alpha: torch.Tensor) -> float:
        with torch.no_grad():
            saved_alpha = net.alpha.detach().clone()
            saved_w = [w.detach().clone() for w in weights]
            net.alpha.copy_(alpha)
        grads = torch.autograd.grad(net.train_loss(), weights)
        with torch.no_grad():
            for w, g in zip(weights, grads):
                w.sub_(lr * g)
            value = net.val_loss().item()
            for w, s in zip(weights, saved_w):
                w.copy_(s)
            net.alpha.copy_(saved_alpha)
        return value

    eps = 1e-6
    alpha = net.alpha.detach()
    finite = torch.tensor([(one_step_objective(alpha + eps * e) - one_step_objective(alpha - eps * e)) / (2 * eps)
                           for e in torch.eye(3, dtype=torch.float64)], dtype=torch.float64)
    torch.testing.assert_close(got, finite, rtol=1e-5, atol=1e-8)
    # and it is not just the first-order term
    first = hg.first_order(net.val_loss, weights, [net.alpha])[0]
    assert (got - first).norm() > 1e-3 * got.norm()


@pytest.mark.parametrize('name', ['first_order', 'unrolled', 'neumann', 'exact'])
def test_functions_leave_weights_bit_for_bit_and_write_no_grad(name):
    net = TinySupernet(dtype=torch.float32)
    weights = net.weights()
    before = [w.detach().clone() for w in weights]
    alpha_before = net.alpha.detach().clone()
    call = {
        'first_order': lambda: hg.first_order(net.val_loss, weights, [net.alpha]),
        'unrolled': lambda: hg.unrolled(net.train_loss, net.val_loss, weights, [net.alpha], lr=0.1),
        'neumann': lambda: hg.neumann(net.train_loss, net.val_loss, weights, [net.alpha], K=3, gamma=0.1),
        'exact': lambda: hg.exact(net.train_loss, net.val_loss, weights, [net.alpha]),
    }[name]
    result = call()
    assert result[0].dtype == torch.float32 and result[0].shape == net.alpha.shape
    assert torch.isfinite(result[0]).all()
    for w, b in zip(weights, before):
        assert torch.equal(w, b)
        assert w.grad is None
    assert torch.equal(net.alpha, alpha_before) and net.alpha.grad is None


def test_unused_weights_and_alphas_get_zero_contributions():
    w_used = torch.tensor([1.0, 2.0], requires_grad=True)
    w_unused = torch.tensor([3.0], requires_grad=True)
    a_used = torch.tensor([0.5], requires_grad=True)
    a_unused = torch.tensor([0.1, 0.2], requires_grad=True)

    def train_loss():
        return (w_used ** 2).sum() - a_used.sum() * w_used.sum()

    def val_loss():
        return (w_used - 1).pow(2).sum()

    for result in (hg.neumann(train_loss, val_loss, [w_used, w_unused], [a_used, a_unused], K=2, gamma=0.1),
                   hg.unrolled(train_loss, val_loss, [w_used, w_unused], [a_used, a_unused], lr=0.1),
                   hg.exact(train_loss, val_loss, [w_used], [a_used, a_unused])):
        assert torch.equal(result[1], torch.zeros(2))
        assert result[0].abs().item() > 0


def test_bad_arguments_are_refused_with_clear_messages():
    p = Quadratic()
    with pytest.raises(ValueError, match='K .* >= 0'):
        hg.neumann(p.train_loss, p.val_loss, p.weights, p.alphas, K=-1, gamma=0.1)
    with pytest.raises(ValueError, match='gamma must be > 0'):
        hg.neumann(p.train_loss, p.val_loss, p.weights, p.alphas, gamma=0.0)
    with pytest.raises(ValueError, match='lr must be > 0'):
        hg.unrolled(p.train_loss, p.val_loss, p.weights, p.alphas, lr=-1.0)
    with pytest.raises(ValueError, match='No architecture parameters'):
        hg.first_order(p.val_loss, p.weights, [])
    with pytest.raises(ValueError, match='max_weights=3'):
        hg.exact(p.train_loss, p.val_loss, p.weights, p.alphas, max_weights=3)
    with pytest.raises(ValueError, match='requires_grad'):
        hg.first_order(p.val_loss, p.weights, [torch.zeros(2)])


@pytest.mark.parametrize('dtype', DTYPES)
def test_largest_eigenvalue_finds_lambda_max_for_choosing_gamma(dtype):
    p = Quadratic(dtype=dtype)  # eigenvalues of A: linspace(0.5, 2.0, 5)
    estimate = hg.largest_eigenvalue(p.train_loss, p.weights, iters=200)
    assert estimate == pytest.approx(2.0, rel=1e-4)
    # with gamma = 1 / lambda_max the Neumann series converges to exact; with gamma > 2 / lambda_max it diverges
    exact = _cat(hg.exact(p.train_loss, p.val_loss, p.weights, p.alphas))
    good = _cat(hg.neumann(p.train_loss, p.val_loss, p.weights, p.alphas, K=60, gamma=1 / estimate))
    bad = _cat(hg.neumann(p.train_loss, p.val_loss, p.weights, p.alphas, K=60, gamma=2.5 / estimate))
    assert (good - exact).norm() < 1e-3 * exact.norm()
    assert (bad - exact).norm() > exact.norm()
    with pytest.raises(ValueError, match='iters'):
        hg.largest_eigenvalue(p.train_loss, p.weights, iters=0)


class BatchNormSupernet(torch.nn.Module):
    """conv -> BatchNorm (training mode: batch statistics) -> a softmax(alpha)-weighted mix of two ops -> linear."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.op_a = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.head = torch.nn.Linear(3 * 4 * 4, 4)
        self.alpha = torch.nn.Parameter(torch.randn(2) * 0.5)
        self.double().train()
        self.x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
        self.y = torch.arange(8) % 4

    def weights(self) -> list[torch.Tensor]:
        return [p for n, p in self.named_parameters() if n != 'alpha']

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        mix = torch.softmax(self.alpha, 0)
        h = mix[0] * torch.tanh(self.op_a(h)) + mix[1] * h
        return self.head(h.flatten(1))

    def train_loss(self) -> torch.Tensor:
        l2 = sum((w * w).sum() for w in self.weights())
        return torch.nn.functional.cross_entropy(self(self.x), self.y) + 0.5 * 1e-2 * l2


def test_hessian_and_mixed_products_match_finite_differences_through_batchnorm():
    """H.u (the power iteration's product) and M.u (neumann with K=0 and L_val = <u, w>: v = u, g_a = 0, so the
    result is -gamma M u) against central differences of grad_w L_train and grad_a L_train along u."""
    net = BatchNormSupernet()
    weights = net.weights()
    u = hg.random_vector(weights, seed=5)
    u_norm = torch.sqrt(sum((t * t).sum() for t in u))

    def grads_at(step: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            for w, d in zip(weights, u):
                w.add_(d, alpha=step)
        try:
            g = torch.autograd.grad(net.train_loss(), [*weights, net.alpha])
        finally:
            with torch.no_grad():
                for w, d in zip(weights, u):
                    w.sub_(d, alpha=step)
        return _cat(g[:-1]), g[-1]

    eps = 1e-5
    (gw_plus, ga_plus), (gw_minus, ga_minus) = grads_at(eps), grads_at(-eps)
    hu_finite, mu_finite = (gw_plus - gw_minus) / (2 * eps), (ga_plus - ga_minus) / (2 * eps)

    _, product = hg.power_iteration(net.train_loss, weights, u, iters=1)  # H (u / |u|)
    torch.testing.assert_close(_cat(product) * u_norm, hu_finite, rtol=1e-6, atol=1e-8)

    def val_loss() -> torch.Tensor:
        return sum((w * d).sum() for w, d in zip(weights, u))

    gamma = 0.3
    (got,) = hg.neumann(net.train_loss, val_loss, weights, [net.alpha], K=0, gamma=gamma)
    torch.testing.assert_close(-got / gamma, mu_finite, rtol=1e-6, atol=1e-8)
    assert mu_finite.abs().max() > 1e-3 and hu_finite.abs().max() > 1e-2  # the products are not trivially zero
