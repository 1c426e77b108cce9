"""A stand-in for the NNI manager's side of a trial: hands out one parameter record and records what is reported."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import nni.trial
from nni.runtime.trial_command_channel import (
    TrialCommandChannel, get_default_trial_command_channel, set_default_trial_command_channel)
from nni.typehint import ParameterRecord


class RecordingChannel(TrialCommandChannel):
    def __init__(self, parameters: Any, parameter_id: int = 41):
        self.parameters = parameters
        self.parameter_id = parameter_id
        self.sent: list[dict[str, Any]] = []

    def receive_parameter(self) -> ParameterRecord:
        return ParameterRecord(parameter_id=self.parameter_id, parameters=self.parameters)

    def send_metric(self, type, parameter_id, trial_job_id, sequence, value):  # noqa: A002 (NNI's signature)
        self.sent.append({'type': type, 'parameter_id': parameter_id, 'sequence': sequence, 'value': value})

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.sent if m['type'] == kind]


@contextlib.contextmanager
def fake_trial(monkeypatch, parameters: Any = None, *, in_trial: bool = True) -> Iterator[RecordingChannel]:
    """Make this process look like an NNI trial (``in_trial``) or a plain process, with ``channel`` as NNI's channel."""
    channel = RecordingChannel({} if parameters is None else parameters)
    previous = get_default_trial_command_channel()
    if in_trial:
        monkeypatch.setenv('NNI_PLATFORM', 'local')
    else:
        monkeypatch.delenv('NNI_PLATFORM', raising=False)
    monkeypatch.setattr(nni.trial, '_intermediate_seq', 0)  # as in a fresh trial process
    set_default_trial_command_channel(channel)
    try:
        yield channel
    finally:
        set_default_trial_command_channel(previous)
        nni.trial._params = None
