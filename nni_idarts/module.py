"""The iDARTS search loop as a Lightning module: it wires batches and optimizers to :mod:`nni_idarts.hypergradient`.

It follows NNI's split: :class:`~nni.nas.oneshot.pytorch.differentiable.DartsLightningModule` already owns the
supernet, the architecture optimizer (Adam, betas (0.5, 0.999), weight decay 1e-3), warm-up and probability logging;
this subclass replaces ``training_step`` (the search loop) and adds only the hooks that data parallelism
(``setup``, ``on_fit_start``) and reporting to an NNI trial (``log`` and the epoch/fit-end hooks) need.

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
from lightning_fabric.utilities.data import _set_sampler_epoch
from pytorch_lightning.trainer.states import RunningStage
from torch.nn.parallel import DistributedDataParallel

from . import hypergradient
from .reporting import TrialReporter, nni_metric

#: The values of the ``hypergradient`` option and what each computes.
HYPERGRADIENTS = ('implicit', 'unrolled', 'first_order')

#: ``gamma='auto'``: power-iteration steps (Hessian-vector products) at the first architecture step, from a random
#: vector; then ``AUTO_ITERS`` more every ``AUTO_EVERY`` architecture steps, warm-started from the last vector.
AUTO_INITIAL_ITERS = 10
AUTO_ITERS = 2
AUTO_EVERY = 5
#: Warn when the last Neumann term is this many times the first: terms that grow show the series is not converging;
#: a margin above 1 keeps the warning for real growth, not for the ~1.00x of near-flat directions at a small gamma.
TERM_GROWTH_WARNING = 1.1


class NeumannSeriesWarning(UserWarning):
    """The terms of the Neumann series grew: the implicit gradient is not an inverse-Hessian product there."""


class ValidationStream:
    """The validation batches of the architecture steps: drawn one per step, in order, never skipped.

    The loader is read pass after pass (pass p shuffled as the loader's epoch p), independently of the training
    loader's epochs, so every validation batch is used once per pass whatever the number T of weight steps per
    architecture step. Its position (pass, batches drawn) goes into the checkpoint; a loader with Lightning's
    ``load_state_dict`` protocol (:class:`~nni_idarts.checkpoint.ResumableDataLoader`) resumes without loading the
    batches it skips, any other by drawing and dropping them.
    """

    def __init__(self, loader: Any):
        self.loader = loader
        self.epoch = 0        # the pass over the loader
        self.position = 0     # batches drawn in this pass
        self._iterator: Iterator[Any] | None = None

    def shard(self, trainer: Any) -> None:
        """Under DDP, give the loader a distributed sampler, as Lightning does for the training loader."""
        self.loader = trainer._data_connector._prepare_dataloader(self.loader, shuffle=True, mode=RunningStage.TRAINING)
        self._iterator = None

    def _start(self, skip: int) -> None:
        _set_sampler_epoch(self.loader, self.epoch)
        resumable = hasattr(self.loader, 'load_state_dict')
        if skip and resumable:
            self.loader.load_state_dict({'position': skip})
        self._iterator = iter(self.loader)
        if not resumable:
            for _ in range(skip):
                next(self._iterator)

    def next(self) -> Any:
        if self._iterator is None:
            self._start(self.position)
        assert self._iterator is not None
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._start(0)
            batch = next(self._iterator)  # type: ignore[arg-type]  # an empty loader is refused by the strategy
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {'epoch': self.epoch, 'position': self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state['epoch']), int(state['position'])
        self._iterator = None


class NonFiniteStepError(RuntimeError):
    """Raised when too many steps of one kind in a row had a non-finite loss or gradient (and were skipped)."""


class NonFiniteHypergradientError(NonFiniteStepError):
    """Raised when too many architecture steps in a row had a non-finite loss or hypergradient."""


class IDartsLightningModule(DartsLightningModule):
    """One-shot module of :class:`~nni_idarts.IDartsStrategy`. See the strategy for the meaning of the options.

    The paper's loop: every training batch (``{'train': ...}``, from the strategy's loader) makes one weight step;
    after every ``inner_steps`` (T) weight steps (counted over the whole search, so an epoch's end does not shorten
    the gap; none at initialisation) comes one architecture step on the next batch of the validation stream
    (:class:`ValidationStream`, set by the strategy), with L_val on that batch and L_train on the training batch of
    the last weight step, at the weights after it, plus the weight optimizer's L2 weight decay.

    Inside an NNI trial (``nnictl create``) the module reports to the trial by itself: after every epoch the epoch
    means of its logged metrics as an intermediate result (``'default'``: the validation accuracy of the
    architecture steps, or the evaluator's single metric), and, if ``report_final_result``, the last of them as the
    final result. Outside a trial it reports nothing. See :mod:`nni_idarts.reporting`.
    """

    def __init__(self, training_module: nn.Module, *,
                 hypergradient: str = 'implicit',
                 K: int = 2,
                 gamma: float | str | None = None,
                 damping: float = 0.0,
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
        self.damping = damping
        self.inner_steps = inner_steps
        self.max_nonfinite_steps = max_nonfinite_steps
        self.validation_stream: ValidationStream | None = None  # set by the strategy with its validation loader
        self.last_val_batch: Any = None       # the validation batch of the last architecture step (for probes)
        self._arch_steps = 0                  # architecture steps attempted (the schedule of gamma='auto')
        self._lambda_max: float | None = None  # gamma='auto': the latest estimate of lambda_max(H)
        self._power_vector: tuple[torch.Tensor, ...] | None = None  # and its warm start
        self._warned_series = False
        self.last_diagnostics: dict[str, float] = {}  # what the last architecture step logged besides its norm
        self._nonfinite_in_a_row = 0          # architecture steps
        self._nonfinite_total = 0
        self._nonfinite_weight_in_a_row = 0   # weight steps
        self._nonfinite_weight_total = 0
        self._batches_checked = False
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

    def _count_nonfinite(self, kind: str, batch_idx: int) -> None:
        """Count a skipped step of ``kind`` ('architecture' or 'weight'), log the total, raise after too many in a row."""
        if kind == 'architecture':
            self._nonfinite_in_a_row += 1
            self._nonfinite_total += 1
            in_a_row, total, error = self._nonfinite_in_a_row, self._nonfinite_total, NonFiniteHypergradientError
            what, key = 'architecture steps in a row had a non-finite loss or hypergradient', 'nonfinite_arch_steps'
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
        if not self.training_module.automatic_optimization:
            raise ValueError('The evaluator\'s module uses manual optimization; iDARTS drives the weight optimizer '
                             'itself and needs an evaluator with automatic optimization.')
        _warn_if_decoupled_weight_decay(self.weight_optimizer())
        if self.validation_stream is not None and self.trainer.world_size > 1:
            self.validation_stream.shard(self.trainer)
        if self.trainer.world_size > 1:
            # DDP broadcast the weights from rank 0 but not the alphas, which it ignores: do it here.
            with torch.no_grad():
                for alpha in self.arch_parameters():
                    alpha.copy_(self.trainer.strategy.broadcast(alpha.detach().clone(), src=0))
        return super().on_fit_start()

    # ----- the search loop -----

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if not isinstance(batch, dict) or 'train' not in batch:
            raise TypeError('iDARTS expects batches of the form {"train": ...} from IDartsStrategy\'s loader; '
                            f'got {type(batch).__name__}.')
        self.resample()
        buffers = self._snapshot_buffers()
        out = self.training_module.training_step(batch['train'], 2 * batch_idx + 1)
        loss = out['loss'] if isinstance(out, dict) else out
        self.weight_step(loss, batch_idx, buffers)
        self.advance_lr_schedulers(batch_idx)

        self.last_val_batch = None
        warmed_up = self.trainer.current_epoch >= self.warmup_epochs
        # Weight steps are counted over the whole search (Lightning's progress, which a resumed run restores), not
        # within the epoch: so an architecture step follows every T-th weight step, across epoch ends too.
        if warmed_up and (self.trainer.fit_loop.epoch_loop.total_batch_idx + 1) % self.inner_steps == 0:
            val_batch = self._next_val_batch()
            if not self._batches_checked:
                _check_same_structure(batch['train'], val_batch)
                self._batches_checked = True
            self.last_val_batch = val_batch
            self.architecture_step(batch['train'], val_batch, batch_idx)

        if batch_idx % self.log_prob_every_n_step == 0:
            self.log_probs(self.export_probs())
        return out

    def _next_val_batch(self) -> Any:
        if self.validation_stream is None:
            raise RuntimeError('No validation loader: IDartsLightningModule is driven by IDartsStrategy, which sets '
                               'its validation_stream from the evaluator\'s val_dataloaders.')
        return self._apply_batch_transfer_handler(self.validation_stream.next())

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
                              losses: list[torch.Tensor] | None = None,
                              diagnostics: dict[str, float] | None = None) -> tuple[torch.Tensor, ...]:
        """The architecture gradient for one step, by the configured ``hypergradient`` method.

        L_val is the evaluator's loss on ``val_batch``; L_train its loss on ``train_batch`` plus the weight
        optimizer's L2 weight decay. Under data parallelism it is the hypergradient of the mean loss over the global
        batch (see the module docstring), identical on every rank. The loss values the closures compute are appended
        to ``losses``; for ``'implicit'``, ``diagnostics`` receives ``gamma``, ``lambda_max`` (with gamma='auto')
        and what :func:`~nni_idarts.hypergradient.neumann` reports.
        """
        alphas = self.arch_parameters()
        weights = self.weight_parameters()
        train_loss, val_loss = self.loss_closures(train_batch, val_batch, batch_idx, losses)

        reduce = self._mean_over_ranks
        if self.hypergradient == 'first_order':
            return hypergradient.first_order(val_loss, weights, alphas, reduce=reduce)
        if self.hypergradient == 'unrolled':
            return hypergradient.unrolled(train_loss, val_loss, weights, alphas, lr=self.current_weight_lr(),
                                          reduce=reduce)
        gamma = self._neumann_gamma(train_loss, weights)
        found: dict[str, float] = {}
        grads = hypergradient.neumann(train_loss, val_loss, weights, alphas, K=self.K, gamma=gamma,
                                      damping=self.damping, reduce=reduce, diagnostics=found)
        if diagnostics is not None:
            diagnostics.update(found, gamma=gamma)
            if self._lambda_max is not None:
                diagnostics['lambda_max'] = self._lambda_max
        return grads

    def loss_closures(self, train_batch: Any, val_batch: Any, batch_idx: int = 0,
                      losses: list[torch.Tensor] | None = None) -> tuple[hypergradient.Loss, hypergradient.Loss]:
        """``(train_loss, val_loss)`` as :mod:`nni_idarts.hypergradient` takes them: the evaluator's loss on
        ``train_batch`` plus the weight optimizer's L2 weight decay, and its loss on ``val_batch`` (logged as the
        validation metrics). Each value computed is appended to ``losses`` if given. Each call is a forward pass in
        training mode, so it also updates BatchNorm running statistics (which the training-mode losses never read)."""
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

        return train_loss, val_loss

    def _neumann_gamma(self, train_loss: hypergradient.Loss, weights: list[nn.Parameter]) -> float:
        """gamma for this step: the option's number, the current weight lr (None) or, for 'auto',
        ``min(lr, 1 / lambda_max)`` with lambda_max re-estimated on this step's L_train every AUTO_EVERY steps."""
        lr = self.current_weight_lr()
        if self.gamma is None:
            return lr
        if self.gamma != 'auto':
            return float(self.gamma)
        if self._power_vector is None or self._lambda_max is None:
            vector, iters = hypergradient.random_vector(weights), AUTO_INITIAL_ITERS
        elif self._arch_steps % AUTO_EVERY == 0:
            vector, iters = self._power_vector, AUTO_ITERS
        else:
            return hypergradient.auto_gamma(lr, self._lambda_max)
        estimate, vector = hypergradient.power_iteration(train_loss, weights, vector, iters=iters,
                                                         reduce=self._mean_over_ranks)
        if torch.isfinite(torch.tensor(estimate)) and all(torch.isfinite(v).all() for v in vector):
            self._lambda_max, self._power_vector = estimate, vector
        else:  # a non-finite batch: keep the last estimate (the step itself is skipped by the finiteness gate)
            self._power_vector = None if self._lambda_max is None else self._power_vector
        return hypergradient.auto_gamma(lr, self._lambda_max if self._lambda_max is not None else 0.0)

    def architecture_step(self, train_batch: Any, val_batch: Any, batch_idx: int) -> None:
        arc_optim = self.architecture_optimizers()
        if not hasattr(arc_optim, 'step') or isinstance(arc_optim, list):
            raise TypeError(f'Expected one architecture optimizer, found {arc_optim!r}.')
        self.resample()
        alphas = self.arch_parameters()
        buffers = self._snapshot_buffers()
        losses: list[torch.Tensor] = []
        diagnostics: dict[str, float] = {}
        grads = self.compute_hypergradient(train_batch, val_batch, batch_idx, losses, diagnostics)
        self._arch_steps += 1
        norm = torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads))  # type: ignore[arg-type]

        if not self._all_ranks_finite([*losses, norm]):
            # A non-finite step would write NaN into alphas (Adam state too); skip it and count it instead.
            self._restore_buffers(buffers)
            self._count_nonfinite('architecture', batch_idx)
            return
        self._nonfinite_in_a_row = 0

        arc_optim.zero_grad()
        for alpha, grad in zip(alphas, grads):
            alpha.grad = grad.detach().to(alpha.dtype)
        arc_optim.step()
        self.log('hypergradient_norm', norm.float())
        self.last_diagnostics = diagnostics
        for key, value in diagnostics.items():
            self.log(key, float(value))
        self._warn_if_series_grows(diagnostics)

    def _warn_if_series_grows(self, diagnostics: dict[str, float]) -> None:
        growth = diagnostics.get('term_growth', 0.0)
        if self._warned_series or self.K == 0 or not growth > TERM_GROWTH_WARNING or not self.trainer.is_global_zero:
            return
        self._warned_series = True
        gamma = diagnostics['gamma']
        curvature = (f', gamma * lambda_max = {gamma * diagnostics["lambda_max"]:.3g}'
                     if 'lambda_max' in diagnostics else '')
        warnings.warn(
            f'iDARTS: the Neumann series is not converging at architecture step {self._arch_steps} (its last term is '
            f'{growth:.3g}x the first, gamma = {gamma:.3g}{curvature}): the weight Hessian has directions of negative '
            'or too large curvature there, so the implicit gradient is not an inverse-Hessian product and more '
            'terms (K) move it further from it. Remedies: damping > 0 (above the most negative curvature), '
            "gamma='auto' (caps gamma at 1/lambda_max), or a smaller K. The logged term_growth, "
            'cosine_to_first_order and correction_ratio show how it evolves (warned once).',
            NeumannSeriesWarning, stacklevel=2)

    # ----- checkpoints: the state a resumed search needs besides Lightning's -----

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint['idarts'] = {
            'validation_stream': self.validation_stream.state_dict() if self.validation_stream is not None else None,
            'arch_steps': self._arch_steps,
            'lambda_max': self._lambda_max,
            'power_vector': [v.detach().cpu() for v in self._power_vector] if self._power_vector is not None else None,
            'warned_series': self._warned_series,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get('idarts')
        if state is None:
            return
        if state['validation_stream'] is not None and self.validation_stream is not None:
            self.validation_stream.load_state_dict(state['validation_stream'])
        self._arch_steps = state['arch_steps']
        self._lambda_max = state['lambda_max']
        vectors = state['power_vector']
        self._power_vector = (None if vectors is None else
                              tuple(v.to(p.device) for v, p in zip(vectors, self.weight_parameters())))
        self._warned_series = state['warned_series']

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


def _warn_if_decoupled_weight_decay(optimizer: torch.optim.Optimizer) -> None:
    """L_train adds ``0.5 * weight_decay * |w|^2`` (see ``_l2_penalty``): the objective SGD's coupled weight decay
    minimises. Decoupled decay (AdamW, ``decoupled_weight_decay=True``) is no gradient of any term of the loss, so
    the weights it reaches are not a minimum of that L_train and the implicit gradient is only approximate."""
    decoupled = isinstance(optimizer, torch.optim.AdamW) or any(
        group.get('decoupled_weight_decay', False) for group in optimizer.param_groups)
    if decoupled and any(group.get('weight_decay', 0.0) for group in optimizer.param_groups):
        warnings.warn(f'iDARTS: the weight optimizer {type(optimizer).__name__} uses decoupled weight decay, which is '
                      'not the gradient of an L2 term; the hypergradient\'s L_train adds 0.5 * weight_decay * |w|^2 '
                      'as for SGD, so it describes these weights only approximately. Use SGD (or Adam) with '
                      'weight_decay, or weight_decay=0 with AdamW, for an exact inner objective.', UserWarning)


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
