"""The iDARTS search loop as a Lightning module: it wires batches and optimizers to :mod:`nni_idarts.hypergradient`.

It follows NNI's split: :class:`~nni.nas.oneshot.pytorch.differentiable.DartsLightningModule` already owns the
supernet, the architecture optimizer (Adam, betas (0.5, 0.999), weight decay 1e-3), warm-up and probability logging;
this subclass replaces ``training_step`` (the search loop) and adds only the hooks that data parallelism
(``setup``, ``on_fit_start``), reporting to an NNI trial (``log`` and the epoch/fit-end hooks) and the guards of
issue 9 need: trainer settings refused in ``on_fit_start`` and an ``alphas_moved`` check added by
``configure_callbacks`` (:mod:`nni_idarts.guards`), a double-backward probe before the first step in
``on_train_batch_start`` and the twice-differentiable formulations around the hypergradient
(:mod:`nni_idarts.second_order`), and the Adam-overflow / optimizer-state checks around the architecture step.

Data parallelism (Lightning's DDP strategy, e.g. ``Trainer(strategy='ddp', devices=N)``): Lightning wraps this module
in ``DistributedDataParallel`` and shards both parts of the DARTS combined loader with a ``DistributedSampler``, so
each of the R ranks sees its own b samples of a global batch of R*b. The search is the single-process search of that
global batch, because every quantity that feeds an update is the mean over ranks of the per-rank quantity:

- weight step: ``manual_backward`` goes through DDP, whose reducer averages the weight gradients;
- architecture step: the hypergradient is built with ``torch.autograd.grad``, which DDP never sees, so
  :meth:`IDartsLightningModule.compute_hypergradient` passes an explicit all-ranks mean as ``reduce`` to
  :mod:`nni_idarts.hypergradient`: it is applied to ``grad_w L_val`` and ``grad_a L_val``, to each of the K
  Hessian-vector products before the next Neumann term is formed, and to the final mixed product (see there for
  why that is exact). The hypergradient, and with it the Adam step and the alphas, are then identical on all ranks;
- skip decisions (non-finite steps) are agreed by all ranks, so no rank skips a collective the others join.

The alphas are parameters of the supernet, but DDP is told to ignore them (:meth:`IDartsLightningModule.setup`):
they change only through the architecture step, whose gradient is reduced explicitly, and DDP's reducer, which
expects a gradient for every parameter it tracks, would fail during warm-up, when NNI freezes the alphas. So the
weight step's all-reduce covers exactly the weights (the weight optimizer excludes the alphas, NNI's
``postprocess_weight_optimizers``; the alpha gradient that backward leaves behind is overwritten by the next
architecture step), and the alphas are broadcast from rank 0 once, at the start of fit.

BatchNorm normalises with per-rank batch statistics, as in any DDP training; only a model without batch statistics
has a global-batch loss that is exactly the mean of the rank losses.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from nni.nas.oneshot.pytorch.differentiable import DartsLightningModule
from torch.nn.parallel import DistributedDataParallel

from . import guards, hypergradient, second_order
from .reporting import TrialReporter, nni_metric

#: The values of the ``hypergradient`` option and what each computes.
HYPERGRADIENTS = ('implicit', 'unrolled', 'first_order')


class NonFiniteStepError(RuntimeError):
    """Raised when too many steps of one kind in a row had a non-finite loss or gradient (and were skipped)."""


class NonFiniteHypergradientError(NonFiniteStepError):
    """Raised when too many architecture steps in a row had a non-finite loss or hypergradient."""


class IDartsLightningModule(DartsLightningModule):
    """One-shot module of :class:`~nni_idarts.IDartsStrategy`. See the strategy for the meaning of the options.

    Each training batch is a dict ``{'train': ..., 'val': ...}`` (NNI's DARTS combined loader). Every batch makes
    one weight step on its ``train`` part; every ``inner_steps``-th batch (counted over the whole search, starting
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
        self._nonfinite_in_a_row = 0          # architecture steps
        self._nonfinite_total = 0
        self._nonfinite_weight_in_a_row = 0   # weight steps
        self._nonfinite_weight_total = 0
        self._batches_checked = False
        self._double_backward_checked = False
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

    def _lightning_weight_optimizer(self) -> Any:
        """The evaluator's (single) weight optimizer, as Lightning's wrapper (which tracks optimizer progress)."""
        optimizers = self.optimizers()
        if not isinstance(optimizers, list):
            optimizers = [optimizers]
        weight_optimizers = [opt for opt in optimizers if not getattr(opt, 'is_arch_optimizer', False)]
        if len(weight_optimizers) != 1:
            raise ValueError(f'iDARTS needs exactly one weight optimizer in the evaluator, found {len(weight_optimizers)}: '
                             'make the evaluator\'s configure_optimizers() return a single optimizer.')
        return weight_optimizers[0]

    def weight_optimizer(self) -> torch.optim.Optimizer:
        """The evaluator's (single) weight optimizer, unwrapped from Lightning."""
        optimizer = self._lightning_weight_optimizer()
        return getattr(optimizer, 'optimizer', optimizer)

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

    # ----- data parallelism and numerical safety -----

    def _mean_over_ranks(self, tensors: hypergradient.Tensors) -> tuple[torch.Tensor, ...]:
        """The element-wise mean of ``tensors`` over the data-parallel ranks; the identity on a single process.

        The ``reduce`` of :mod:`nni_idarts.hypergradient`. All tensors go through one all-reduce (flattened into a
        single buffer), so a Neumann step costs one collective whatever the number of parameter tensors.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return tuple(tensors)
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        flat = trainer.strategy.reduce(flat, reduce_op='mean')
        pieces = torch.split(flat, [t.numel() for t in tensors])
        return tuple(p.reshape(t.shape).to(t.dtype) for p, t in zip(pieces, tensors))

    def _all_ranks_finite(self, tensors: list[torch.Tensor]) -> bool:
        """Whether every tensor is finite on every rank.

        Under DDP all ranks must take the same branch: a step skipped on one rank only would leave the ranks with
        different parameters, and a collective that one rank skips hangs the others.
        """
        finite = bool(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all()) if tensors else True
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        return finite

    def _snapshot_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Forward passes in training mode update buffers (BatchNorm running statistics) before the loss is known;
        # a skipped step puts them back, so a NaN batch leaves no NaN behind in them either.
        return [(b, b.detach().clone()) for b in self.training_module.buffers()]

    @staticmethod
    def _restore_buffers(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.no_grad():
            for buffer, saved in snapshot:
                buffer.copy_(saved)

    def _count_nonfinite(self, kind: str, batch_idx: int, overflow: float | None = None) -> None:
        """Count a skipped step of ``kind`` ('architecture' or 'weight'), log the total, raise after too many in a row.

        ``overflow``: the largest entry of a finite hypergradient that was skipped because Adam could not square it
        (:func:`~nni_idarts.guards.overflow_magnitude`), for the warning that says so.
        """
        if kind == 'architecture':
            self._nonfinite_in_a_row += 1
            self._nonfinite_total += 1
            in_a_row, total, error = self._nonfinite_in_a_row, self._nonfinite_total, NonFiniteHypergradientError
            what, key = ('architecture steps in a row had a non-finite loss or hypergradient (or one too large for '
                         'Adam to square)'), 'nonfinite_arch_steps'
            if overflow is not None and self.trainer.is_global_zero:
                warnings.warn(f'Architecture step skipped (epoch {self.trainer.current_epoch}, batch {batch_idx}): '
                              f'a hypergradient entry of {overflow:.3g} would overflow when Adam squares it. A '
                              'hypergradient this large usually means the Neumann series diverges: lower gamma (see '
                              'hypergradient.largest_eigenvalue) or K, or use hypergradient=\'first_order\'.',
                              RuntimeWarning, stacklevel=2)
        else:
            self._nonfinite_weight_in_a_row += 1
            self._nonfinite_weight_total += 1
            in_a_row, total, error = self._nonfinite_weight_in_a_row, self._nonfinite_weight_total, NonFiniteStepError
            what, key = 'weight steps in a row had a non-finite training loss or weight gradient', 'nonfinite_weight_steps'
        self.log(key, float(total))
        if in_a_row >= self.max_nonfinite_steps:
            raise error(f'{in_a_row} {what} (epoch {self.trainer.current_epoch}, batch {batch_idx}); each was skipped. '
                        'Check the data for NaN/inf, lower the learning rates or gamma, or set gradient_clip_val.')

    def setup(self, stage: str = None) -> None:  # type: ignore[assignment]  # NNI's signature
        result = super().setup(stage)
        # Runs before Lightning wraps the module in DistributedDataParallel; see the module docstring for why the
        # alphas are kept out of DDP. (A no-op without DDP.)
        names = {id(p): name for name, p in self.named_parameters()}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, [names[id(alpha)] for alpha in self.arch_parameters()])
        return result

    def on_fit_start(self) -> None:
        # Fail before the first step, not at it: the optimizers exist from here on.
        guards.check_trainer(self.trainer, self)  # mixed precision, SyncBatchNorm (issue 9)
        if not self.training_module.automatic_optimization:
            raise ValueError('The evaluator\'s module uses manual optimization; iDARTS drives the weight optimizer '
                             'itself and needs an evaluator with automatic optimization.')
        self._lightning_weight_optimizer()
        if self.trainer.world_size > 1:
            # DDP broadcast the weights from rank 0 but not the alphas, which it ignores: do it here.
            with torch.no_grad():
                for alpha in self.arch_parameters():
                    alpha.copy_(self.trainer.strategy.broadcast(alpha.detach().clone(), src=0))
        return super().on_fit_start()

    def configure_callbacks(self) -> list[Any]:
        # Any search, also one run through NasExperiment directly, says whether its alphas moved (issue 9).
        if any(isinstance(cb, guards.AlphasMovedCheck) for cb in self.trainer.callbacks):  # e.g. search() added one
            return []
        return [guards.AlphasMovedCheck()]

    def on_train_batch_start(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        # Before the first step of a second-order search: one probe double backward, so that an op without one fails
        # here with a message naming it instead of inside the first architecture step (issue 9).
        if not self._double_backward_checked and self.hypergradient != 'first_order' and isinstance(batch, dict):
            self._check_double_backward(batch['train'])
        self._double_backward_checked = True
        return super().on_train_batch_start(batch, batch_idx, *args, **kwargs)

    def _check_double_backward(self, train_batch: Any) -> None:
        buffers = self._snapshot_buffers()
        devices = [p.device for p in self.weight_parameters()[:1] if p.device.type == 'cuda']
        # The probe must leave no trace: buffers restored, and the RNG too (dropout), so that a search with the
        # probe draws the same random numbers as one without (determinism, resume).
        with torch.random.fork_rng(devices=devices), self._redirect_logging(None), \
                second_order.double_backward_formulations():
            self.resample()
            second_order.check_double_backward(lambda: self._loss(train_batch, 0) + self._l2_penalty(),
                                               self.weight_parameters(), self.arch_parameters(),
                                               hypergradient=self.hypergradient)
        self._restore_buffers(buffers)

    # ----- the search loop -----

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if not isinstance(batch, dict) or 'train' not in batch or 'val' not in batch:
            raise TypeError('iDARTS expects batches of the form {"train": ..., "val": ...} from the DARTS combined loader; '
                            f'got {type(batch).__name__}.')
        if not self._batches_checked:
            _check_same_structure(batch['train'], batch['val'])
            self._batches_checked = True
        warmed_up = self.trainer.current_epoch >= self.warmup_epochs
        # Batches are counted over the whole search (Lightning's progress, which a resumed run restores), not within
        # the epoch: so there are always inner_steps weight steps between two architecture steps, across epoch ends.
        if warmed_up and self.trainer.fit_loop.epoch_loop.total_batch_idx % self.inner_steps == 0:
            self.architecture_step(batch['train'], batch['val'], batch_idx)

        self.resample()
        buffers = self._snapshot_buffers()
        out = self.training_module.training_step(batch['train'], 2 * batch_idx + 1)
        loss = out['loss'] if isinstance(out, dict) else out
        self.weight_step(loss, batch_idx, buffers)
        self.advance_lr_schedulers(batch_idx)

        if batch_idx % self.log_prob_every_n_step == 0:
            self.log_probs(self.export_probs())
        return out

    def weight_step(self, loss: torch.Tensor, batch_idx: int,
                    buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """NNI's ``advance_optimization`` (zero_grad, backward, clip, step) with a finiteness gate before clip and step.

        The backward runs even for a non-finite loss: under DDP it is also the gradient all-reduce, which every rank
        must join. A skipped step leaves weights, optimizer state and (given the snapshot) buffers as they were.
        """
        optimizer = self._lightning_weight_optimizer()
        epoch = self.trainer.current_epoch
        self.training_module.optimizer_zero_grad(epoch, batch_idx, optimizer)
        self.manual_backward(loss)
        grads = [p.grad for p in self.weight_parameters() if p.grad is not None]
        if not self._all_ranks_finite([loss, *grads]):
            self.training_module.optimizer_zero_grad(epoch, batch_idx, optimizer)  # no NaN left in .grad either
            if buffers is not None:
                self._restore_buffers(buffers)
            self._count_nonfinite('weight', batch_idx)
            return
        self._nonfinite_weight_in_a_row = 0
        self.training_module.configure_gradient_clipping(optimizer, self.gradient_clip_val, None)
        self.training_module.optimizer_step(epoch, batch_idx, optimizer)
        self._optimizer_progress += 1

    def compute_hypergradient(self, train_batch: Any, val_batch: Any, batch_idx: int,
                              losses: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """The architecture gradient for one step, by the configured ``hypergradient`` method.

        Under data parallelism it is the hypergradient of the mean loss over the global batch (see the module
        docstring), identical on every rank. The loss values the closures compute are appended to ``losses``.
        """
        alphas = self.arch_parameters()
        weights = self.weight_parameters()
        seen = losses if losses is not None else []

        def train_loss() -> torch.Tensor:
            with self._redirect_logging(None):
                loss = self._loss(train_batch, 2 * batch_idx) + self._l2_penalty()
            seen.append(loss.detach())
            return loss

        def val_loss() -> torch.Tensor:
            # Called exactly once per hypergradient, so its metrics are logged as validation metrics.
            with self._redirect_logging(_as_validation_key):
                loss = self._loss(val_batch, 2 * batch_idx)
            seen.append(loss.detach())
            return loss

        reduce = self._mean_over_ranks
        if self.hypergradient == 'first_order':
            return hypergradient.first_order(val_loss, weights, alphas, reduce=reduce)
        if self.hypergradient == 'unrolled':
            return hypergradient.unrolled(train_loss, val_loss, weights, alphas, lr=self.current_weight_lr(),
                                          reduce=reduce)
        gamma = self.gamma if self.gamma is not None else self.current_weight_lr()
        return hypergradient.neumann(train_loss, val_loss, weights, alphas, K=self.K, gamma=gamma, reduce=reduce)

    def architecture_step(self, train_batch: Any, val_batch: Any, batch_idx: int) -> None:
        arc_optim = self.architecture_optimizers()
        if not hasattr(arc_optim, 'step') or isinstance(arc_optim, list):
            raise TypeError(f'Expected one architecture optimizer, found {arc_optim!r}.')
        self.resample()
        alphas = self.arch_parameters()
        buffers = self._snapshot_buffers()
        losses: list[torch.Tensor] = []
        # Second order: ops without a double backward run as an equivalent formulation, in this call only (issue 9).
        with second_order.double_backward_formulations(self.hypergradient != 'first_order'):
            grads = self.compute_hypergradient(train_batch, val_batch, batch_idx, losses)
        norm = torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads))  # type: ignore[arg-type]

        # A non-finite step would write NaN into alphas (Adam state too); skip it and count it instead. So would a
        # finite hypergradient whose square overflows the alphas' dtype: Adam's second moment would become inf and
        # every later step 0, a silent freeze (issue 9; see guards.py).
        if not self._all_ranks_finite([*losses, norm, *guards.adam_squares(grads, alphas)]):
            self._restore_buffers(buffers)
            self._count_nonfinite('architecture', batch_idx, overflow=guards.overflow_magnitude(grads, alphas))
            return
        self._nonfinite_in_a_row = 0

        arc_optim.zero_grad()
        for alpha, grad in zip(alphas, grads):
            alpha.grad = grad.detach().to(alpha.dtype)
        saved = guards.snapshot_optimizer(arc_optim.optimizer)
        arc_optim.step()
        if not self._all_ranks_finite(guards.optimizer_tensors(arc_optim.optimizer)):
            # Second line of the freeze guard (issue 9): undo a step that left the optimizer's state non-finite.
            guards.restore_optimizer(arc_optim.optimizer, saved)
            self._count_nonfinite('architecture', batch_idx)
            return
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


def _structure(batch: Any) -> Any:
    """What a batch is made of, up to the batch size: nested containers of ``(dtype, per-sample shape)``."""
    if isinstance(batch, torch.Tensor):
        return ('tensor', str(batch.dtype), tuple(batch.shape[1:]))
    if isinstance(batch, (list, tuple)):
        return [_structure(b) for b in batch]
    if isinstance(batch, dict):
        return {k: _structure(v) for k, v in sorted(batch.items(), key=lambda kv: str(kv[0]))}
    return type(batch).__name__


def _check_same_structure(train_batch: Any, val_batch: Any) -> None:
    """L_val is the evaluator's training_step on a validation batch, so both loaders must yield the same kind of batch."""
    train, val = _structure(train_batch), _structure(val_batch)
    if train != val:
        raise ValueError('The validation batches do not match the training batches (the architecture step runs the '
                         f'same training_step on both): train batch {train}, validation batch {val}.')


def _as_validation_key(name: str) -> str:
    return name.replace('train', 'val', 1) if 'train' in name else f'val_{name}'
