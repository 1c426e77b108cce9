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
from torch.utils.data import Subset, TensorDataset

from search_probes import StepRecorder, TinySpace, fingerprints
from search_spaces import DigitsMLPSpace

QUIET = {'enable_progress_bar': False, 'enable_model_summary': False}


@pytest.fixture(scope='module')
def splits():
    return digits_splits(seed=0)


def run(strategy, splits, tmp_path, *, epochs=2, space=None, learning_rate=0.1, val=None, trainer_kwargs=QUIET,
        **kwargs):
    torch.manual_seed(0)
    space = space if space is not None else DigitsMLPSpace()
    return search(space, splits.train, splits.val if val is None else val, strategy, epochs=epochs,
                  learning_rate=learning_rate, seed=0, workdir=str(tmp_path), trainer_kwargs=trainer_kwargs, **kwargs)


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


def _paper_loop(space_seed, train, val, *, mode, T, steps, batch_size, lr, weight_decay, arc_lr, K=1):
    """The paper's search loop written out: T SGD steps on consecutive training batches, then one Adam step of the
    alphas on the next validation batch, with L_val on that batch and L_train = the last training batch's loss plus
    the SGD's L2 term; NNI's supernet, NNI's optimizer settings (SGD momentum 0.9; Adam betas (0.5, 0.999), wd 1e-3)."""
    torch.manual_seed(space_seed)
    space = TinySpace()
    torch.manual_seed(space_seed)  # as search(seed=...) does before NNI draws the alphas
    helper = DARTS()
    net = helper.mutate_model(space)
    arch_ids = {id(a) for a in helper._arch_parameters.values()}
    alphas = [p for p in net.parameters() if id(p) in arch_ids]
    weights = [p for p in net.parameters() if id(p) not in arch_ids]
    weight_opt = torch.optim.SGD(weights, lr=lr, momentum=0.9, weight_decay=weight_decay)
    arch_opt = torch.optim.Adam(alphas, lr=arc_lr, betas=(0.5, 0.999), weight_decay=1e-3)
    loss = nn.CrossEntropyLoss()
    train_batches = [train.tensors[i][:len(train.tensors[0]) // batch_size * batch_size].split(batch_size)
                     for i in (0, 1)]
    val_batches = list(zip(*[val.tensors[i].split(batch_size) for i in (0, 1)]))
    val_position = 0
    for step in range(steps):
        x, y = (part[step % len(part)] for part in train_batches)  # epochs in the same order (no shuffling)
        weight_opt.zero_grad()
        loss(net(x), y).backward()
        weight_opt.step()
        if (step + 1) % T:
            continue
        xv, yv = val_batches[val_position % len(val_batches)]
        val_position += 1
        train_loss = lambda: loss(net(x), y) + 0.5 * weight_decay * sum((w * w).sum() for w in weights)  # noqa: E731
        val_loss = lambda: loss(net(xv), yv)  # noqa: E731
        if mode == 'first_order':
            grads = hypergradient.first_order(val_loss, weights, alphas)
        else:
            grads = hypergradient.neumann(train_loss, val_loss, weights, alphas, K=K, gamma=lr)
        arch_opt.zero_grad()
        for alpha, grad in zip(alphas, grads):
            alpha.grad = grad
        arch_opt.step()
    return [a.detach() for a in alphas], torch.cat([w.detach().reshape(-1) for w in weights])


@pytest.mark.parametrize('mode, T', [('first_order', 1), ('implicit', 2)])
def test_search_is_the_paper_loop_step_for_step(splits, tmp_path, mode, T):
    """Every weight step, and every architecture step (L_val on the next validation batch, L_train on the last
    training batch plus the optimizer's L2), equals the loop written out with :mod:`nni_idarts.hypergradient`.

    This replaces the former "first_order with T=1 is NNI's DARTS": NNI's DARTS takes its architecture step before
    the weight step of each batch (the first one at the initial weights) and on the validation batch loaded beside
    it; the paper's loop takes it after the weight steps. With T=1 the two are the same alternation of steps but
    shifted by one weight step, so their alphas differ.
    """
    train = TensorDataset(*[t[:96] for t in splits.train.tensors])
    val = TensorDataset(*[t[:64] for t in splits.val.tensors])
    options = dict(batch_size=32, lr=0.1, weight_decay=3e-4, arc_lr=0.05)
    expected_alphas, expected_weights = _paper_loop(0, train, val, mode=mode, T=T, steps=6, **options)

    torch.manual_seed(0)
    strategy = IDartsStrategy(hypergradient=mode, K=1, inner_steps=T, arc_learning_rate=options['arc_lr'])
    search(TinySpace(), train, val, strategy, epochs=2, batch_size=32, learning_rate=options['lr'],
           learning_rate_min=None, weight_decay=options['weight_decay'], seed=0, shuffle=False,
           workdir=str(tmp_path), trainer_kwargs=QUIET)
    module = strategy.oneshot_module
    got_weights = torch.cat([w.detach().reshape(-1) for w in module.weight_parameters()])
    torch.testing.assert_close(got_weights, expected_weights, rtol=1e-5, atol=1e-6)
    for got, expected in zip(module.arch_parameters(), expected_alphas):
        assert (expected - expected.mean()).abs().max() > 0.05  # the alphas moved: the comparison is not trivial
        torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)


