"""Train one fixed architecture from scratch and measure it: the last step of search -> export -> retrain.

The fixed model comes from NNI's own fixed-architecture path (``ModelSpace.freeze(arch)``), so any NNI model
space works, whichever strategy exported the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from nni.nas.evaluator.pytorch import ClassificationModule
from nni.nas.nn.pytorch import ModelSpace
from torch.utils.data import DataLoader, Dataset

from .search import MomentumSGD, check_run_arguments


@dataclass
class RetrainResult:
    accuracy: float        #: accuracy on ``eval_data`` after training
    loss: float            #: mean loss on ``eval_data``
    num_parameters: int    #: trainable parameters of the fixed model


def fixed_model(model_space: ModelSpace, arch: dict[str, Any]) -> nn.Module:
    """The model of ``arch`` in ``model_space`` (NNI's ``freeze``), with freshly initialised weights.

    ``freeze`` copies the space's weights for the chosen ops; every module's own ``reset_parameters`` draws new ones
    from torch's random state, so retraining starts from scratch, and from the same weights under the same seed,
    whether the space was searched, or built under another random state.
    """
    model = model_space.freeze(arch)
    for module in model.modules():
        reset = getattr(module, 'reset_parameters', None)
        if callable(reset):
            reset()
    return model


class CosineClassificationModule(ClassificationModule):
    """NNI's classification module with the learning rate annealed to zero over the run (cosine, per epoch).

    As in DARTS's retraining: with a constant rate the final weights, and the reported accuracy, depend on where
    the last noisy steps happened to land.
    """

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return {'optimizer': optimizer, 'lr_scheduler': scheduler}


def train_and_evaluate(model: nn.Module, train_data: Dataset, eval_data: Dataset, *, epochs: int = 20,
                       batch_size: int = 64, learning_rate: float = 0.05, weight_decay: float = 3e-4,
                       num_classes: int = 10, seed: int | None = 0,
                       trainer_kwargs: dict[str, Any] | None = None) -> RetrainResult:
    """Train ``model`` on ``train_data`` (SGD, momentum 0.9, cosine-annealed learning rate) and report accuracy and
    loss on ``eval_data``."""
    check_run_arguments(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay,
                        seed=seed)
    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)
    module = CosineClassificationModule(num_classes=num_classes, learning_rate=learning_rate, weight_decay=weight_decay,
                                  optimizer=MomentumSGD, export_onnx=False)
    module.set_model(model)
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    kwargs: dict[str, Any] = {'accelerator': 'cpu', 'logger': False, 'enable_checkpointing': False,
                              'enable_model_summary': False}
    kwargs.update(trainer_kwargs or {})
    trainer = pl.Trainer(max_epochs=epochs, **kwargs)
    trainer.fit(module, DataLoader(train_data, batch_size=batch_size, shuffle=True, generator=generator))
    metrics = trainer.test(module, DataLoader(eval_data, batch_size=256), verbose=False)[0]
    return RetrainResult(accuracy=float(metrics['test_acc']), loss=float(metrics['test_loss']),
                         num_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))


def retrain(model_space: ModelSpace, arch: dict[str, Any], train_data: Dataset, eval_data: Dataset,
            **kwargs: Any) -> RetrainResult:
    """Build ``arch`` from ``model_space`` and :func:`train_and_evaluate` it from scratch.

    With ``seed`` (default 0) the fresh weights are seeded too, so the result depends on the arguments only.
    """
    seed = kwargs.get('seed', 0)
    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)
    return train_and_evaluate(fixed_model(model_space, arch), train_data, eval_data, **kwargs)
