"""An NNI trial that runs one iDARTS search on the digits: the ``trialCommand`` of ``examples/nnictl/config.yml``.

    python -m nni_idarts.trial [--output-dir DIR]

It is the ``nni-idarts`` command's search + retrain pipeline (:mod:`nni_idarts.pipeline`) driven by a config:
:data:`TRIAL_CONFIG` (small enough for a CPU trial) with the tuner's parameters (``nni.get_next_parameter()``) put
over it. The tuner's keys are the config's dotted names (``strategy.K``, ``search.learning_rate``,
``space.channels``, ...), checked by the same schema as the YAML config (:mod:`nni_idarts.config`). The trial

1. searches the space (by default :class:`~search_spaces.DigitsCellSpace` on scikit-learn's digits); the strategy
   reports each epoch to NNI as an intermediate result by itself (``'default'``: the validation accuracy of the
   architecture steps);
2. writes the exported architecture to ``arch.json`` in the trial's output directory (``NNI_OUTPUT_DIR``);
3. retrains that architecture from scratch on the train split as ``retrain`` says and reports its accuracy on the
   validation split as the trial's final result, once, and only if it is finite (everything goes to
   ``result.json``).

Outside NNI it runs with the defaults and writes to ``--output-dir`` (default ``nni-idarts-trials/STANDALONE``).
Exit codes as the command's: 2 for a bad parameter (one line on stderr, before anything is trained), 1 for a
diverged run (nothing reported), 130/143 for SIGINT/SIGTERM (nothing reported).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping, Sequence

import nni

from .checkpoint import StopOnSignal, atomic_write_json
from .config import Config, ConfigError, config_with_overrides
from .pipeline import InputError, ResultError, build, build_space_for, run_retrain, run_search
from .reporting import outside_trial

#: The trial's config before the tuner's values: a CPU-sized digits search. Keys left out take the defaults of the
#: functions they configure, as in a YAML config.
TRIAL_CONFIG: dict[str, Any] = {
    'space': {'name': 'digits', 'channels': 8, 'num_cells': 1},
    'data': {'name': 'digits', 'seed': 0},
    'strategy': {'hypergradient': 'implicit', 'K': 2, 'inner_steps': 2, 'arc_learning_rate': 3e-2},
    'search': {'epochs': 3, 'batch_size': 32, 'learning_rate': 0.1, 'weight_decay': 3e-4, 'seed': 0},
    'retrain': {'epochs': 4, 'batch_size': 32, 'learning_rate': 0.1, 'weight_decay': 3e-4, 'seed': 0},
}
#: Keys that the trial sets itself: it reports its own final result (the retrained accuracy), exactly once.
FIXED = {'strategy.report_final_result': False}


class TrialParameterError(ConfigError):
    """A parameter from the tuner that the trial does not know or cannot use."""


def trial_config(parameters: Mapping[str, Any] | None) -> Config:
    """:data:`TRIAL_CONFIG` with the tuner's ``parameters`` (dotted names) over it, checked by the config's schema.
    Raises :class:`TrialParameterError`."""
    parameters = {} if parameters is None else parameters
    if isinstance(parameters, Mapping):
        fixed = [name for name in parameters if name in FIXED]
        if fixed:
            raise TrialParameterError(f"config error: '{fixed[0]}' is set by the trial itself")
    try:
        return config_with_overrides(TRIAL_CONFIG, {**parameters, **FIXED} if isinstance(parameters, Mapping)
                                     else parameters)
    except ConfigError as error:
        raise TrialParameterError(str(error)) from error


def output_dir(override: str | None = None) -> str:
    """Where the trial writes: ``override``, else NNI's per-trial output directory, else a folder per trial id."""
    return override or os.environ.get('NNI_OUTPUT_DIR') or os.path.join('nni-idarts-trials', nni.get_trial_id())


def run_trial(config: Config, out_dir: str, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Search, store the architecture, retrain it and report the final result. Returns what ``result.json`` holds.

    Raises :class:`~nni_idarts.pipeline.InputError` (or ``DataError``) before any training for a config the
    pipeline cannot use, :class:`~nni_idarts.pipeline.ResultError` (nothing reported) for a non-finite result."""
    quiet = {'enable_progress_bar': False, 'enable_model_summary': False}
    prepared = build(config)  # every check first: data, space, strategy, accelerator
    splits = prepared.splits
    found = run_search(prepared, config, callbacks=callbacks, trainer_kwargs=quiet)
    atomic_write_json(os.path.join(out_dir, 'arch.json'), found.arch)  # kept even if the retraining fails

    # NNI's evaluator module would report the retraining as a final result of its own; the trial reports it below.
    with outside_trial():
        space = build_space_for(config, splits)  # retrain() draws fresh weights for the fixed model anyway
        retrained = run_retrain(config, space, found.arch, splits.train, splits.val, splits.num_classes,
                                callbacks=callbacks, trainer_kwargs=quiet)
    final = {'default': retrained.accuracy, 'val_loss': retrained.loss,
             'num_parameters': float(retrained.num_parameters)}
    result = {'parameters': config.flat(), 'arch': found.arch, 'probs': found.probs, 'final': final}
    atomic_write_json(os.path.join(out_dir, 'result.json'), result)
    nni.report_final_result(final)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from .checkpoint import Interrupted
    from .console import quiet
    from .data import DataError
    from .module import NonFiniteStepError

    parser = argparse.ArgumentParser(prog='python -m nni_idarts.trial', description=__doc__.splitlines()[0])
    parser.add_argument('--output-dir', default=None,
                        help='where arch.json and result.json go (default: $NNI_OUTPUT_DIR, the trial\'s directory)')
    args = parser.parse_args(argv)
    prefix = 'nni_idarts.trial'
    stop = StopOnSignal()
    try:
        with stop.installed():
            config = trial_config(nni.get_next_parameter())
            out = output_dir(args.output_dir)
            # NNI and Lightning's chatter goes to the trial's log file; the trial's stderr keeps what matters.
            with quiet(os.path.join(out, 'trial.log')):
                run_trial(config, out, callbacks=[stop])
    except (ConfigError, InputError, DataError) as error:
        print(f'{prefix}: {error}', file=sys.stderr)
        return 2
    except (NonFiniteStepError, ResultError) as error:
        print(f'{prefix}: trial failed: {error}', file=sys.stderr)
        return 1
    except Interrupted as stopped:
        print(f'{prefix}: stopped by {stopped.signal_name}; no final result was reported', file=sys.stderr)
        return stopped.exit_code
    except SIGTERMException:
        print(f'{prefix}: stopped by SIGTERM; no final result was reported', file=sys.stderr)
        return 143
    return 0


if __name__ == '__main__':
    sys.exit(main())