def test_one_architecture_step_after_every_inner_steps_weight_steps_across_epochs(splits, tmp_path):
    strategy = IDartsStrategy(inner_steps=5, arc_learning_rate=0.03)
    run(strategy, splits, tmp_path, epochs=3, batch_size=64)
    batches_per_epoch = -(-len(splits.train) // 64)
    assert batches_per_epoch % 5 != 0  # else counting within each epoch would give the same number
    arc_optimizer = strategy.oneshot_module.architecture_optimizers().optimizer
    steps = {int(state['step']) for state in arc_optimizer.state.values()}
    assert steps == {3 * batches_per_epoch // 5}  # after weight steps 5, 10, ...: none before the first weight step


def test_every_validation_batch_is_used_once_per_pass(splits, tmp_path):
    """The architecture steps draw their validation batches from a stream of their own: with T=3 they go through the
    validation set batch after batch (none loaded and left unused), one pass after another across epochs."""
    recorder = StepRecorder()
    strategy = IDartsStrategy(inner_steps=3, arc_learning_rate=0.03)
    val = Subset(splits.val, range(96))  # 3 batches of 32
    run(strategy, splits, tmp_path, epochs=2, batch_size=32, val=val, trainer_kwargs={**QUIET, 'callbacks': [recorder]})
    drawn = [step['val_samples'] for step in recorder.steps]
    assert all(bool(d) == ((i + 1) % 3 == 0) for i, d in enumerate(drawn))
    drawn = [d for d in drawn if d]
    assert len(drawn) >= 6
    all_val = sorted(fingerprints(torch.stack([val[i][0] for i in range(len(val))])))
    for start in range(0, len(drawn) - 2, 3):  # each consecutive run of 3 batches is one pass over the 96 samples
        assert sorted(sum(drawn[start:start + 3], [])) == all_val


def test_unrolled_alternates_one_weight_step_and_one_architecture_step_by_default():
    assert IDartsStrategy(hypergradient='unrolled').inner_steps == 1
    assert IDartsStrategy(hypergradient='implicit').inner_steps == 5
    assert IDartsStrategy(hypergradient='first_order').inner_steps == 5
    assert IDartsStrategy(hypergradient='unrolled', inner_steps=3).inner_steps == 3


@pytest.mark.parametrize('mode', ['implicit', 'unrolled'])
def test_second_order_modes_follow_the_annealed_weight_learning_rate_by_default(splits, tmp_path, mode):
    function = 'neumann' if mode == 'implicit' else 'unrolled'
    seen = []
    real = getattr(hypergradient, function)

    def spy(*args, **kwargs):
        seen.append(kwargs['gamma'] if mode == 'implicit' else kwargs['lr'])
        return real(*args, **kwargs)

    with mock.patch.object(hypergradient, function, spy):
        strategy = IDartsStrategy(hypergradient=mode, arc_learning_rate=0.03, inner_steps=4)
        run(strategy, splits, tmp_path, epochs=2, learning_rate=0.07, learning_rate_min=0.01)
    # cosine annealing per epoch over 2 epochs: 0.07 in epoch 0, (0.07 + 0.01) / 2 in epoch 1
    per_epoch = -(-len(splits.train) // 64)
    expected = [0.07 if (4 * i + 3) // per_epoch == 0 else 0.04 for i in range(2 * per_epoch // 4)]
    assert seen == pytest.approx(expected)
    assert strategy.oneshot_module.trainer.callback_metrics['lr'] == pytest.approx(0.04)


def test_gamma_auto_estimates_lambda_max_and_caps_gamma(splits, tmp_path):
    iters, estimates, gammas = [], [], []
    power, series = hypergradient.power_iteration, hypergradient.neumann

    def spy_power(*args, **kwargs):
        iters.append(kwargs['iters'])
        result = power(*args, **kwargs)
        estimates.append(result[0])
        return result

    def spy_series(*args, **kwargs):
        gammas.append((kwargs['gamma'], estimates[-1]))
        return series(*args, **kwargs)

    with mock.patch.object(hypergradient, 'power_iteration', spy_power), \
            mock.patch.object(hypergradient, 'neumann', spy_series):
        strategy = IDartsStrategy(gamma='auto', arc_learning_rate=0.03, inner_steps=1)
        run(strategy, splits, tmp_path, epochs=1, learning_rate=5.0, learning_rate_min=None)
    arch_steps = -(-len(splits.train) // 64)
    # 10 products at the first architecture step, then 2 every 5 steps, warm-started
    assert iters == [10] + [2] * ((arch_steps - 1) // 5)
    assert len(gammas) == arch_steps
    assert all(gamma == pytest.approx(min(5.0, 1 / abs(estimate))) for gamma, estimate in gammas)
    assert any(gamma < 5.0 for gamma, _ in gammas)  # lr 5.0 exceeds 1 / lambda_max early on: 'auto' capped it
    metrics = strategy.oneshot_module.trainer.callback_metrics
    assert metrics['lambda_max'] == pytest.approx(estimates[-1])
    assert metrics['gamma'] == pytest.approx(gammas[-1][0])
    for key in ('correction_ratio', 'cosine_to_first_order', 'term_growth'):
        assert torch.isfinite(metrics[key])


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
    ({'gamma': 'automatic'}, "gamma must be a number > 0, None .* or 'auto'"),
    ({'gamma': float('inf')}, 'gamma must be a number > 0'),
    ({'damping': -0.1}, 'damping must be a number >= 0'),
    ({'damping': 'big'}, 'damping must be a number >= 0'),
    ({'inner_steps': 1.5}, 'inner_steps must be an integer >= 1'),
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
