"""Crash-safe files and resumable data order for searches that can be stopped and resumed.

- :func:`atomic_write_json` and :class:`AtomicCheckpointIO` write to a temporary file beside the target and
  ``os.replace`` it, so a kill leaves either the old file or the new one, never a torn one.
- :class:`ResumableDataLoader` shuffles with a permutation that depends only on ``(seed, epoch)`` and reports how
  many batches of the current pass it has handed out (Lightning's ``state_dict`` / ``load_state_dict`` protocol for
  data loaders), so that a search resumed from a mid-epoch checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import nni
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
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
    text = json.dumps(obj, indent=2, sort_keys=True) + '\n'
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


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
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler)
