"""Non-finite losses and gradients: the step is skipped and counted, nothing non-finite reaches alphas, weights,
optimizer state or buffers, and too many skips in a row stop the search with a clear error.

NaN is injected through the data: one poisoned sample makes the loss of exactly the batch that holds it NaN.
The space has BatchNorm, whose running statistics a NaN forward pass would poison before the loss is known.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from nni_idarts import IDartsStrategy, NonFiniteHypergradientError, NonFiniteStepError
from nni_idarts.data import digits_splits
from nni_idarts.search import search
from search_probes import StepRecorder
from search_spaces.digits import DigitsCellSpace

N_SAMPLES, BATCH = 64, 16


def _data(poison: str | None, rows: slice | list[int]) -> tuple[TensorDataset, TensorDataset]:
    """64 train and 64 val digits; the ``rows`` of the ``poison`` split ('train' or 'val') are NaN images."""
    splits = digits_splits(0)
    out = {}
    for name, dataset in (('train', splits.train), ('val', splits.val)):
        x, y = (t[:N_SAMPLES].clone() for t in dataset.tensors)
        if name == poison:
            x[rows] = float('nan')
        out[name] = TensorDataset(x, y)
    return out['train'], out['val']


def _search(train, val, recorder, *, epochs=2, **options):
    strategy = IDartsStrategy(inner_steps=1, arc_learning_rate=0.05, **options)
    torch.manual_seed(0)
    result = search(DigitsCellSpace(channels=4, num_cells=1), train, val, strategy, epochs=epochs, batch_size=BATCH,
                    trainer_kwargs={'callbacks': [recorder], 'enable_progress_bar': False,
                                    'enable_model_summary': False})
    return result, strategy


def _all_finite(state: dict) -> bool:
    values = [*np.concatenate(state['alphas']), *state['weights'], *(v for b in state['buffers'] for v in b)]
    return all(math.isfinite(v) for v in values)


def _states(recorder: StepRecorder) -> list[dict]:
    return [recorder.initial, *recorder.steps]  # states[i] is the state before batch record i


def test_nan_validation_batch_skips_only_its_architecture_step() -> None:
    recorder = StepRecorder()
    result, strategy = _search(*_data('val', [5]), recorder, epochs=2, max_nonfinite_steps=3)
    states = _states(recorder)
    poisoned = [i for i, step in enumerate(recorder.steps) if step['val_nonfinite']]
    assert len(poisoned) == 2  # one batch per epoch holds the NaN sample
    for i, step in enumerate(recorder.steps):
        before = states[i]
        assert step['nonfinite_arch_steps'] == sum(1 for p in poisoned if p <= i)
        assert step['nonfinite_weight_steps'] == 0
        if i in poisoned:
            assert step['alphas'] == before['alphas']          # skipped: untouched
        else:
            assert step['alphas'] != before['alphas']          # an architecture step on every other batch
        assert step['weights'] != before['weights']            # the weight step is not affected
        assert _all_finite(step), f'non-finite state after batch {i}'
    module = strategy.oneshot_module
    assert module.trainer.callback_metrics['nonfinite_arch_steps'].item() == 2  # counted in the logs
    assert all(torch.isfinite(v).all() for s in module.architecture_optimizers().optimizer.state.values()
               for v in s.values() if isinstance(v, torch.Tensor))
    assert set(result.arch) == {'edge_0_1', 'edge_0_2', 'edge_1_2'}


def test_nan_training_batch_skips_its_weight_step_and_architecture_step() -> None:
    recorder = StepRecorder()
    _, strategy = _search(*_data('train', [5]), recorder, epochs=2, max_nonfinite_steps=3)
    states = _states(recorder)
    poisoned = [i for i, step in enumerate(recorder.steps) if step['train_nonfinite']]
    assert len(poisoned) == 2
    for i, step in enumerate(recorder.steps):
        before = states[i]
        expected_skips = sum(1 for p in poisoned if p <= i)
        assert step['nonfinite_weight_steps'] == expected_skips
        # L_train is part of the implicit hypergradient, so that architecture step is skipped as well.
        assert step['nonfinite_arch_steps'] == expected_skips
        if i in poisoned:
            assert step['weights'] == before['weights'] and step['alphas'] == before['alphas']
            assert step['buffers'] == before['buffers']  # BatchNorm statistics restored
        else:
            assert step['weights'] != before['weights']
        assert _all_finite(step), f'non-finite state after batch {i}'
    module = strategy.oneshot_module
    assert module.trainer.callback_metrics['nonfinite_weight_steps'].item() == 2
    momentum = [s['momentum_buffer'] for s in module.weight_optimizer().state.values() if 'momentum_buffer' in s]
    assert momentum and all(torch.isfinite(m).all() for m in momentum)


def test_too_many_nonfinite_architecture_steps_in_a_row_stop_the_search() -> None:
    recorder = StepRecorder()
    with pytest.raises(NonFiniteHypergradientError, match='3 architecture steps in a row') as excinfo:
        _search(*_data('val', slice(None)), recorder, epochs=1, max_nonfinite_steps=3)
    assert 'Check the data' in str(excinfo.value)
    assert len(recorder.steps) == 2  # the third batch raised
    for step in recorder.steps:
        assert step['alphas'] == recorder.initial['alphas']
        assert _all_finite(step)


def test_too_many_nonfinite_weight_steps_in_a_row_stop_the_search() -> None:
    # First order: the architecture step never sees the poisoned training data, so only weight steps fail.
    recorder = StepRecorder()
    with pytest.raises(NonFiniteStepError, match='3 weight steps in a row') as excinfo:
        _search(*_data('train', slice(None)), recorder, epochs=1, max_nonfinite_steps=3, hypergradient='first_order')
    assert excinfo.type is NonFiniteStepError
    for step in recorder.steps:
        assert step['weights'] == recorder.initial['weights']
        assert step['alphas'] != recorder.initial['alphas']
        assert _all_finite(step)
