"""One iDARTS search as a function call: model space + data + strategy -> exported architecture.

This is the one place that builds the NNI evaluator and experiment for a search; the example, the command line,
the NNI trial and the benchmarks all call :func:`search`.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
import torch
from nni.nas.evaluator.pytorch import Classification
from nni.nas.experiment import NasExperiment
from nni.nas.nn.pytorch import ModelSpace
from nni.nas.strategy import DARTS
from torch.utils.data import Dataset

from .checkpoint import AtomicCheckpointIO, resumable_loader
from .reporting import trial_parameters_preserved
from .strategy import IDartsStrategy


class MomentumSGD(torch.optim.SGD):
    """SGD with momentum 0.9, the weight optimizer of DARTS and iDARTS (NNI's evaluator takes an optimizer class)."""

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0, momentum: float = 0.9):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class NesterovSGD(torch.optim.SGD):
    """SGD with Nesterov momentum 0.9 (the weight optimizer of the NAS-Bench-201 search code)."""

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0, momentum: float = 0.9):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


@dataclass
class SearchResult:
    arch: dict[str, Any]                     #: label -> chosen value, as NNI exports it
    probs: dict[str, dict[Any, float]]       #: label -> {value: probability} at the end of the search
    strategy: DARTS = field(repr=False)      #: the strategy that ran (an IDartsStrategy or any NNI DARTS-family one)


class CosineAnnealedLR(pl.Callback):
    """Sets the weight optimizer's learning rate at the start of each epoch e of E to
    ``lr_min + (lr - lr_min) * (1 + cos(pi * e / E)) / 2`` (DARTS' and iDARTS' CosineAnnealingLR(E, eta_min), stepped
    per epoch), and logs it as ``lr``. It depends only on the epoch, so a resumed search gets the same rates.
    The architecture optimizer (NNI marks it ``is_arch_optimizer``) keeps its own rate."""

    def __init__(self, lr: float, lr_min: float, epochs: int):
        self.lr, self.lr_min, self.epochs = lr, lr_min, epochs

    def rate(self, epoch: int) -> float:
        return self.lr_min + (self.lr - self.lr_min) * (1 + math.cos(math.pi * epoch / self.epochs)) / 2

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Set before every batch, not once per epoch: a resumed search restores the optimizer's saved rate after the
        # epoch has started, and only this keeps the schedule a function of the epoch alone.
        rate = self.rate(trainer.current_epoch)
        for optimizer in trainer.optimizers:
            if not getattr(optimizer, 'is_arch_optimizer', False):
                for group in optimizer.param_groups:
                    group['lr'] = rate
        pl_module.log('lr', rate)


