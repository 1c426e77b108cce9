"""Reporting a one-shot search to the NNI trial that runs it (``nnictl create``), past NasExperiment's own engine.

Why this is needed: ``NasExperiment`` runs a one-shot search in its in-process ``SequentialExecutionEngine``, which
swaps NNI's trial command channel and the current parameter record for its own while the search trains. Inside
that window ``nni.report_intermediate_result`` goes to the engine, never to the NNI manager of the surrounding trial,
so nothing shows in the web UI. The engine also leaves its own record (``parameter_id`` 0) behind as
``nni.trial``'s current parameters afterwards, so a later ``nni.report_final_result`` of the trial would be credited
to the wrong parameter set.

:class:`TrialReporter` captures the trial's channel and parameter record *before* the engine runs (the one-shot
module is built then) and reports through them; :class:`NniTrialCallback`, the Lightning callback the iDARTS module
adds inside a trial, reports each epoch's means with it; :func:`trial_parameters_preserved` undoes the engine's leftover;
:func:`outside_trial` hides the trial from NNI's own evaluator modules, which report by themselves whenever
``nni.get_current_parameter()`` is set.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Any, Iterator, Mapping

import nni
import pytorch_lightning as pl
import nni.trial
from nni.runtime.trial_command_channel import (
    TrialCommandChannel, get_default_trial_command_channel, set_default_trial_command_channel)


def in_nni_trial() -> bool:
    """True in a process started by an NNI manager as a trial (the manager sets ``NNI_PLATFORM``)."""
    return os.environ.get('NNI_PLATFORM') not in (None, '', 'unittest')


class TrialReporter:
    """Reports metrics to the NNI trial that was current when it was created (see the module docstring)."""

    def __init__(self, channel: TrialCommandChannel, record: Any):
        self.channel = channel
        self.record = record

    @classmethod
    def capture(cls) -> 'TrialReporter | None':
        """The reporter of the current NNI trial, or ``None`` outside one or before ``nni.get_next_parameter()``."""
        record = nni.trial._params
        if not in_nni_trial() or record is None:
            return None
        if not isinstance(record.get('parameters'), Mapping):
            # Not the tuner's record but one a previous NasExperiment left behind (see the module docstring):
            # reporting with it would credit the metrics to another parameter set.
            warnings.warn('Not reporting this search to NNI: the current NNI parameters were replaced by an earlier '
                          'NasExperiment. Run searches through nni_idarts.search.search, which keeps them.')
            return None
        return cls(get_default_trial_command_channel(), record)

    @contextlib.contextmanager
    def _as_current(self) -> Iterator[None]:
        # nni.report_* read the module-level channel and record; point them at the trial's for one call. The
        # intermediate sequence number stays global, so it keeps counting across everything the trial reports.
        channel, record = get_default_trial_command_channel(), nni.trial._params
        set_default_trial_command_channel(self.channel)
        nni.trial._params = self.record
        try:
            yield
        finally:
            set_default_trial_command_channel(channel)
            nni.trial._params = record

    def report_intermediate(self, metric: Mapping[str, float]) -> None:
        with self._as_current():
            nni.report_intermediate_result(dict(metric))

    def report_final(self, metric: Mapping[str, float]) -> None:
        with self._as_current():
            nni.report_final_result(dict(metric))


class NniTrialCallback(pl.Callback):
    """Reports a search to the NNI trial of ``reporter``: after every epoch the module's epoch means
    (``pl_module.epoch_means()``) as an intermediate result, and at the end of fit, if ``report_final``, the last of
    them as the final result. Only global rank 0 reports. An epoch without the default metric (warm-up: no
    architecture step, so no validation metric) reports nothing."""

    def __init__(self, reporter: TrialReporter, *, report_final: bool = True):
        self.reporter = reporter
        self.report_final = report_final
        self.last_metric: dict[str, float] | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        metric = nni_metric(pl_module.epoch_means(), default_metric_key(pl_module.training_module))
        if metric is not None:
            self.reporter.report_intermediate(metric)
            self.last_metric = metric

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # The evaluator's module reports its own final result too, but to NasExperiment's engine, not the trial.
        if self.report_final and trainer.is_global_zero and self.last_metric is not None:
            self.reporter.report_final(self.last_metric)


def default_metric_key(training_module: Any) -> str:
    """The key of NNI's ``'default'`` metric: like NNI's SupervisedLearningModule, the single metric on validation."""
    metrics = getattr(training_module, 'metrics', None) or {}
    return f'val_{next(iter(metrics))}' if len(metrics) == 1 else 'val_loss'


def nni_metric(values: Mapping[str, float], default_key: str) -> dict[str, float] | None:
    """NNI's metric format: a dict whose ``'default'`` is ``values[default_key]`` (what tuners and charts use).

    Non-finite values are left out (they would not survive NNI's JSON); ``None`` when the default is missing.
    """
    finite = {key: float(value) for key, value in values.items() if math.isfinite(value)}
    if default_key not in finite:
        return None
    return {'default': finite[default_key], **finite}


@contextlib.contextmanager
def trial_parameters_preserved() -> Iterator[None]:
    """Restore ``nni.trial``'s current parameter record after the block (NasExperiment's engine overwrites it)."""
    record = nni.trial._params
    try:
        yield
    finally:
        nni.trial._params = record


@contextlib.contextmanager
def outside_trial() -> Iterator[None]:
    """Run the block as if no NNI trial were current, so NNI's evaluator modules report nothing from it."""
    with trial_parameters_preserved():
        nni.trial._params = None
        yield
