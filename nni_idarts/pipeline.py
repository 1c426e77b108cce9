"""Search -> export -> retrain from a validated :class:`~nni_idarts.config.Config`: shared by the ``nni-idarts``
command (:mod:`nni_idarts.cli`) and the NNI trial (:mod:`nni_idarts.trial`).

:func:`prepare` does everything that can refuse a config (load the data, build the space, construct the strategy,
check the accelerator) and writes nothing, so that the callers can validate before they touch their output folder.
Results are checked before anyone sees them: a non-finite accuracy or loss is :class:`ResultError`, never a result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .errors import brief

if TYPE_CHECKING:  # imported lazily: `nni-idarts show` and bad-input paths need no torch
    from torch.utils.data import Dataset

    from .config import Config

#: Keys whose change makes a checkpoint a different search: another data order, another supernet, other batches.
RESUME_KEYS = ('space.', 'data.', 'search.batch_size', 'search.seed')


class InputError(ValueError):
    """Bad input found while preparing or running a command (a one-line message)."""


class ResultError(RuntimeError):
    """A run that finished without a usable result (non-finite metrics, alphas that never moved); one line."""


@dataclass
class Prepared:
    splits: Any          #: nni_idarts.data.Splits
    space: Any           #: a fresh model space, its weights drawn from the search seed
    strategy: Any        #: a fresh IDartsStrategy


def check_accelerator(name: str, key: str) -> None:
    """Refuse an accelerator that this machine does not have (Lightning would fail only when training starts)."""
    if name in ('auto', 'cpu'):
        return
    from pytorch_lightning.accelerators import AcceleratorRegistry

    candidates = ('cuda', 'mps') if name == 'gpu' else (name,)
    if not any(c in AcceleratorRegistry and AcceleratorRegistry.get(c).is_available() for c in candidates):
        raise InputError(f"config error: '{key}' is {name!r}, but this machine has no such accelerator "
                         "(use 'cpu' or 'auto')")


def build_space_for(config: Config, splits: Any) -> Any:
    """A fresh model space of ``config`` for the data ``splits``, its weights drawn from ``search.seed``."""
    import pytorch_lightning as pl
    from search_spaces import build_space

    seed = config.search['seed']
    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)  # the supernet's initial weights come from this seed
    knobs = config.space_knobs
    try:
        return build_space(config.space_name, in_channels=int(splits.train[0][0].shape[0]),
                           num_classes=splits.num_classes, **knobs)
    except (ValueError, TypeError, RuntimeError, MemoryError) as error:
        shown = ', '.join(f'{k}={brief(v)}' for k, v in knobs.items())
        raise InputError(f'config error: cannot build space {config.space_name!r} ({shown}): '
                         f'{brief(str(error), 160)}') from error


def build(config: Config) -> Prepared:
    """Load the data, build the space (seeded by ``search.seed``) and the strategy. Raises :class:`InputError` (or the data loader's ``DataError``); writes nothing."""
    from .data import load_splits
    from .strategy import IDartsStrategy

    for key in ('search.accelerator', 'retrain.accelerator'):
        section, _, name = key.partition('.')
        check_accelerator(getattr(config, section)[name], key)
    splits = load_splits(**config.data)
    space = build_space_for(config, splits)
    try:
        built = IDartsStrategy(**config.strategy)
    except (ValueError, TypeError) as error:
        raise InputError(f'config error: strategy: {brief(str(error), 200)}') from error
    return Prepared(splits=splits, space=space, strategy=built)


def check_resumable(saved: Mapping[str, Any], config: Config, checkpoint: str) -> None:
    """Refuse to resume ``checkpoint``, made with the config ``saved`` (as ``Config.as_dict()``), under ``config`` if
    a key of :data:`RESUME_KEYS` differs; the message names the first one."""
    try:
        before = {f'{s}.{k}': v for s, keys in saved.items() if isinstance(keys, Mapping) for k, v in keys.items()}
    except AttributeError:
        before = {}
    now = config.flat()
    for key in sorted(set(before) | set(now)):
        if key.startswith(RESUME_KEYS) and before.get(key, '<unset>') != now.get(key, '<unset>'):
            raise InputError(f"--resume: {checkpoint} was made with '{key}' = {brief(before.get(key, '<unset>'))}, "
                             f'but the config has {brief(now.get(key, "<unset>"))}; restore it, or start a new '
                             'search with --overwrite')


def _check_finite(what: str, values: Mapping[str, float]) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        shown = ', '.join(f'{k} {v}' for k, v in bad.items())
        raise ResultError(f'{what} diverged ({shown}): no result is reported')


def run_search(prepared: Prepared, config: Config, *, workdir: str | None = None,
               tensorboard_dir: str | None = None, checkpoint_dir: str | None = None,
               resume_from: str | None = None, callbacks: Sequence[Any] = (),
               trainer_kwargs: Mapping[str, Any] | None = None) -> Any:
    """Run :func:`nni_idarts.search.search` as ``config.search`` says; the result's probabilities are checked to be
    finite and its alphas to have moved."""
    from .search import search

    options = dict(config.search)
    kwargs = {'log_every_n_steps': options.pop('log_every_n_steps'), 'accelerator': options.pop('accelerator'),
              'callbacks': list(callbacks), **(trainer_kwargs or {})}
    result = search(prepared.space, prepared.splits.train, prepared.splits.val, prepared.strategy,
                    num_classes=prepared.splits.num_classes, workdir=workdir, tensorboard_dir=tensorboard_dir,
                    checkpoint_dir=checkpoint_dir, resume_from=resume_from, trainer_kwargs=kwargs, **options)
    _check_finite('the search', {f'p({label}={choice})': p for label, choices in result.probs.items()
                                 for choice, p in choices.items()})
    # A strategy that can tell (SearchResult.alphas_moved) says whether any architecture step changed the alphas;
    # exporting alphas nothing moved would pass off the initial tie-break as a search result.
    if not getattr(result, 'alphas_moved', True):
        raise ResultError('the search ended with the architecture weights it started with (no architecture step '
                          'changed them): no architecture is exported')
    return result


def run_retrain(config: Config, space: Any, arch: dict[str, Any], train: Dataset, evaluate: Dataset,
                num_classes: int, *, callbacks: Sequence[Any] = (),
                trainer_kwargs: Mapping[str, Any] | None = None) -> Any:
    """Retrain ``arch`` as ``config.retrain`` says and evaluate it on ``evaluate``; :class:`ResultError` if the
    accuracy or the loss is not finite."""
    from .retrain import retrain

    options = dict(config.retrain)
    kwargs = {'logger': False, 'accelerator': options.pop('accelerator'), 'callbacks': list(callbacks),
              **(trainer_kwargs or {})}
    result = retrain(space, arch, train, evaluate, num_classes=num_classes, trainer_kwargs=kwargs, **options)
    _check_finite('the retraining', {'loss': result.loss, 'accuracy': result.accuracy})
    return result
