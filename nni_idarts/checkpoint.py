"""Crash-safe files and resumable data order for searches that can be stopped and resumed.

- :func:`atomic_write_json` and :class:`AtomicCheckpointIO` write to a temporary file beside the target and
  ``os.replace`` it, so a kill leaves either the old file or the new one, never a torn one.
- :class:`RecordConfig` stores the config a search was made with in its checkpoints, and :func:`checkpoint_config`
  reads it back (one-line :class:`CheckpointError` for a corrupt, empty or foreign file), so that ``--resume`` can
  refuse a checkpoint made with other data, space, batch size or seed.
- :class:`StopOnSignal` turns SIGINT/SIGTERM during training into :class:`Interrupted` at the next batch boundary,
  after writing ``last.ckpt`` if the last one is older than that batch.
- :class:`ResumableDataLoader` shuffles with a permutation that depends only on ``(seed, epoch)`` and reports how
  many batches of the current pass it has handed out (Lightning's ``state_dict`` / ``load_state_dict`` protocol for
  data loaders), so that a search resumed from a mid-epoch checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import nni
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, Sampler


def atomic_write_bytes(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, then move it onto ``path`` in one step."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{target.name}.', suffix='.tmp', dir=target.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results and checkpoints are meant to be read
        with os.fdopen(fd, 'wb') as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON; NaN and infinities are refused (``ValueError``): they are not JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + '\n'
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def remove_stray_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that a killed :func:`atomic_write_bytes` of ``folder/<name>`` left behind
    (``.<name>.<random>.tmp``), for the given names only. Returns what was deleted."""
    removed = []
    for name in names:
        for stray in Path(folder).glob(f'.{name}.*.tmp'):
            if stray.is_file() and not stray.is_symlink():
                stray.unlink(missing_ok=True)
                removed.append(stray)
    return removed


# ----- the config a checkpoint was made with -----

#: The key of the config in a checkpoint written with :class:`RecordConfig`.
CONFIG_KEY = 'nni_idarts_config'


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message is one line."""


class RecordConfig(pl.Callback):
    """Stores ``config`` (a JSON-like dict) in every checkpoint the trainer writes, under :data:`CONFIG_KEY`."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config


def checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config stored in the Lightning checkpoint ``path`` by :class:`RecordConfig`; :class:`CheckpointError`
    if the file cannot be read (empty, truncated, not a checkpoint) or was not written by a recorded search.

    Loaded with ``weights_only=True``: a foreign file cannot run code here, and is refused before Lightning
    (which unpickles fully) ever sees it."""
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise CheckpointError(f'cannot read checkpoint {path}: {error.strerror or error}') from error
    if size == 0:
        raise CheckpointError(f'checkpoint {path} is empty')
    try:
        with warnings.catch_warnings():  # torch warns about some foreign pickles: the error below says it in a line
            warnings.simplefilter('ignore')
            saved = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # torch raises many types for a torn or foreign file; all mean "not usable"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if reason.startswith('Weights only load failed'):
            reason = 'it holds objects other than tensors and plain data; refused, as loading it could run code'
        raise CheckpointError(f'checkpoint {path} is not a readable torch checkpoint ({reason[:120]})') from error
    if not isinstance(saved, dict) or not {'state_dict', 'loops', 'optimizer_states'} <= set(saved):
        raise CheckpointError(f'{path} is not a Lightning checkpoint of a search')
    config = saved.get(CONFIG_KEY)
    if not isinstance(config, dict):
        raise CheckpointError(f'checkpoint {path} does not record the config it was made with (not written by '
                              'nni-idarts search, or by an older version)')
    return config


# ----- stopping on a signal without losing the finished batches -----

class Interrupted(BaseException):
    """The run was stopped by a signal (a BaseException, like KeyboardInterrupt, so ``except Exception`` in NNI or
    Lightning does not swallow it). ``exit_code`` is the shell's convention, 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: str | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.checkpoint = checkpoint   #: the checkpoint that holds every finished batch, if there is one

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class StopOnSignal(pl.Callback):
    """SIGINT and SIGTERM end the run with :class:`Interrupted`; during training, at the end of the current batch.

    :meth:`installed` puts the handlers in place for a whole command. Outside training a signal raises at once
    (nothing is lost: no batch has been trained, or all are done). During training it is recorded, and at the end
    of the batch, if a :class:`~pytorch_lightning.callbacks.ModelCheckpoint` is in use and its last checkpoint is
    older than this batch, ``last.ckpt`` is written first (from the same hook as ModelCheckpoint's own saves, so a
    resume from it is exact). A second signal while waiting for the batch to end raises at once.

    Lightning's own SIGTERM handling (it raises ``SIGTERMException``, a ``SystemExit`` with no exit code, i.e. exit
    status 0) keeps running beside this; this callback raises first, at the end of the batch.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._training = False

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if not (self._training and first):
            raise Interrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator['StopOnSignal']:
        previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.signum is None:
            return
        self._training = False
        saved = None
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
                saved = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
                # ModelCheckpoint runs after this callback (Lightning orders checkpoint callbacks last), so the
                # checkpoint of this very batch is not written yet.
                if getattr(callback, '_last_global_step_saved', None) != trainer.global_step:
                    trainer.save_checkpoint(saved)
        raise Interrupted(self.signum, saved)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._training = False


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint writer, made atomic (temporary file + ``os.replace``)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f'{type(self).__name__} takes no storage_options, got {storage_options!r}.')
        atomic_write_bytes(path, lambda f: torch.save(checkpoint, f))


class SeededEpochSampler(Sampler[int]):
    """A random permutation of ``range(n)`` for each epoch, drawn from ``seed`` and the epoch only.

    Lightning calls :meth:`set_epoch` before each epoch (also after a resume, with the restored epoch). ``start``
    skips the first indices of the next pass, which is how :class:`ResumableDataLoader` fast-forwards.
    """

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        start, self.start = self.start, 0
        return iter(order[start:])


class _ResumableDataLoader(DataLoader):
    """A DataLoader that can restart a pass where a checkpoint left it (see the module doc).

    The position is counted in batches handed out by the current pass; after ``load_state_dict`` the next pass
    skips that many batches, by index when the sampler is a :class:`SeededEpochSampler` (no data is loaded for
    them), else by drawing and dropping them.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._position = 0
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        return {'position': self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position = int(state['position'])
        # A checkpoint taken after the last batch of a pass holds a finished pass: Lightning resumes with the next
        # epoch, which must then start at its beginning (skipping a whole pass would silently drop that epoch).
        self._skip = 0 if position >= len(self) else position

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        sampler = self.sampler
        fast = isinstance(sampler, SeededEpochSampler) and self.batch_size is not None and not self.drop_last
        if fast:
            sampler.start = skip * self.batch_size  # type: ignore[union-attr,operator]
        self._position = skip
        return self._iterate(skip, fast)

    def _iterate(self, skip: int, fast: bool) -> Iterator[Any]:
        batches = super().__iter__()
        if not fast:
            for _ in range(skip):
                next(batches)
        for batch in batches:
            self._position += 1
            yield batch


#: Traced by NNI so that the evaluator stays serialisable, like ``nni.nas.evaluator.pytorch.DataLoader``.
ResumableDataLoader = nni.trace(_ResumableDataLoader)


def resumable_loader(dataset: Dataset, *, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    sampler = SeededEpochSampler(len(dataset), seed) if shuffle else None  # type: ignore[arg-type]
    # By keyword: NNI's tracing warns about positional arguments (it records them by name).
    return ResumableDataLoader(dataset=dataset, batch_size=batch_size, sampler=sampler)
