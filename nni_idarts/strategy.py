"""``IDartsStrategy``: NNI 3.0's DARTS strategy with the iDARTS architecture step plugged in."""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn
from nni.nas.nn.pytorch import ModelSpace
from nni.nas.strategy import DARTS

from .errors import brief, require_int
from .module import HYPERGRADIENTS, IDartsLightningModule, ValidationStream


class IDartsStrategy(DARTS):
    """Differentiable architecture search with stochastic implicit gradients (iDARTS; Zhang et al., ICML 2021).

    It keeps everything of NNI's :class:`~nni.nas.strategy.DARTS`: the supernet built by NNI's mutation hooks
    (``LayerChoice``, ``InputChoice``, ``Repeat``, ``Cell`` and layers with ``nni.choice`` arguments), the softmax
    relaxation, the train/val split of the data, export and the architecture optimizer (Adam with betas (0.5, 0.999)
    and weight decay 1e-3). It runs the paper's loop (T weight steps, then one architecture step on the next
    validation batch; see :class:`~nni_idarts.module.IDartsLightningModule`) and replaces the architecture gradient
    with the implicit hypergradient

        dL_val/da = grad_a L_val - d2_{a,w} L_train . [d2_w L_train]^-1 . grad_w L_val

    with ``[d2_w L_train]^-1`` approximated by ``gamma * sum_{k=0..K} (I - gamma * d2_w L_train)^k`` on minibatches.
    The math is in :mod:`nni_idarts.hypergradient`. It runs under Lightning's DDP strategy as the search of the global
    batch, with every reduction the hypergradient needs made explicit (see :mod:`nni_idarts.module`).

    Parameters
    ----------
    hypergradient
        ``'implicit'`` (iDARTS, :func:`~nni_idarts.hypergradient.neumann`), ``'unrolled'`` (DARTS 2nd order,
        :func:`~nni_idarts.hypergradient.unrolled` with lr = the weight learning rate) or ``'first_order'``
        (DARTS 1st order, :func:`~nni_idarts.hypergradient.first_order`).
    K
        Number of Neumann terms after the identity (paper: 2). ``K=0`` approximates the inverse Hessian by gamma * I.
    gamma
        Step size of the Neumann series. ``None`` (the paper's choice) uses the weight optimizer's current learning
        rate (which the search anneals); a number fixes it; ``'auto'`` uses ``min(lr, 1 / lambda_max)`` with
        lambda_max, the largest Hessian eigenvalue, re-estimated along the search by a warm-started power iteration
        (10 Hessian-vector products at the first architecture step, then 2 every 5 steps).
    damping
        Adds ``damping * I`` to the Hessian in the Neumann series (``>= 0``; paper: 0). On an indefinite Hessian the
        series converges only with ``damping > |lambda_min|`` (and ``gamma * (lambda_max + damping) < 2``).
    inner_steps
        T, the number of weight steps, each on a fresh training batch, before each architecture step (paper: 4 to
        5). ``None``: 5 for ``'implicit'`` and ``'first_order'``, 1 for ``'unrolled'`` (DARTS 2nd order alternates
        one weight step and one architecture step).
    arc_learning_rate
        Learning rate of the architecture optimizer (paper: 3e-4).
    gradient_clip_val
        Clip the weight gradients to this norm before each weight step (``None``: no clipping).
    log_prob_every_n_step
        Log the per-choice probabilities every this many batches.
    warmup_epochs
        The first ``warmup_epochs`` epochs train the weights only.
    max_nonfinite_steps
        A non-finite loss or hypergradient, or one too large for Adam to square (see :mod:`nni_idarts.guards`), skips
        its architecture step, a non-finite training loss or weight gradient its weight step (counted in the logged
        ``nonfinite_arch_steps`` / ``nonfinite_weight_steps``); this many skips of one kind in a row stop the search
        with :class:`~nni_idarts.NonFiniteStepError`.
    report_final_result
        Inside an NNI trial, the search reports its per-epoch metrics as intermediate results and, if this is true,
        the last epoch's as the trial's final result. Set it to False when the trial reports its own final result
        (as :mod:`nni_idarts.trial` does after retraining), so that the trial reports exactly one.
    **kwargs
        Passed to :class:`~nni.nas.strategy.DARTS` (e.g. ``mutation_hooks``).
    """

    def __init__(self, *, hypergradient: str = 'implicit', K: int = 2, gamma: float | str | None = None,
                 damping: float = 0.0, inner_steps: int | None = None, arc_learning_rate: float = 3.0e-4,
                 gradient_clip_val: float | None = None,
                 log_prob_every_n_step: int = 10, warmup_epochs: int = 0, max_nonfinite_steps: int = 10,
                 report_final_result: bool = True, **kwargs: Any):
        if 'penalty' in kwargs:
            raise ValueError('IDartsStrategy does not support the `penalty` option of NNI DARTS.')
        if hypergradient not in HYPERGRADIENTS:
            raise ValueError(f'hypergradient must be one of {", ".join(map(repr, HYPERGRADIENTS))}; got {hypergradient!r}.')
        require_int('K', K, minimum=0)
        if inner_steps is None:
            inner_steps = 1 if hypergradient == 'unrolled' else 5
        require_int('inner_steps', inner_steps, minimum=1)
        require_int('warmup_epochs', warmup_epochs, minimum=0)
        require_int('max_nonfinite_steps', max_nonfinite_steps, minimum=1)
        require_int('log_prob_every_n_step', log_prob_every_n_step, minimum=1)
        is_number = isinstance(gamma, (int, float)) and not isinstance(gamma, bool)
        if not (gamma is None or gamma == 'auto' or (is_number and 0 < gamma < float('inf'))):
            raise ValueError("gamma must be a number > 0, None (the weight learning rate) or 'auto' "
                             f'(min(lr, 1/lambda_max)); got {brief(gamma)}.')
        if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and 0 <= damping < float('inf')):
            raise ValueError(f'damping must be a number >= 0; got {brief(damping)}.')
        if not (isinstance(arc_learning_rate, (int, float)) and arc_learning_rate > 0):
            raise ValueError(f'arc_learning_rate must be a number > 0; got {arc_learning_rate!r}.')
        super().__init__(arc_learning_rate=arc_learning_rate, gradient_clip_val=gradient_clip_val,
                         log_prob_every_n_step=log_prob_every_n_step, warmup_epochs=warmup_epochs, **kwargs)
        self.hypergradient = hypergradient
        self.K = K
        self.gamma = gamma
        self.damping = float(damping)
        self.inner_steps = inner_steps
        self.max_nonfinite_steps = max_nonfinite_steps
        self.report_final_result = report_final_result

    def mutate_model(self, model: ModelSpace) -> ModelSpace:
        # Without this check NNI fails only when Lightning configures the optimizers, with a less specific message.
        if isinstance(model, ModelSpace) and not model.simplify():
            raise ValueError(f'The model space {type(model).__name__} has no choices (no LayerChoice, InputChoice or '
                             'nni.choice): there is no architecture to search.')
        return super().mutate_model(model)

    def train_dataloader(self, train_dataloader_fn: Callable[[], Any], val_dataloader_fn: Callable[[], Any]) -> Any:
        loaders = super().train_dataloader(train_dataloader_fn, val_dataloader_fn)
        # Lightning would skip an empty training loader with a warning, and cycle an empty validation loader
        # forever: the search would "finish" with the alphas it started with.
        for name, purpose in (('train', 'weights'), ('val', 'architecture')):
            loader = loaders[name]
            if hasattr(loader, '__len__') and len(loader) == 0:
                raise ValueError(f'The {name} dataloader of the evaluator is empty; iDARTS trains the {purpose} on it.')
        # Lightning iterates the training batches (one weight step each); the architecture steps draw their
        # validation batches from a stream of their own, one per step, so none is loaded and left unused.
        self._module.validation_stream = ValidationStream(loaders['val'])
        return {'train': loaders['train']}

    def configure_oneshot_module(self, training_module: nn.Module) -> IDartsLightningModule:
        # Kept here as well: NNI builds the loaders (train_dataloader) before `oneshot_module` is available.
        self._module = IDartsLightningModule(
            training_module,
            hypergradient=self.hypergradient,
            K=self.K,
            gamma=self.gamma,
            damping=self.damping,
            inner_steps=self.inner_steps,
            arc_learning_rate=self.arc_learning_rate,
            gradient_clip_val=self.gradient_clip_val,
            log_prob_every_n_step=self.log_prob_every_n_step,
            warmup_epochs=self.warmup_epochs,
            max_nonfinite_steps=self.max_nonfinite_steps,
            report_final_result=self.report_final_result,
        )
        return self._module

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(hypergradient={self.hypergradient!r}, K={self.K}, gamma={self.gamma!r}, '
                f'damping={self.damping}, inner_steps={self.inner_steps}, arc_learning_rate={self.arc_learning_rate})')
