"""Bad input at the strategy and module level: each is refused before any step, with a message naming the problem."""

from __future__ import annotations

import nni
import pytest
import torch
import torch.nn as nn
from nni.nas.evaluator.pytorch import Classification, DataLoader
from nni.nas.evaluator.pytorch.lightning import ClassificationModule, Lightning, Trainer
from nni.nas.experiment import NasExperiment
from nni.nas.nn.pytorch import ModelSpace
from torch.utils.data import Subset, TensorDataset

from nni_idarts import IDartsStrategy
from nni_idarts.data import digits_splits
from nni_idarts.search import search
from search_probes import StepRecorder, TinySpace

TRAINER = {'accelerator': 'cpu', 'logger': False, 'enable_checkpointing': False, 'enable_progress_bar': False,
           'enable_model_summary': False, 'max_epochs': 1}


@pytest.fixture(scope='module')
def digits() -> tuple[TensorDataset, TensorDataset]:
    splits = digits_splits(0)
    return Subset(splits.train, range(32)), Subset(splits.val, range(32))


def _run(space: ModelSpace, evaluator: Lightning, tmp_path, **options) -> IDartsStrategy:
    strategy = IDartsStrategy(**{'inner_steps': 1, **options})
    experiment = NasExperiment(space, evaluator, strategy)
    experiment.config.experiment_working_directory = str(tmp_path)
    try:
        experiment.run()
    finally:
        experiment.stop()  # else NNI stops it at exit, logging into streams pytest has closed
    return strategy


def _classification(train, val, recorder: StepRecorder | None = None) -> Classification:
    return Classification(train_dataloaders=DataLoader(train, batch_size=8), val_dataloaders=DataLoader(val, batch_size=8),
                          num_classes=10, learning_rate=0.05, optimizer=torch.optim.SGD, export_onnx=False,
                          callbacks=[recorder] if recorder else None, **TRAINER)


@pytest.mark.parametrize('options, message', [
    ({'K': -1}, 'K must be an integer >= 0'),
    ({'K': 1.5}, 'K must be an integer >= 0'),
    ({'gamma': 0.0}, 'gamma must be a number > 0'),
    ({'gamma': -0.01}, 'gamma must be a number > 0'),
    ({'inner_steps': 0}, 'inner_steps must be an integer >= 1'),
    ({'max_nonfinite_steps': 0}, 'max_nonfinite_steps must be an integer >= 1'),
    ({'arc_learning_rate': 0}, 'arc_learning_rate must be a number > 0'),
    ({'hypergradient': 'second_order'}, "hypergradient must be one of 'implicit', 'unrolled', 'first_order'"),
])
def test_invalid_strategy_options_are_refused_at_construction(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IDartsStrategy(**options)


class NoChoiceSpace(ModelSpace):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_model_space_without_choices_is_refused(digits, tmp_path) -> None:
    with pytest.raises(ValueError, match='NoChoiceSpace has no choices'):
        _run(NoChoiceSpace(), _classification(*digits), tmp_path)


@nni.trace
class TwoOptimizerModule(ClassificationModule):
    """A classification recipe that trains the head and the rest with separate optimizers."""

    def configure_optimizers(self):
        head = [p for name, p in self.named_parameters() if 'head' in name]
        rest = [p for name, p in self.named_parameters() if 'head' not in name]
        return [torch.optim.SGD(rest, lr=0.1), torch.optim.SGD(head, lr=0.1)]


@pytest.mark.parametrize('empty', ['train', 'val'])
def test_empty_dataloader_is_refused(digits, tmp_path, empty: str) -> None:
    train, val = digits
    train, val = (Subset(train, []) if empty == 'train' else train), (Subset(val, []) if empty == 'val' else val)
    with pytest.raises(ValueError, match=f'The {empty} dataloader of the evaluator is empty'):
        _run(TinySpace(), _classification(train, val), tmp_path)
    # search() checks its datasets before building loaders (a shuffled empty loader fails with a sampler error).
    with pytest.raises(ValueError, match=f'{empty}_data is empty'):
        search(TinySpace(), train, val, IDartsStrategy(), epochs=1, batch_size=8)


@pytest.mark.parametrize('val_kind', ['labels', 'images'])
def test_validation_batches_unlike_training_batches_are_refused_before_any_step(digits, tmp_path, val_kind) -> None:
    train, _ = digits
    if val_kind == 'labels':   # one-hot float targets where the training data has class indices
        val = TensorDataset(torch.zeros(32, 1, 8, 8), torch.zeros(32, 10))
    else:                      # images of another size
        val = TensorDataset(torch.zeros(32, 1, 4, 4), torch.zeros(32, dtype=torch.long))
    recorder = StepRecorder()
    space = TinySpace()
    before = [space.stem.weight.detach().clone(), space.head.weight.detach().clone()]
    with pytest.raises(ValueError, match='validation batches do not match the training batches'):
        _run(space, _classification(train, val, recorder), tmp_path, inner_steps=3)
    assert recorder.steps == []
    # not even one of the 3 weight steps before the first architecture step was taken
    assert torch.equal(space.stem.weight, before[0]) and torch.equal(space.head.weight, before[1])


@nni.trace
class ManualOptimizationModule(ClassificationModule):
    """A recipe that steps its optimizer itself: iDARTS cannot interleave architecture steps with it."""

    @property
    def automatic_optimization(self) -> bool:
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:  # Lightning's setter; this recipe is always manual
        pass


@pytest.mark.parametrize('module_class, message', [
    (TwoOptimizerModule, 'exactly one weight optimizer in the evaluator, found 2'),
    (ManualOptimizationModule, 'uses manual optimization'),
])
def test_evaluator_that_iDARTS_cannot_drive_is_refused_before_any_step(digits, tmp_path, module_class, message):
    recorder = StepRecorder()
    train, val = digits
    evaluator = Lightning(module_class(num_classes=10, export_onnx=False), Trainer(callbacks=[recorder], **TRAINER),
                          train_dataloaders=DataLoader(train, batch_size=8), val_dataloaders=DataLoader(val, batch_size=8))
    with pytest.raises(ValueError, match=message):
        _run(TinySpace(), evaluator, tmp_path)
    assert recorder.steps == []