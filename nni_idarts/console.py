"""What ``nni-idarts search`` and ``retrain`` print: a quiet console, one progress bar per epoch, a closing summary.

NNI and Lightning talk a lot during a search, and most of it says nothing to the user of this command: NNI warns
that "`training_service` will be ignored for sequential execution engine" each time it reads its config, NNI's
serializer asks for keyword arguments, Lightning prints deprecations, a "litlogger" tip, and a warning about
ModelCheckpoint under manual optimization that comes with a block of example source code. :func:`quiet` sends all
of that (every third-party log record below ERROR and every warning not raised by nni-idarts itself) to a log file
in the output directory instead of the console; ``verbose=True`` shows it on the console too.
:class:`EpochProgressBar` leaves one bar per epoch, with the epoch's mean metrics; :func:`format_summary` is the
closing report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, TextIO

from pytorch_lightning.callbacks import TQDMProgressBar

#: Loggers of the libraries a search runs through (top-level names only, so that no record is written twice); their
#: records go to the log file, and below ERROR not to the console. (NNI logs to stdout through its own handler on
#: ``nni``; Lightning to stderr through a handler on ``pytorch_lightning``.)
THIRD_PARTY_LOGGERS = ('nni', 'pytorch_lightning', 'lightning', 'lightning_fabric', 'torch', 'matplotlib')
#: Where warnings count as ours (always shown): the packages of this project.
_OWN_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), package) + os.sep
                  for package in ('nni_idarts', 'search_spaces'))


@dataclass
class QuietLog:
    """What :func:`quiet` kept off the console: ``hidden`` messages, all of them in ``path``."""
    path: Path
    hidden: int = 0


class _ConsoleFilter(logging.Filter):
    """On a console handler: let a third-party record through only from ERROR up; count the others."""

    def __init__(self, log: QuietLog):
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if not getattr(record, '_hidden_by_quiet', False):  # count a record once, however many handlers it meets
            record._hidden_by_quiet = True
            self.log.hidden += 1
        return False


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextlib.contextmanager
def quiet(log_path: str | Path, verbose: bool = False) -> Iterator[QuietLog]:
    """Within the block, third-party log records and warnings go to ``log_path`` (appended) and not to the console.

    Kept on the console: log records of level ERROR and above, warnings raised from nni-idarts' own code, and
    everything when ``verbose``. Yields a :class:`QuietLog` that counts the messages kept off the console.
    """
    log = QuietLog(Path(log_path))
    log.path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(log.path, 'a', encoding='utf-8')
    stream.write(f'--- {time.strftime("%Y-%m-%d %H:%M:%S")} nni-idarts {" ".join(sys.argv[1:])}\n')
    file_handler = logging.StreamHandler(stream)
    file_handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s', '%H:%M:%S'))
    console_filter = _ConsoleFilter(log)
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    filtered: list[logging.Handler] = []
    for logger in loggers:
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # the log file gets INFO too (Lightning's device and model summaries)
        if not verbose:
            for handler in _console_handlers(logger):
                handler.addFilter(console_filter)
                filtered.append(handler)
        logger.addHandler(file_handler)

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))
        stream.flush()
        if verbose or os.path.abspath(filename).startswith(_OWN_DIRS):
            original_show(message, category, filename, lineno, file, line)
        else:
            log.hidden += 1

    with warnings.catch_warnings():
        original_show = warnings.showwarning
        warnings.showwarning = show
        try:
            yield log
        finally:
            for handler in filtered:
                handler.removeFilter(console_filter)
            for logger, level in zip(loggers, levels):
                logger.removeHandler(file_handler)
                logger.setLevel(level)
            stream.close()


class EpochProgressBar(TQDMProgressBar):
    """Lightning's progress bar, one line left per epoch, showing the epoch's running means of ``METRICS``.

    (Lightning's bar shows the last batch's values, which jump from batch to batch; the architecture steps'
    validation metrics, in particular, come from one batch each.) The means are the search module's
    (:meth:`~nni_idarts.IDartsLightningModule.epoch_means`); :attr:`epoch_means` keeps every finished epoch's.
    """

    METRICS = ('train_loss', 'train_acc', 'val_loss', 'val_acc')

    def __init__(self) -> None:
        super().__init__(leave=True)
        self._module: Any = None
        self.epoch_means: list[dict[str, float]] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._module = pl_module

    def running_means(self) -> dict[str, float]:
        means = self._module.epoch_means() if hasattr(self._module, 'epoch_means') else {}
        return {name: means[name] for name in self.METRICS if name in means}

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        return {name: f'{value:.3f}' for name, value in self.running_means().items()}

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        bar = self._train_progress_bar
        if bar is not None and bar.n == 0:
            # The bar Lightning opened in on_train_start; with leave=True each epoch opens its own, so this one
            # would stay behind as an empty "Training: 0/?" line.
            bar.leave = False
            bar.close()
        super().on_train_epoch_start(trainer, *args)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epoch_means.append(self.running_means())
        super().on_train_epoch_end(trainer, pl_module)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f'{minutes} min {seconds} s' if minutes else f'{seconds} s'


def format_summary(arch_text: str, *, seconds: float, epochs: int, metrics: Mapping[str, float] | None = None,
                   files: Mapping[str, str | Path] | None = None, hidden: QuietLog | None = None) -> str:
    """The closing report of a search.

    ``arch_text``: the chosen op per label with its probability (:func:`nni_idarts.arch.format_arch`); ``metrics``:
    the last epoch's means; ``files``: what was written, description -> path; ``hidden``: what :func:`quiet` kept
    off the console.
    """
    lines = [f'search finished in {_duration(seconds)} ({epochs} epochs)']
    if metrics:
        shown = {'val_acc': 'val accuracy', 'val_loss': 'val loss', 'train_acc': 'train accuracy'}
        parts = [f'{text} {metrics[key]:.4f}' for key, text in shown.items() if key in metrics]
        if parts:
            lines.append(f'last epoch (means over its steps): {", ".join(parts)}')
    lines.append('chosen (probability):')
    lines.extend('  ' + line for line in arch_text.splitlines())
    if files:
        lines.append('written:')
        width = max(len(name) for name in files)
        lines.extend(f'  {name:<{width}}  {path}' for name, path in files.items())
    if hidden is not None and hidden.hidden:
        lines.append(f'{hidden.hidden} messages from NNI and Lightning are in {hidden.path} (--verbose shows them)')
    return '\n'.join(lines)
