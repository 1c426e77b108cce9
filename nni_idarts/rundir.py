"""The output folder of ``nni-idarts search`` and ``retrain``: what the tool owns there, and who writes it now.

- **Ownership.** Before the tool creates a file or folder in ``output_dir`` it records the name in
  ``.nni-idarts-outputs.json`` there. Only recorded names are ever deleted (``search --overwrite``), so a user's own
  files, e.g. a ``checkpoints/`` folder under ``output_dir: .``, are never touched; an unrecorded file in the way
  of an output is refused instead of overwritten.
- **Lock.** A command holds ``fcntl.flock`` on ``.nni-idarts.lock`` while it writes; a second search or retraining
  into the same folder is refused with one line. The kernel releases the lock when the holder dies (also on
  ``kill -9``), so a killed run never leaves it stuck.
- **Checks first.** :meth:`OutputDir.check_usable` and :meth:`OutputDir.check_fresh` only read, so that a command
  can validate everything before it writes anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from .checkpoint import atomic_write_json, remove_stray_temporaries

#: Everything a search writes into output_dir (folders with a trailing slash).
SEARCH_OUTPUTS = ('config.yaml', 'arch.json', 'probs.png', 'search.log', 'checkpoints/', 'tensorboard/', 'nni/')
#: What a retraining writes.
RETRAIN_OUTPUTS = ('retrain.json', 'retrain.log')
MANIFEST = '.nni-idarts-outputs.json'
LOCK = '.nni-idarts.lock'


class OutputDirError(ValueError):
    """``output_dir`` cannot be used as asked; the message is one line."""


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


class OutputDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __str__(self) -> str:
        return str(self.path)

    # ----- read-only checks -----

    def check_usable(self) -> None:
        """Refuse a path that is not a folder, or whose nearest existing ancestor this process cannot write."""
        if _exists(self.path) and not self.path.is_dir():
            raise OutputDirError(f'output_dir {self.path} exists and is not a folder')
        existing = self.path
        while not _exists(existing):
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise OutputDirError(f'output_dir {self.path} is not writable ({existing} does not let this user write)')
        holder = self._holder()
        if holder is not None:
            raise OutputDirError(f'output_dir {self.path} is in use by another nni-idarts run{holder}; wait for it '
                                 'to finish or choose another output_dir')

    def _holder(self) -> str | None:
        """``None`` if nobody holds the lock, else a description of the holder ('' if unknown)."""
        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid = os.read(fd, 32).decode(errors='replace').strip()
            return f' (pid {pid})' if pid.isdigit() else ''
        finally:
            os.close(fd)
        return None

    def owned(self) -> set[str]:
        """The names this tool has recorded as its own here."""
        try:
            names = json.loads((self.path / MANIFEST).read_text())['outputs']
        except (OSError, ValueError, KeyError, TypeError):
            return set()
        return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()

    def present(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if _exists(self.path / n.rstrip('/'))]

    def foreign(self, names: Iterable[str]) -> list[str]:
        """Names that exist here, are not recorded as this tool's, and are not empty folders (which are harmless)."""
        owned = self.owned()
        return [n for n in self.present(names) if n not in owned
                and not ((self.path / n).is_dir() and not any((self.path / n).iterdir()))]

    def check_ours(self, names: Iterable[str]) -> None:
        """Refuse if an output would land on a file or folder this tool did not write."""
        foreign = self.foreign(names)
        if foreign:
            raise OutputDirError(f"output_dir {self.path} already holds {', '.join(foreign)}, which nni-idarts did "
                                 'not write (or an older version wrote); move it away or choose another output_dir')

    def check_fresh(self, overwrite: bool) -> list[str]:
        """For a new search: refuse a previous search's outputs unless ``overwrite``. Returns what would be removed."""
        self.check_ours(SEARCH_OUTPUTS + RETRAIN_OUTPUTS)
        previous = self.present(SEARCH_OUTPUTS + RETRAIN_OUTPUTS)
        if previous and not overwrite:
            raise OutputDirError(f"output_dir {self.path} holds a previous search ({', '.join(previous)}): continue "
                                 'it with --resume, or pass --overwrite to replace it')
        return previous

    # ----- writing (inside `locked`) -----

    @contextlib.contextmanager
    def locked(self) -> Iterator['OutputDir']:
        """Create the folder and hold its lock for the block; :class:`OutputDirError` if another run holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputDirError(f'output_dir {self.path} is in use by another nni-idarts run; wait for it to '
                                     'finish or choose another output_dir') from error
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f'{os.getpid()}\n'.encode())
            # Temporary files of atomic writes that a kill interrupted (only those of the names written here).
            remove_stray_temporaries(self.path, [n for n in SEARCH_OUTPUTS + RETRAIN_OUTPUTS + (MANIFEST,)
                                                 if not n.endswith('/')])
            remove_stray_temporaries(self.path / 'checkpoints', ['last.ckpt'])
            self._lock_fd = fd
            yield self
        finally:
            self._lock_fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def claim(self, names: Iterable[str]) -> None:
        """Record ``names`` as this tool's (before writing them)."""
        assert self._lock_fd is not None, 'claim() needs the lock'
        owned = self.owned() | set(names)
        atomic_write_json(self.path / MANIFEST, {'outputs': sorted(owned)})

    def remove(self, names: Iterable[str]) -> None:
        """Delete the given outputs, but only those recorded as this tool's."""
        assert self._lock_fd is not None, 'remove() needs the lock'
        owned = self.owned()
        for name in names:
            target = self.path / name.rstrip('/')
            if name not in owned or not _exists(target):
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
