"""No silent freeze (issue 9): a finite hypergradient too large for Adam to square is skipped and counted, an optimizer
state that is not finite after a step is undone, and a search whose alphas never moved says so.

The issue's case: NNI's ShuffleNetSpace at 32x32 gives hypergradients of 1e28..1e35, finite, so they passed the
finiteness gate; Adam squared them in float32, ``exp_avg_sq`` became inf, every later update was 0, and the search
exported its random initial alphas without a word. ``HugeLogitsSpace`` reproduces the mechanism in a millisecond:
its logits are scaled by 1e25, so grad_a L_val is ~1e25 (the loss stays finite), and its square overflows.
"""

from __future__ import annotations

import warnings
from unittest import mock

import nni.nas.hub.pytorch as hub
import pytest
import torch
import torch.nn as nn
from nni.nas.nn.pytorch import LayerChoice, ModelSpace
from torch.utils.data import TensorDataset

from nni_idarts import IDartsStrategy, NonFiniteHypergradientError, guards
from nni_idarts.search import search
from search_probes import StepRecorder

QUIET = {'enable_progress_bar': False, 'enable_model_summary': False}
N_SAMPLES, BATCH = 8, 4  # 2 batches, one architecture step each


class HugeLogitsSpace(ModelSpace):
    def __init__(self, scale: float = 1e25) -> None:
        super().__init__()
        self.scale = scale
        self.stem = nn.Linear(8, 8)
        self.op = LayerChoice({'tanh': nn.Sequential(nn.Linear(8, 8), nn.Tanh()), 'skip': nn.Identity()}, label='op')
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.head(self.op(torch.tanh(self.stem(x))))


def features(seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(N_SAMPLES, 8, generator=generator),
                         torch.randint(0, 10, (N_SAMPLES,), generator=generator))


def run(space: ModelSpace, recorder: StepRecorder, *, mode: str = 'first_order', epochs: int = 1,
        learning_rate: float = 1e-30, arc_learning_rate: float = 0.05, **options):
    # A tiny weight learning rate keeps the weights (and so the loss) finite despite their ~1e25 gradients.
    strategy = IDartsStrategy(hypergradient=mode, inner_steps=1, arc_learning_rate=arc_learning_rate, **options)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = search(space, features(0), features(1), strategy, epochs=epochs, batch_size=BATCH,
                        learning_rate=learning_rate, learning_rate_min=None,  # constant: as tiny as given
                        trainer_kwargs={**QUIET, 'callbacks': [recorder]})
    return result, strategy, [str(w.message) for w in caught]


def arc_state(strategy) -> list[torch.Tensor]:
    optimizer = strategy.oneshot_module.architecture_optimizers().optimizer
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def test_hypergradient_too_large_for_adam_is_skipped_counted_and_reported():
    # First order: in the second-order modes the 1e25 scale makes the Hessian products themselves inf (a non-finite
    # skip); the gate is the same for every mode, and the ShuffleNet test below takes it with 'implicit'.
    recorder = StepRecorder()
    result, strategy, messages = run(HugeLogitsSpace(), recorder)
    module = strategy.oneshot_module
    assert module._nonfinite_total == 2 and module.trainer.callback_metrics['nonfinite_arch_steps'].item() == 2
    assert sum('would overflow when Adam squares it' in m for m in messages) == 2
    assert all(step['alphas'] == recorder.initial['alphas'] for step in recorder.steps)
    assert all(torch.isfinite(v).all() for v in arc_state(strategy))  # Adam's state never saw it
    # ... and the search does not pass for a result:
    assert result.alphas_moved is False
    assert module.trainer.callback_metrics['alphas_moved'].item() == 0.0
    assert any('alphas) never moved' in m for m in messages)


