"""Test support: a tiny space without batch statistics, and a callback that records what every training batch did."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn as nn
from nni.nas.nn.pytorch import LayerChoice, ModelSpace


class TinySpace(ModelSpace):
    """An MLP on (1, 8, 8) digits with one 3-way LayerChoice, and no batch statistics anywhere: the loss of a batch is
    exactly the mean of the losses of its parts, which is what makes a data-parallel run comparable to one process."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(64, 8)
        self.op = LayerChoice({
            'linear_tanh': nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
            'linear_relu': nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
            'skip': nn.Identity(),
        }, label='op')
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.op(torch.tanh(self.stem(x.flatten(1)))))


def fingerprints(images: torch.Tensor) -> list[int]:
    """One hash per sample (of its exact pixel values), to tell which samples a batch held (not for NaN samples)."""
    return [hash(tuple(x.tolist())) for x in images.flatten(1)]


class StepRecorder(pl.Callback):
    """After every training batch: the alphas, the weights, the buffers, which samples the batch held (and the
    validation batch of its architecture step, if it made one: empty otherwise), and the skip counters of
    :class:`~nni_idarts.IDartsLightningModule`. ``initial`` is the state before the first batch."""

    def __init__(self) -> None:
        self.initial: dict = {}
        self.steps: list[dict] = []

    @staticmethod
    def _state(module) -> dict:
        return {
            'alphas': [a.detach().reshape(-1).tolist() for a in module.arch_parameters()],
            'weights': torch.cat([w.detach().reshape(-1) for w in module.weight_parameters()]).tolist(),
            'buffers': [b.detach().double().reshape(-1).tolist() for b in module.training_module.buffers()],
        }

    def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[override]
        self.initial = self._state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        val = pl_module.last_val_batch
        self.steps.append({
            **self._state(pl_module),
            'epoch': trainer.current_epoch,
            'train_samples': fingerprints(batch['train'][0]),
            'val_samples': fingerprints(val[0]) if val is not None else [],
            'train_nonfinite': not bool(torch.isfinite(batch['train'][0]).all()),
            'val_nonfinite': val is not None and not bool(torch.isfinite(val[0]).all()),
            'nonfinite_arch_steps': pl_module._nonfinite_total,
            'nonfinite_weight_steps': pl_module._nonfinite_weight_total,
        })