class _ReportableAfterResume(pl.Callback):
    """A search resumed from a checkpoint taken after its last batch trains no batch, so nothing logs
    ``train_acc``, which NNI's evaluator reads in its ``on_fit_end`` (this hook runs just before it): report NaN."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if 'train_acc' not in trainer.callback_metrics:
            trainer.callback_metrics['train_acc'] = torch.tensor(float('nan'))


def search(model_space: ModelSpace, train_data: Dataset, val_data: Dataset, strategy: IDartsStrategy | DARTS, *,
           epochs: int = 10, batch_size: int = 64, learning_rate: float = 0.025,
           learning_rate_min: float | None = 0.001, weight_decay: float = 3e-4, nesterov: bool = False,
           num_classes: int = 10, seed: int | None = 0, workdir: str | None = None,
           trainer_kwargs: dict[str, Any] | None = None, tensorboard_dir: str | None = None,
           checkpoint_dir: str | None = None, checkpoint_every_n_steps: int = 50,
           resume_from: str | None = None, shuffle: bool = True) -> SearchResult:
    """Search ``model_space`` with ``strategy`` on the bilevel split (``train_data`` for w, ``val_data`` for a).

    The weights are trained with SGD (momentum 0.9) at a learning rate annealed per epoch by a cosine from
    ``learning_rate`` to ``learning_rate_min`` (DARTS' and iDARTS' schedule, :class:`CosineAnnealedLR`; logged as
    ``lr``); ``learning_rate_min=None`` keeps ``learning_rate`` constant; ``nesterov=True`` uses Nesterov momentum.
    ``trainer_kwargs`` go to NNI's Lightning
    ``Trainer`` (defaults: CPU, no logger, no checkpoints). ``workdir`` holds NNI's experiment files (default: a
    temporary folder, removed afterwards). ``strategy`` may also be one of NNI's own DARTS-family strategies
    (``DARTS``, ``GumbelDARTS``), so that baselines run through exactly the same evaluator and experiment.

    ``tensorboard_dir``: write Lightning's TensorBoard logs there (the module's metrics, see
    :class:`~nni_idarts.IDartsLightningModule`). ``checkpoint_dir``: save the whole search state (weights, alphas,
    both optimizers, schedulers, loop and data positions) to ``last.ckpt`` there, atomically, whenever Lightning's
    step count is a multiple of ``checkpoint_every_n_steps`` (it counts optimizer steps: a batch with an architecture
    step counts two). ``resume_from``: a checkpoint to continue from; with the same arguments the resumed search
    ends where an uninterrupted one would. ``shuffle=False`` keeps the datasets' order (e.g. to replay a given order).

    Data parallel: ``trainer_kwargs={'strategy': 'ddp', 'devices': N}`` (with ``accelerator`` as needed) runs the
    search on N processes; ``batch_size`` is then per process (global batch N * batch_size), and Lightning shards
    the samplers across the ranks.
    """
    for name, data in (('train_data', train_data), ('val_data', val_data)):
        if hasattr(data, '__len__') and len(data) == 0:  # type: ignore[arg-type]
            raise ValueError(f'{name} is empty: the search needs training data for the weights and validation data '
                             'for the architecture.')
    if learning_rate_min is not None and not 0 <= learning_rate_min <= learning_rate:
        raise ValueError(f'learning_rate_min must be between 0 and learning_rate ({learning_rate}), or None for a '
                         f'constant learning rate; got {learning_rate_min}.')
    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)
    data_seed = seed if seed is not None else int(torch.seed() % 2**31)
    # The data order depends only on (seed, epoch) and the loaders checkpoint their position: see checkpoint.py.
    train_loader = resumable_loader(train_data, batch_size=batch_size, seed=data_seed, shuffle=shuffle)
    val_loader = resumable_loader(val_data, batch_size=batch_size, seed=data_seed + 1, shuffle=shuffle)
    kwargs: dict[str, Any] = {'accelerator': 'cpu', 'logger': False, 'enable_checkpointing': False}
    if tensorboard_dir is not None:
        kwargs['logger'] = TensorBoardLogger(tensorboard_dir, name='', version='', default_hp_metric=False)
    if checkpoint_dir is not None:
        kwargs['enable_checkpointing'] = True
        kwargs['callbacks'] = [ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=0,
                                               every_n_train_steps=checkpoint_every_n_steps)]
        kwargs['plugins'] = [AtomicCheckpointIO()]
    if learning_rate_min is not None and learning_rate_min != learning_rate:
        kwargs['callbacks'] = kwargs.get('callbacks', []) + [CosineAnnealedLR(learning_rate, learning_rate_min, epochs)]
    for key, value in (trainer_kwargs or {}).items():
        kwargs[key] = kwargs.get(key, []) + list(value) if key in ('callbacks', 'plugins') else value
    if resume_from is not None:
        kwargs['callbacks'] = kwargs.get('callbacks', []) + [_ReportableAfterResume()]
    evaluator = Classification(
        train_dataloaders=train_loader, val_dataloaders=val_loader, num_classes=num_classes,
        learning_rate=learning_rate, weight_decay=weight_decay, optimizer=NesterovSGD if nesterov else MomentumSGD, export_onnx=False,
        max_epochs=epochs, **kwargs)
    if resume_from is not None:
        # NNI's evaluator calls trainer.fit() without ckpt_path; this is Lightning's way to hand it one anyway.
        evaluator.trainer.ckpt_path = resume_from
    experiment = NasExperiment(model_space, evaluator, strategy)
    with tempfile.TemporaryDirectory() as tmp:
        experiment.config.experiment_working_directory = workdir or tmp
        try:
            with trial_parameters_preserved():  # inside an NNI trial, keep the trial's parameters current
                experiment.run()
            arch = experiment.export_top_models(formatter='dict')[0]
        finally:
            # NNI leaves a finished experiment running until atexit; stop it while its folder still exists.
            experiment.stop()
    probs = strategy.oneshot_module.export_probs()
    return SearchResult(arch=arch, probs={k: {c: float(p) for c, p in v.items()} for k, v in probs.items()},
                        strategy=strategy)