def test_without_the_guard_adam_freezes_and_the_alphas_moved_check_still_tells():
    """The issue's freeze, reproduced with both guard lines switched off: inf in Adam's state, alphas stuck."""
    recorder = StepRecorder()
    with mock.patch.object(guards, 'adam_squares', lambda grads, alphas: []), \
            mock.patch.object(guards, 'optimizer_tensors', lambda optimizer: []):
        result, strategy, messages = run(HugeLogitsSpace(), recorder)
    state = arc_state(strategy)
    assert state and not all(torch.isfinite(v).all() for v in state)  # exp_avg_sq = inf
    assert strategy.oneshot_module._nonfinite_total == 0  # nothing was counted: the silent freeze
    assert all(step['alphas'] == recorder.initial['alphas'] for step in recorder.steps)
    assert result.alphas_moved is False and any('alphas) never moved' in m for m in messages)


def test_a_step_that_leaves_the_optimizer_state_non_finite_is_undone():
    recorder = StepRecorder()
    with mock.patch.object(guards, 'adam_squares', lambda grads, alphas: []):  # first line off: the second catches it
        result, strategy, _ = run(HugeLogitsSpace(), recorder)
    assert strategy.oneshot_module._nonfinite_total == 2
    assert all(torch.isfinite(v).all() for v in arc_state(strategy))
    assert all(step['alphas'] == recorder.initial['alphas'] for step in recorder.steps)
    assert result.alphas_moved is False


def test_too_many_in_a_row_stop_the_search():
    with pytest.raises(NonFiniteHypergradientError, match='2 architecture steps in a row .*too large for Adam'):
        run(HugeLogitsSpace(), StepRecorder(), max_nonfinite_steps=2)


def test_a_normal_search_moves_its_alphas_and_says_so():
    recorder = StepRecorder()
    result, strategy, messages = run(HugeLogitsSpace(scale=1.0), recorder, learning_rate=0.1)
    assert result.alphas_moved is True and strategy.oneshot_module._nonfinite_total == 0
    assert strategy.oneshot_module.trainer.callback_metrics['alphas_moved'].item() == 1.0
    assert not any('never moved' in m for m in messages)


def test_a_search_whose_steps_cannot_change_the_alphas_says_they_never_moved():
    # (A warm-up as long as the search, the other way to get there, is refused by search() before it starts.)
    # Adam's steps are about arc_learning_rate in size: 1e-30 added to alphas of order 1e-3 leaves them bit for bit.
    recorder = StepRecorder()
    result, strategy, messages = run(HugeLogitsSpace(scale=1.0), recorder, learning_rate=0.1,
                                     arc_learning_rate=1e-30)
    assert result.alphas_moved is False
    assert strategy.oneshot_module.trainer.callback_metrics['alphas_moved'].item() == 0.0
    assert any('alphas) never moved' in m for m in messages)


def test_shufflenet_freeze_is_skipped_counted_and_reported():
    """The issue's own case: NNI's ShuffleNetSpace at 32x32 (batches of 4, the default weight learning rate)."""
    recorder = StepRecorder()
    torch.manual_seed(0)  # the space's initial weights: not whatever state earlier tests left behind
    space = hub.ShuffleNetSpace(num_labels=10)
    strategy = IDartsStrategy(hypergradient='implicit', inner_steps=1, arc_learning_rate=0.01)
    generator = torch.Generator().manual_seed(0)
    data = [TensorDataset(torch.randn(N_SAMPLES, 3, 32, 32, generator=generator),
                          torch.randint(0, 10, (N_SAMPLES,), generator=generator)) for _ in range(2)]
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = search(space, *data, strategy, epochs=1, batch_size=BATCH,
                        trainer_kwargs={**QUIET, 'callbacks': [recorder]})
    messages = [str(w.message) for w in caught]
    module = strategy.oneshot_module
    # Both architecture steps (hypergradients of 6e35 and 1e26, finite) are skipped and counted, with a warning each.
    assert sum('would overflow when Adam squares it' in m for m in messages) == 2
    assert module._nonfinite_total == 2 and module.trainer.callback_metrics['nonfinite_arch_steps'].item() == 2
    assert all(torch.isfinite(v).all() for v in arc_state(strategy))  # Adam's state is not poisoned
    assert all(step['alphas'] == recorder.initial['alphas'] for step in recorder.steps)
    assert result.alphas_moved is False and any('alphas) never moved' in m for m in messages)
