"""IDartsStrategy end to end on digits: NNI's mutation hooks, export, real weight training and NNI DARTS parity."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn as nn
from nni.nas.nn.pytorch import InputChoice, LayerChoice, ModelSpace
from nni.nas.strategy import DARTS

from nni_idarts import IDartsStrategy, hypergradient
from nni_idarts.data import digits_splits
from nni_idarts.search import search
from search_spaces import DigitsMLPSpace

QUIET = {'enable_progress_bar': False, 'enable_model_summary': False}


@pytest.fixture(scope='module')
def splits():
    return digits_splits(seed=0)


def run(strategy, splits, tmp_path, *, epochs=2, space=None, learning_rate=0.1, **kwargs):
    torch.manual_seed(0)
    space = space if space is not None else DigitsMLPSpace()
    return search(space, splits.train, splits.val, strategy, epochs=epochs, learning_rate=learning_rate, seed=0,
                  workdir=str(tmp_path), trainer_kwargs=QUIET, **kwargs)


def alphas_of(strategy) -> dict[str, torch.Tensor]:
    return {label: alpha.detach().clone() for label, alpha in strategy._arch_parameters.items()}


def supernet_accuracy(strategy, dataset) -> float:
    supernet = strategy.supernet.eval()
    x, y = dataset.tensors
    with torch.no_grad():
        return (supernet(x).argmax(1) == y).float().mean().item()


def test_search_exports_every_label_moves_alphas_and_trains_weights(splits, tmp_path):
    space = DigitsMLPSpace()
    stem_before = space.stem.weight.detach().clone()
    strategy = IDartsStrategy(arc_learning_rate=0.03, inner_steps=2)
    result = run(strategy, splits, tmp_path, epochs=10, space=space)

    # a choice for every label, each one of that label's candidates
    assert set(result.arch) == {'width', 'op', 'skip'}
    assert result.arch['width'] in (16, 32)
    assert result.arch['op'] in ('linear_relu', 'linear_tanh', 'identity')
    assert result.arch['skip'] in ([0], [1])
    # the alphas moved away from their ~1e-3 initialisation, and the export follows them
    alphas = alphas_of(strategy)
    assert all(a.abs().max() > 0.01 for a in alphas.values()), alphas
    assert result.arch['op'] == max(result.probs['op'], key=result.probs['op'].get)
    # the supernet weights themselves were trained (not a copy): the stem changed and the net classifies digits
    assert not torch.equal(space.stem.weight.detach(), stem_before)
    assert supernet_accuracy(strategy, splits.val) > 0.8
    metrics = strategy.oneshot_module.trainer.callback_metrics
    assert {'train_loss', 'train_acc', 'val_loss', 'val_acc'} <= set(metrics)
    assert torch.isfinite(metrics['hypergradient_norm']) and metrics['hypergradient_norm'] > 0
    assert any(key.startswith('prob/op/') for key in metrics)


def test_first_order_with_one_inner_step_is_nni_darts(splits, tmp_path):
    ours = IDartsStrategy(hypergradient='first_order', inner_steps=1, arc_learning_rate=0.03)
    theirs = DARTS(arc_learning_rate=0.03)
    ours_result = run(ours, splits, tmp_path / 'ours')
    theirs_result = run(theirs, splits, tmp_path / 'theirs')
    ours_alphas, theirs_alphas = alphas_of(ours), alphas_of(theirs)
    assert ours_alphas.keys() == theirs_alphas.keys()
    for label in ours_alphas:
        assert ours_alphas[label].abs().max() > 0.01
        torch.testing.assert_close(ours_alphas[label], theirs_alphas[label], rtol=1e-5, atol=1e-6)
    assert ours_result.arch == theirs_result.arch


def test_one_architecture_step_per_inner_steps_batches_across_epochs(splits, tmp_path):
    strategy = IDartsStrategy(inner_steps=5, arc_learning_rate=0.03)
    run(strategy, splits, tmp_path, epochs=3, batch_size=64)
    batches_per_epoch = -(-len(splits.train) // 64)
    assert batches_per_epoch % 5 != 0  # else counting within each epoch would give the same number
    arc_optimizer = strategy.oneshot_module.architecture_optimizers().optimizer
    steps = {int(state['step']) for state in arc_optimizer.state.values()}
    assert steps == {-(-3 * batches_per_epoch // 5)}


@pytest.mark.parametrize('mode', ['implicit', 'unrolled'])
def test_second_order_modes_use_the_weight_learning_rate_by_default(splits, tmp_path, mode):
    function = 'neumann' if mode == 'implicit' else 'unrolled'
    seen = []
    real = getattr(hypergradient, function)

    def spy(*args, **kwargs):
        seen.append(kwargs['gamma'] if mode == 'implicit' else kwargs['lr'])
        return real(*args, **kwargs)

    with mock.patch.object(hypergradient, function, spy):
        strategy = IDartsStrategy(hypergradient=mode, arc_learning_rate=0.03)
        run(strategy, splits, tmp_path, epochs=1, learning_rate=0.07)
    assert seen and all(value == pytest.approx(0.07) for value in seen)
    assert all(a.abs().max() > 1e-3 for a in alphas_of(strategy).values())


def test_neumann_terms_change_the_search(splits, tmp_path):
    k0 = IDartsStrategy(K=0, gamma=0.5, arc_learning_rate=0.03, inner_steps=1)
    k3 = IDartsStrategy(K=3, gamma=0.5, arc_learning_rate=0.03, inner_steps=1)
    run(k0, splits, tmp_path / 'k0', epochs=1)
    run(k3, splits, tmp_path / 'k3', epochs=1)
    a0, a3 = alphas_of(k0), alphas_of(k3)
    assert any(not torch.allclose(a0[label], a3[label], atol=1e-6) for label in a0)


@pytest.mark.parametrize('kwargs, message', [
    ({'K': -1}, 'K must be an integer >= 0'),
    ({'K': 1.5}, 'K must be an integer >= 0'),
    ({'inner_steps': 0}, 'inner_steps must be an integer >= 1'),
    ({'gamma': 0.0}, 'gamma must be a number > 0'),
    ({'gamma': -1}, 'gamma must be a number > 0'),
    ({'hypergradient': 'second_order'}, 'hypergradient must be one of'),
    ({'arc_learning_rate': 0}, 'arc_learning_rate must be a number > 0'),
    ({'penalty': {}}, 'does not support the `penalty`'),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IDartsStrategy(**kwargs)


def test_neumann_converges_to_exact_on_a_real_supernet(splits):
    """On an NNI supernet trained to a minimum of L_train, the Neumann hypergradient approaches the dense solve."""

    class Space(ModelSpace):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(16, 6)
            self.op = LayerChoice([nn.Sequential(nn.Linear(6, 6), nn.Tanh()),
                                   nn.Sequential(nn.Linear(6, 6), nn.Sigmoid()), nn.Identity()], label='op')
            self.skip = InputChoice(2, 1, label='skip')
            self.head = nn.Linear(6, 10)

        def forward(self, x):
            h = torch.tanh(self.stem(x))
            return self.head(self.skip([self.op(h), h]))

    torch.manual_seed(0)
    strategy = IDartsStrategy()
    net = strategy.mutate_model(Space()).double()
    arch_ids = {id(a) for a in strategy._arch_parameters.values()}
    alphas = [p for p in net.parameters() if id(p) in arch_ids]
    weights = [p for p in net.parameters() if id(p) not in arch_ids]
    assert len(alphas) == 2
    with torch.no_grad():
        for alpha in alphas:
            alpha.normal_(0, 0.5)

    def features(dataset):
        x, y = dataset.tensors
        return nn.functional.avg_pool2d(x[:200].double(), 2).flatten(1), y[:200]

    (x_train, y_train), (x_val, y_val) = features(splits.train), features(splits.val)

    def train_loss():
        l2 = sum((w * w).sum() for w in weights)
        return nn.functional.cross_entropy(net(x_train), y_train) + 0.5 * 1e-2 * l2

    def val_loss():
        return nn.functional.cross_entropy(net(x_val), y_val)

    optimizer = torch.optim.LBFGS(weights, max_iter=1000, line_search_fn='strong_wolfe',
                                  tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        optimizer.zero_grad()
        loss = train_loss()
        loss.backward()
        return loss

    optimizer.step(closure)
    for w in weights:
        w.grad = None
    grad_norm = torch.cat([g.reshape(-1) for g in torch.autograd.grad(train_loss(), weights)]).norm()
    assert grad_norm < 1e-5  # at the inner solution, where the implicit function theorem holds

    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    exact = flat(hypergradient.exact(train_loss, val_loss, weights, alphas))
    # gamma below 1 / lambda_max: estimate lambda_max by power iteration with Hessian-vector products
    grads = torch.autograd.grad(train_loss(), weights, create_graph=True)
    v = [torch.randn_like(w) for w in weights]
    for _ in range(50):
        hv = torch.autograd.grad(grads, weights, v, retain_graph=True)
        lam = flat(hv).norm() / flat(v).norm()
        v = [h / flat(hv).norm() for h in hv]
    gamma = 0.9 / lam.item()

    errors, cosines = [], []
    for K in (0, 5, 50, 200, 1000):
        approx = flat(hypergradient.neumann(train_loss, val_loss, weights, alphas, K=K, gamma=gamma))
        errors.append(((approx - exact).norm() / exact.norm()).item())
        cosines.append(nn.functional.cosine_similarity(approx, exact, dim=0).item())
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.05 and cosines[-1] > 0.999, (errors, cosines)
