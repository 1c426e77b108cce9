"""Guards against a search that silently stops searching, and against trainer settings the architecture step refuses.

**Freeze.** The architecture optimizer is Adam (NNI's DARTS). Adam squares the gradient into its second moment
``v``; a finite hypergradient whose square overflows the alphas' dtype (|g| > ~1.8e19 in float32, e.g. a diverging
Neumann series) makes ``v`` inf, and from then on every update ``m / sqrt(v)`` is 0: the alphas freeze for good
while the search runs on and exports its random initial alphas. Such a step is therefore **skipped and counted**
like a non-finite one (:func:`adam_squares` is checked with the non-finite gate). Rescaling was rejected: a
hypergradient rescaled to just below overflow still leaves ``v`` ~1e37, which decays by Adam's beta2 = 0.999 only
over ~1e5 steps, so the alphas would freeze all the same, and any smaller bound is an arbitrary clipping that
changes the algorithm. A skipped step leaves the alphas and Adam's state as they were, and the overflowing value is
never a valid hypergradient anyway. As a second line, :func:`snapshot_optimizer` / :func:`restore_optimizer` undo a
step after which the optimizer's state is not finite. Finally :class:`AlphasMovedCheck` logs ``alphas_moved``
(0/1) after every epoch and warns at the end of a search whose alphas never moved, whatever the cause.

**Trainer settings** (:func:`check_trainer`, at fit start, before any step): mixed or half precision and
``SyncBatchNorm`` are refused; see there.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
import torch.nn as nn
from pytorch_lightning.utilities import rank_zero_warn

#: Lightning precisions under which the architecture step computes what it claims (the model runs in full precision).
FULL_PRECISIONS = ('32-true', '64-true', '32', '64')


def check_trainer(trainer: pl.Trainer, model: nn.Module) -> None:
    """Refuse, with one message, trainer settings under which the architecture step would be wrong.

    - Mixed and half precision (``'16-mixed'``, ``'bf16-mixed'``, ``'16-true'``, ``'bf16-true'``, ...): Lightning's
      autocast and loss scaling are built for one ``backward`` per step; the architecture step takes its
      (hyper)gradients with ``torch.autograd.grad``, outside the scaler, so in float16 they under- or overflow
      unseen, and Hessian-vector products in 8 mantissa bits (bfloat16) are noise.
    - ``SyncBatchNorm`` (``Trainer(sync_batchnorm=True)`` converts every BatchNorm to it under DDP): its synchronised
      backward is a custom autograd Function with collectives inside and no double backward, and the architecture
      step differentiates the per-rank losses outside DDP. Without it BatchNorm normalises per rank, as documented.
    """
    precision = str(trainer.precision)
    if precision not in FULL_PRECISIONS:
        raise ValueError(f'IDartsStrategy does not support Lightning precision={precision!r}: the architecture step '
                         'takes its gradients with torch.autograd.grad, outside autocast\'s loss scaling, and needs '
                         "full precision. Use precision='32-true' (the default) or '64-true'.")
    sync = next((name for name, module in model.named_modules() if isinstance(module, nn.SyncBatchNorm)), None)
    if sync is not None:
        raise ValueError(f'IDartsStrategy does not support SyncBatchNorm (found at {sync!r}; '
                         'Trainer(sync_batchnorm=True) creates it): the architecture step differentiates each rank\'s '
                         'loss outside DDP, through a synchronised backward that has no double backward. Use '
                         'sync_batchnorm=False (BatchNorm then normalises per rank).')


def adam_squares(grads: Sequence[torch.Tensor], alphas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The squares Adam will form from ``grads``, in the alphas' dtype: finite exactly when no square overflows.

    Checked with the non-finite gate before the step (see the module docstring for why such a step is skipped).
    """
    squares = []
    for grad, alpha in zip(grads, alphas):
        g = grad.detach().to(alpha.dtype)
        squares.append(g * g)
    return squares


def overflow_magnitude(grads: Sequence[torch.Tensor], alphas: Sequence[torch.Tensor]) -> float | None:
    """The largest entry of ``grads`` if they are finite but one overflows when squared in the alphas' dtype, else
    None (for the message of a skipped step: a finite hypergradient too large for Adam, not a NaN)."""
    if not all(torch.isfinite(g.detach()).all() for g in grads):
        return None
    if all(torch.isfinite(s).all() for s in adam_squares(grads, alphas)):
        return None
    return max(float(g.detach().abs().max()) for g in grads if g.numel())


def snapshot_optimizer(optimizer: torch.optim.Optimizer) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """The parameters and per-parameter state of ``optimizer`` (the architecture optimizer: alphas-sized, cheap)."""
    params = [(p, p.detach().clone()) for group in optimizer.param_groups for p in group['params']]
    state = {p: copy.deepcopy(s) for p, s in optimizer.state.items()}
    return params, state


def restore_optimizer(optimizer: torch.optim.Optimizer,
                      snapshot: tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]) -> None:
    params, state = snapshot
    with torch.no_grad():
        for param, saved in params:
            param.copy_(saved)
    optimizer.state.clear()
    optimizer.state.update(state)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters and every floating-point state tensor of ``optimizer``, to check them for finiteness."""
    tensors = [p.detach() for group in optimizer.param_groups for p in group['params']]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return tensors


def _arch_parameters(pl_module: pl.LightningModule) -> list[torch.Tensor]:
    return list(getattr(pl_module, 'arch_parameters', lambda: [])())


class AlphasMovedCheck(pl.Callback):
    """Logs ``alphas_moved`` (1/0: whether any alpha differs from its value at the start of the search) after every
    epoch, and warns at the end of a search whose alphas never moved. Works with any NNI DARTS-family module.

    The start values are part of the checkpoint (this callback's state), so a resumed search compares with the
    alphas the search started from, not those it resumed with. ``moved`` holds the verdict after fit.
    """

    def __init__(self) -> None:
        self.initial: list[torch.Tensor] | None = None
        self.moved: bool | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.initial is None:
            self.initial = [a.detach().cpu().clone() for a in _arch_parameters(pl_module)]

    def _moved(self, pl_module: pl.LightningModule) -> bool:
        current = _arch_parameters(pl_module)
        if self.initial is None or len(current) != len(self.initial):
            return False
        return any(not torch.equal(a.detach().cpu(), b) for a, b in zip(current, self.initial))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log('alphas_moved', float(self._moved(pl_module)))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.moved = self._moved(pl_module)
        if not self.moved:
            rank_zero_warn('The architecture parameters (alphas) never moved during this search: the exported '
                           'architecture is the random initial one, not a search result. Check the logged '
                           'nonfinite_arch_steps (skipped steps), warmup_epochs and arc_learning_rate.')

    def state_dict(self) -> dict[str, Any]:
        return {'initial': self.initial}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial = state_dict.get('initial')


def alphas_moved(trainer: pl.Trainer) -> bool | None:
    """The verdict of the trainer's :class:`AlphasMovedCheck` after fit (None if it has none or fit did not end)."""
    checks = [cb for cb in trainer.callbacks if isinstance(cb, AlphasMovedCheck)]  # type: ignore[attr-defined]
    return checks[0].moved if checks else None
