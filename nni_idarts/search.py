"""One iDARTS search as a function call: model space + data + strategy -> exported architecture.

This is the one place that builds the NNI evaluator and experiment for a search; the example, the command line,
the NNI trial and the benchmarks all call :func:`search`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from nni.nas.evaluator.pytorch import Classification, DataLoader
from nni.nas.experiment import NasExperiment
from nni.nas.nn.pytorch import ModelSpace
from nni.nas.strategy import DARTS
from torch.utils.data import Dataset

from .strategy import IDartsStrategy


class MomentumSGD(torch.optim.SGD):
    """SGD with momentum 0.9, the weight optimizer of DARTS and iDARTS (NNI's evaluator takes an optimizer class)."""

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0, momentum: float = 0.9):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@dataclass
class SearchResult:
    arch: dict[str, Any]                     #: label -> chosen value, as NNI exports it
    probs: dict[str, dict[Any, float]]       #: label -> {value: probability} at the end of the search
    strategy: DARTS = field(repr=False)      #: the strategy that ran (an IDartsStrategy or any NNI DARTS-family one)


def search(model_space: ModelSpace, train_data: Dataset, val_data: Dataset, strategy: IDartsStrategy | DARTS, *,
           epochs: int = 10, batch_size: int = 64, learning_rate: float = 0.025, weight_decay: float = 3e-4,
           num_classes: int = 10, seed: int | None = 0, workdir: str | None = None,
           trainer_kwargs: dict[str, Any] | None = None) -> SearchResult:
    """Search ``model_space`` with ``strategy`` on the bilevel split (``train_data`` for w, ``val_data`` for a).

    The weights are trained with SGD (momentum 0.9) at ``learning_rate``; ``trainer_kwargs`` go to NNI's Lightning
    ``Trainer`` (defaults: CPU, no logger, no checkpoints). ``workdir`` holds NNI's experiment files (default: a
    temporary folder, removed afterwards). ``strategy`` may also be one of NNI's own DARTS-family strategies
    (``DARTS``, ``GumbelDARTS``), so that baselines run through exactly the same evaluator and experiment.
    """
    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    train_loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, generator=generator)
    val_loader = DataLoader(val_data, batch_size=batch_size, shuffle=True, generator=generator)
    kwargs: dict[str, Any] = {'accelerator': 'cpu', 'logger': False, 'enable_checkpointing': False}
    kwargs.update(trainer_kwargs or {})
    evaluator = Classification(
        train_dataloaders=train_loader, val_dataloaders=val_loader, num_classes=num_classes,
        learning_rate=learning_rate, weight_decay=weight_decay, optimizer=MomentumSGD, export_onnx=False,
        max_epochs=epochs, **kwargs)
    experiment = NasExperiment(model_space, evaluator, strategy)
    with tempfile.TemporaryDirectory() as tmp:
        experiment.config.experiment_working_directory = workdir or tmp
        experiment.run()
        arch = experiment.export_top_models(formatter='dict')[0]
    probs = strategy.oneshot_module.export_probs()
    return SearchResult(arch=arch, probs={k: {c: float(p) for c, p in v.items()} for k, v in probs.items()},
                        strategy=strategy)
