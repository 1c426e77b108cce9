"""The iDARTS search loop as a Lightning module: it wires batches and optimizers to :mod:`nni_idarts.hypergradient`.

It follows NNI's split: :class:`~nni.nas.oneshot.pytorch.differentiable.DartsLightningModule` already owns the
supernet, the architecture optimizer (Adam, betas (0.5, 0.999), weight decay 1e-3), warm-up and probability logging;
this subclass only replaces ``training_step``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from nni.nas.oneshot.pytorch.differentiable import DartsLightningModule

from . import hypergradient
from .reporting import TrialReporter, nni_metric

#: The values of the ``hypergradient`` option and what each computes.
HYPERGRADIENTS = ('implicit', 'unrolled', 'first_order')


class NonFiniteHypergradientError(RuntimeError):
    """Raised when too many architecture steps in a row had a non-finite loss or hypergradient."""


class IDartsLightningModule(DartsLightningModule):
    """One-shot module of :class:`~nni_idarts.IDartsStrategy`. See the strategy for the meaning of the options.

    Each training batch is a dict ``{'train': ..., 'val': ...}`` (NNI's DARTS combined loader). Every batch makes
    one weight step on its ``train`` part; every ``inner_steps``-th batch (counted within the epoch, starting
    with the first) first makes an architecture step, whose hypergradient uses the ``val`` part for L_val and the
    ``train`` part for L_train. With ``inner_steps=1`` and ``hypergradient='first_order'`` this is exactly NNI's DARTS.

    Inside an NNI trial (``nnictl create``) the module reports to the trial by itself: after every epoch the epoch
    means of its logged metrics as an intermediate result (``'default'``: the validation accuracy of the
    architecture steps, or the evaluator's single metric), and, if ``report_final_result``, the last of them as the
    final result. Outside a trial it reports nothing. See :mod:`nni_idarts.reporting`.
    """

    def __init__(self, training_module: nn.Module, *,
                 hypergradient: str = 'implicit',
                 K: int = 2,
                 gamma: float | None = None,
                 inner_steps: int = 5,
                 arc_learning_rate: float = 3.0e-4,
                 gradient_clip_val: float | None = None,
                 log_prob_every_n_step: int = 10,
                 warmup_epochs: int = 0,
                 max_nonfinite_steps: int = 10,
                 report_final_result: bool = True):
        super().__init__(training_module,  # type: ignore[arg-type]
                         arc_learning_rate=arc_learning_rate,
                         gradient_clip_val=gradient_clip_val,
                         log_prob_every_n_step=log_prob_every_n_step,
                         warmup_epochs=warmup_epochs)
        self.hypergradient = hypergradient
        self.K = K
        self.gamma = gamma
        self.inner_steps = inner_steps
        self.max_nonfinite_steps = max_nonfinite_steps
        self._nonfinite_in_a_row = 0
        self._nonfinite_total = 0
        self.report_final_result = report_final_result
        # Captured now, while NasExperiment's engine has not yet replaced the trial's channel with its own.
        self.nni_trial = TrialReporter.capture()
        self._epoch_sums: dict[str, list[float]] = {}   # metric name -> [sum, count] over this epoch
        self._last_nni_metric: dict[str, float] | None = None

    # ----- the parameters of the two levels -----

    def arch_parameters(self) -> list[nn.Parameter]:
        # NNI returns list(set(...)): an order that changes from run to run. Keep module order instead, so that the
        # optimizer state, checkpoints and distributed reductions line up across runs and ranks.
        seen: dict[int, nn.Parameter] = {}
        for module in self.supernet_modules():
            for param in getattr(module, 'arch_parameters', lambda: [])():
                seen.setdefault(id(param), param)
        return list(seen.values())

    def weight_optimizer(self) -> torch.optim.Optimizer:
        """The evaluator's (single) weight optimizer, unwrapped from Lightning."""
        optimizers = self.optimizers()
        if not isinstance(optimizers, list):
            optimizers = [optimizers]
        weight_optimizers = [opt for opt in optimizers if not getattr(opt, 'is_arch_optimizer', False)]
        if len(weight_optimizers) != 1:
            raise ValueError(f'iDARTS needs exactly one weight optimizer in the evaluator, found {len(weight_optimizers)}.')
        return getattr(weight_optimizers[0], 'optimizer', weight_optimizers[0])

    def weight_parameters(self) -> list[nn.Parameter]:
        """The lower-level variables w: what the weight optimizer trains (NNI has already removed the alphas)."""
        return [p for group in self.weight_optimizer().param_groups for p in group['params'] if p.requires_grad]

    def current_weight_lr(self) -> float:
        return float(self.weight_optimizer().param_groups[0]['lr'])

    # ----- the losses of the two levels -----

    @contextlib.contextmanager
    def _redirect_logging(self, rename: Callable[[str], str] | None) -> Iterator[None]:
        """While a loss closure runs the evaluator's ``training_step``, rename its logged keys or drop them.

        The closures run the evaluator's training_step on validation batches, and the train closure runs more than
        once per step: logged as they are, they would be counted as training metrics.
        """
        inner = self.training_module
        original = inner.log

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if rename is not None:
                original(rename(name), value, *args, **kwargs)

        inner.log = log  # type: ignore[method-assign]
        try:
            yield
        finally:
            inner.log = original  # type: ignore[method-assign]

    def _loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.training_module.training_step(batch, batch_idx)
        return out['loss'] if isinstance(out, dict) else out

    def _l2_penalty(self) -> torch.Tensor | float:
        # The weight steps minimise L_train plus the optimizer's L2 weight decay, so the inner solution w*(a), and
        # with it the Hessian of the implicit-function theorem, belong to that regularised objective.
        penalty: torch.Tensor | float = 0.0
        for group in self.weight_optimizer().param_groups:
            decay = group.get('weight_decay', 0.0)
            if decay:
                penalty = penalty + 0.5 * decay * sum((p * p).sum() for p in group['params'] if p.requires_grad)
        return penalty

    # ----- the search loop -----

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if not isinstance(batch, dict) or 'train' not in batch or 'val' not in batch:
            raise TypeError('iDARTS expects batches of the form {"train": ..., "val": ...} from the DARTS combined loader; '
                            f'got {type(batch).__name__}.')
        warmed_up = self.trainer.current_epoch >= self.warmup_epochs
        if warmed_up and batch_idx % self.inner_steps == 0:
            self.architecture_step(batch['train'], batch['val'], batch_idx)

        self.resample()
        out = self.training_module.training_step(batch['train'], 2 * batch_idx + 1)
        loss = out['loss'] if isinstance(out, dict) else out
        self.advance_optimization(loss, batch_idx, self.gradient_clip_val)
        self.advance_lr_schedulers(batch_idx)

        if batch_idx % self.log_prob_every_n_step == 0:
            self.log_probs(self.export_probs())
        return out

    def compute_hypergradient(self, train_batch: Any, val_batch: Any, batch_idx: int) -> tuple[torch.Tensor, ...]:
        """The architecture gradient for one step, by the configured ``hypergradient`` method."""
        alphas = self.arch_parameters()
        weights = self.weight_parameters()

        def train_loss() -> torch.Tensor:
            with self._redirect_logging(None):
                return self._loss(train_batch, 2 * batch_idx) + self._l2_penalty()

        def val_loss() -> torch.Tensor:
            # Called exactly once per hypergradient, so its metrics are logged as validation metrics.
            with self._redirect_logging(_as_validation_key):
                return self._loss(val_batch, 2 * batch_idx)

        if self.hypergradient == 'first_order':
            return hypergradient.first_order(val_loss, weights, alphas)
        if self.hypergradient == 'unrolled':
            return hypergradient.unrolled(train_loss, val_loss, weights, alphas, lr=self.current_weight_lr())
        gamma = self.gamma if self.gamma is not None else self.current_weight_lr()
        return hypergradient.neumann(train_loss, val_loss, weights, alphas, K=self.K, gamma=gamma)

    def architecture_step(self, train_batch: Any, val_batch: Any, batch_idx: int) -> None:
        arc_optim = self.architecture_optimizers()
        if not hasattr(arc_optim, 'step') or isinstance(arc_optim, list):
            raise TypeError(f'Expected one architecture optimizer, found {arc_optim!r}.')
        self.resample()
        alphas = self.arch_parameters()
        grads = self.compute_hypergradient(train_batch, val_batch, batch_idx)
        norm = torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads))  # type: ignore[arg-type]

        if not torch.isfinite(norm):
            # A non-finite step would write NaN into alphas (Adam state too); skip it and count it instead.
            self._nonfinite_in_a_row += 1
            self._nonfinite_total += 1
            self.log('nonfinite_arch_steps', float(self._nonfinite_total))
            if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise NonFiniteHypergradientError(
                    f'{self._nonfinite_in_a_row} architecture steps in a row had a non-finite hypergradient '
                    f'(epoch {self.trainer.current_epoch}, batch {batch_idx}). Lower the learning rates or gamma, '
                    'or set gradient_clip_val.')
            return
        self._nonfinite_in_a_row = 0

        arc_optim.zero_grad()
        for alpha, grad in zip(alphas, grads):
            alpha.grad = grad.detach().to(alpha.dtype)
        arc_optim.step()
        self.log('hypergradient_norm', norm.float())

    # ----- reporting to an NNI trial -----

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        # The evaluator's own logging is redirected here too (NNI's one-shot setup), so this sees every metric.
        super().log(name, value, *args, **kwargs)
        if self.nni_trial is not None and '/' not in name:  # skip the per-choice 'prob/...' entries
            scalar = float(value.detach()) if isinstance(value, torch.Tensor) else value
            if isinstance(scalar, (int, float)):
                total = self._epoch_sums.setdefault(name, [0.0, 0])
                total[0] += float(scalar)
                total[1] += 1

    def nni_default_metric(self) -> str:
        """The key of NNI's ``'default'`` metric: like NNI's SupervisedLearningModule, the single metric on validation."""
        metrics = getattr(self.training_module, 'metrics', None) or {}
        return f'val_{next(iter(metrics))}' if len(metrics) == 1 else 'val_loss'

    def on_train_epoch_start(self) -> None:
        self._epoch_sums = {}
        return super().on_train_epoch_start()

    def on_train_epoch_end(self) -> None:
        result = super().on_train_epoch_end()
        if self.nni_trial is not None and self.trainer.is_global_zero:
            means = {name: total / count for name, (total, count) in self._epoch_sums.items() if count}
            # None in an epoch without architecture steps (warm-up): there is no validation metric to report.
            metric = nni_metric(means, self.nni_default_metric())
            if metric is not None:
                self.nni_trial.report_intermediate(metric)
                self._last_nni_metric = metric
        return result

    def on_fit_end(self) -> None:
        # The evaluator's module reports its own final result here too, but to NasExperiment's engine, not the trial.
        result = super().on_fit_end()
        if (self.nni_trial is not None and self.report_final_result and self.trainer.is_global_zero
                and self._last_nni_metric is not None):
            self.nni_trial.report_final(self._last_nni_metric)
        return result


def _as_validation_key(name: str) -> str:
    return name.replace('train', 'val', 1) if 'train' in name else f'val_{name}'
