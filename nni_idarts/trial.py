"""An NNI trial that runs one iDARTS search on the digits: the ``trialCommand`` of ``examples/nnictl/config.yml``.

    python -m nni_idarts.trial [--output-dir DIR]

The tuner's parameters (``nni.get_next_parameter()``) set the search's hyperparameters (see :data:`PARAMETERS`;
missing ones keep their defaults). The trial

1. searches :class:`~search_spaces.DigitsCellSpace` with :class:`~nni_idarts.IDartsStrategy` through
   :func:`nni_idarts.search.search`; the strategy reports each epoch to NNI as an intermediate result by itself
   (``'default'``: the validation accuracy of the architecture steps);
2. writes the exported architecture to ``arch.json`` in the trial's output directory (``NNI_OUTPUT_DIR``);
3. retrains that architecture from scratch on the train split for ``retrain_epochs`` epochs and reports its
   accuracy on the validation split as the trial's final result (and writes everything to ``result.json``).

Outside NNI it runs with the defaults and writes to ``--output-dir`` (default ``nni-idarts-trials/STANDALONE``).
A bad parameter stops the trial with one line on stderr and exit code 2, before anything is trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, Mapping, Sequence

import nni
from search_spaces.digits import DigitsCellSpace

from .checkpoint import atomic_write_json
from .data import digits_splits
from .module import HYPERGRADIENTS
from .reporting import outside_trial
from .retrain import retrain
from .search import search
from .strategy import IDartsStrategy


class TrialParameterError(ValueError):
    """A parameter from the tuner that the trial does not know or cannot use."""


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """Everything a trial can be told; the field names are the keys of NNI's search space."""
    # IDartsStrategy
    hypergradient: str = 'implicit'
    K: int = 2
    gamma: float | None = None          # None: the weight learning rate (the paper's choice)
    inner_steps: int = 2
    arc_learning_rate: float = 3e-2
    # the search's weight training (nni_idarts.search.search)
    learning_rate: float = 0.1
    weight_decay: float = 3e-4
    batch_size: int = 32
    epochs: int = 3
    # the space (search_spaces.DigitsCellSpace)
    channels: int = 8
    num_cells: int = 1
    # retraining the exported architecture (nni_idarts.retrain.retrain)
    retrain_epochs: int = 4
    retrain_learning_rate: float = 0.1
    seed: int = 0


#: name -> (kind, smallest allowed value); kind is 'int', 'float', 'optional_float' or a tuple of allowed strings.
PARAMETERS: dict[str, tuple[Any, float | None]] = {
    'hypergradient': (HYPERGRADIENTS, None),
    'K': ('int', 0),
    'gamma': ('optional_float', 0.0),
    'inner_steps': ('int', 1),
    'arc_learning_rate': ('float', 0.0),
    'learning_rate': ('float', 0.0),
    'weight_decay': ('float', 0.0),
    'batch_size': ('int', 1),
    'epochs': ('int', 1),
    'channels': ('int', 1),
    'num_cells': ('int', 1),
    'retrain_epochs': ('int', 1),
    'retrain_learning_rate': ('float', 0.0),
    'seed': ('int', 0),
}
assert set(PARAMETERS) == {f.name for f in dataclasses.fields(TrialConfig)}


def _convert(name: str, value: Any) -> Any:
    kind, minimum = PARAMETERS[name]
    if isinstance(kind, tuple):
        if value not in kind:
            raise TrialParameterError(f'parameter {name!r} must be one of {", ".join(map(repr, kind))}; got {value!r}')
        return value
    if kind == 'optional_float' and value is None:
        return None
    # Tuners send numbers as int or float (quniform and friends give 4.0 for an integer); nothing else is a number.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TrialParameterError(f'parameter {name!r} must be a finite number; got {value!r}')
    if kind == 'int':
        if value != int(value):
            raise TrialParameterError(f'parameter {name!r} must be an integer; got {value!r}')
        value = int(value)
        if value < minimum:
            raise TrialParameterError(f'parameter {name!r} must be >= {minimum}; got {value!r}')
        return value
    value = float(value)
    if value <= minimum:
        raise TrialParameterError(f'parameter {name!r} must be > {minimum}; got {value!r}')
    return value


def trial_config(parameters: Mapping[str, Any] | None) -> TrialConfig:
    """Check the tuner's ``parameters`` and put them over the defaults. Raises :class:`TrialParameterError`."""
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, Mapping):
        raise TrialParameterError(f'the trial parameters must be a dict; got {type(parameters).__name__}')
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise TrialParameterError(f'unknown parameter(s) {", ".join(map(repr, unknown))}; '
                                  f'known: {", ".join(PARAMETERS)}')
    return TrialConfig(**{name: _convert(name, value) for name, value in parameters.items()})


def output_dir(override: str | None = None) -> str:
    """Where the trial writes: ``override``, else NNI's per-trial output directory, else a folder per trial id."""
    return override or os.environ.get('NNI_OUTPUT_DIR') or os.path.join('nni-idarts-trials', nni.get_trial_id())


def run_trial(config: TrialConfig, out_dir: str) -> dict[str, Any]:
    """Search, store the architecture, retrain it and report the final result. Returns what ``result.json`` holds."""
    splits = digits_splits(config.seed)
    quiet = {'enable_progress_bar': False, 'enable_model_summary': False}
    strategy = IDartsStrategy(hypergradient=config.hypergradient, K=config.K, gamma=config.gamma,
                              inner_steps=config.inner_steps, arc_learning_rate=config.arc_learning_rate,
                              report_final_result=False)  # this trial's final result is the retrained accuracy
    found = search(DigitsCellSpace(channels=config.channels, num_cells=config.num_cells), splits.train, splits.val,
                   strategy, epochs=config.epochs, batch_size=config.batch_size,
                   learning_rate=config.learning_rate, weight_decay=config.weight_decay, seed=config.seed,
                   trainer_kwargs=quiet)
    atomic_write_json(os.path.join(out_dir, 'arch.json'), found.arch)  # kept even if the retraining fails

    # NNI's evaluator module would report the retraining as a final result of its own; the trial reports it below.
    with outside_trial():
        retrained = retrain(DigitsCellSpace(channels=config.channels, num_cells=config.num_cells), found.arch,
                            splits.train, splits.val, epochs=config.retrain_epochs, batch_size=config.batch_size,
                            learning_rate=config.retrain_learning_rate, weight_decay=config.weight_decay,
                            seed=config.seed, trainer_kwargs=quiet)
    final = {'default': retrained.accuracy, 'val_loss': retrained.loss,
             'num_parameters': float(retrained.num_parameters)}
    result = {'parameters': dataclasses.asdict(config), 'arch': found.arch, 'probs': found.probs, 'final': final}
    atomic_write_json(os.path.join(out_dir, 'result.json'), result)
    nni.report_final_result(final)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m nni_idarts.trial', description=__doc__.splitlines()[0])
    parser.add_argument('--output-dir', default=None,
                        help='where arch.json and result.json go (default: $NNI_OUTPUT_DIR, the trial\'s directory)')
    args = parser.parse_args(argv)
    try:
        config = trial_config(nni.get_next_parameter())
    except TrialParameterError as error:
        print(f'nni_idarts.trial: {error}', file=sys.stderr)
        return 2
    run_trial(config, output_dir(args.output_dir))
    return 0


if __name__ == '__main__':
    sys.exit(main())
