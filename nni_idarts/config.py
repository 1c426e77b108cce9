"""Every user parameter of the ``nni-idarts`` command and of the NNI trial: one schema, defaults and validation.

A config has the sections ``space``, ``data``, ``strategy``, ``search`` and ``retrain``, and ``output_dir``.
A parameter is named by its dotted name (``strategy.K``, ``search.batch_size``, ``space.channels``): that is its
place in the YAML file and the key a tuner uses for it (:mod:`nni_idarts.trial`). Its **type and default** are read
from the signature of the function it configures, so a default lives only where it is used and a new argument
(e.g. a new :class:`~nni_idarts.IDartsStrategy` option) appears here by itself; its **range** (min/max, allowed
choices) is declared once, in :data:`RANGES`. A number that :data:`RANGES` does not list must still be finite.

========== ===================================================================================================
section    keys (and where their defaults are)
========== ===================================================================================================
space      ``name`` (one of :data:`search_spaces.SPACES`) and that space's size knobs (its class signature)
data       the arguments of :func:`nni_idarts.data.load_splits` (``name``: one of ``DATASETS``)
strategy   the arguments of :class:`nni_idarts.IDartsStrategy`
search     the arguments of :func:`nni_idarts.search.search` listed in ``SEARCH_KEYS``, ``log_every_n_steps``
           and ``accelerator`` (Lightning's)
retrain    the arguments of :func:`nni_idarts.retrain.train_and_evaluate` listed in ``RETRAIN_KEYS``, ``accelerator``
========== ===================================================================================================

:func:`load_config` (a YAML file) and :func:`config_from_dict` (a parsed document, e.g. the trial's defaults with
the tuner's values over them, :func:`config_with_overrides`) reject an unknown key, a value of the wrong type or out
of range with a :class:`ConfigError` whose message is one short line naming the key.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Union

from search_spaces import SPACES, space_knobs

from .data import DATASETS, load_splits
from .errors import brief, read_user_text
from .module import HYPERGRADIENTS
from .retrain import train_and_evaluate
from .search import MAX_SEED, search
from .strategy import IDartsStrategy

#: The defaults that belong to the command itself rather than to a function it calls.
DEFAULT_SPACE = 'digits'
DEFAULT_DATA = 'digits'
DEFAULT_OUTPUT_DIR = 'runs/search'
#: Lightning's accelerator for search and retraining ('auto' takes a GPU when there is one).
DEFAULT_ACCELERATOR = 'cpu'
ACCELERATORS = ('auto', 'cpu', 'cuda', 'gpu', 'mps', 'tpu')
#: How often Lightning writes the logged metrics to TensorBoard (its own default, 50, hides short runs).
DEFAULT_LOG_EVERY_N_STEPS = 10

SEARCH_KEYS = ('epochs', 'batch_size', 'learning_rate', 'learning_rate_min', 'nesterov', 'weight_decay', 'seed',
               'checkpoint_every_n_steps')
RETRAIN_KEYS = ('epochs', 'batch_size', 'learning_rate', 'weight_decay', 'seed')
SECTIONS = ('space', 'data', 'strategy', 'search', 'retrain')


#: A config is a few hundred bytes; anything near this is not one (and is not read whole into memory first).
MAX_CONFIG_BYTES = 2**20


class ConfigError(ValueError):
    """A config that cannot be used; ``str(error)`` is one line naming the key."""


@dataclass(frozen=True)
class Range:
    """What a value may be besides its type. Numbers are always required to be finite."""
    min: float | None = None
    max: float | None = None
    min_open: bool = False          #: ``> min`` rather than ``>= min``
    max_open: bool = False          #: ``< max`` rather than ``<= max``
    choices: tuple[Any, ...] | None = None


POSITIVE = Range(min=0, min_open=True)
NON_NEGATIVE = Range(min=0)
SEED = Range(min=0, max=MAX_SEED)
#: Upper bounds on what allocates memory or time per step are generous but finite: a typo of a few extra digits is
#: refused in a line instead of failing deep inside an allocation (or running for years).
RANGES: dict[str, Range] = {
    'space.name': Range(choices=tuple(SPACES)),
    'space.channels': Range(min=1, max=1024),
    'space.width': Range(min=1, max=1024),
    'space.num_cells': Range(min=1, max=64),
    'space.cells_per_stage': Range(min=1, max=64),
    'space.num_stacks': Range(min=1, max=16),
    'space.cells_per_stack': Range(min=1, max=64),
    'data.name': Range(choices=tuple(DATASETS)),
    'data.seed': SEED,
    'data.val_fraction': Range(min=0, max=1, min_open=True, max_open=True),
    'data.subset': Range(min=1),
    'data.image_size': Range(min=1, max=4096),
    'strategy.hypergradient': Range(choices=tuple(HYPERGRADIENTS)),
    'strategy.K': Range(min=0, max=10_000),
    'strategy.gamma': POSITIVE,
    'strategy.damping': NON_NEGATIVE,
    'strategy.inner_steps': Range(min=1, max=1_000_000),
    'strategy.arc_learning_rate': POSITIVE,
    'strategy.gradient_clip_val': POSITIVE,
    'strategy.log_prob_every_n_step': Range(min=1),
    'strategy.warmup_epochs': Range(min=0, max=100_000),
    'strategy.max_nonfinite_steps': Range(min=1),
    'search.epochs': Range(min=1, max=100_000),
    'search.batch_size': Range(min=1, max=65_536),
    'search.learning_rate': POSITIVE,
    'search.learning_rate_min': NON_NEGATIVE,
    'search.weight_decay': NON_NEGATIVE,
    'search.seed': SEED,
    'search.checkpoint_every_n_steps': Range(min=1),
    'search.log_every_n_steps': Range(min=1),
    'search.accelerator': Range(choices=ACCELERATORS),
    'retrain.epochs': Range(min=1, max=100_000),
    'retrain.batch_size': Range(min=1, max=65_536),
    'retrain.learning_rate': POSITIVE,
    'retrain.weight_decay': NON_NEGATIVE,
    'retrain.seed': SEED,
    'retrain.accelerator': Range(choices=ACCELERATORS),
}
#: Keys of the functions' signatures that a config may not set (the command sets them itself).
FIXED_KEYS = ('kwargs',)


@dataclass(frozen=True)
class Key:
    type: Any      #: a type or a typing union, e.g. ``int`` or ``float | None``
    default: Any
    range: Range = Range()


@dataclass
class Config:
    space: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    strategy: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    retrain: dict[str, Any] = field(default_factory=dict)
    output_dir: str = DEFAULT_OUTPUT_DIR

    @property
    def space_name(self) -> str:
        return self.space['name']

    @property
    def space_knobs(self) -> dict[str, Any]:
        return {k: v for k, v in self.space.items() if k != 'name'}

    def as_dict(self) -> dict[str, Any]:
        return {**{s: dict(getattr(self, s)) for s in SECTIONS}, 'output_dir': self.output_dir}

    def flat(self) -> dict[str, Any]:
        """``{dotted name: value}`` of every parameter (the keys a tuner uses)."""
        return {f'{s}.{k}': v for s in SECTIONS for k, v in getattr(self, s).items()}


def _keys_of(function: Callable[..., Any], section: str, names: typing.Iterable[str] | None = None) -> dict[str, Key]:
    """``{name: Key}`` for the named parameters of ``function`` (all with a default if None)."""
    function = getattr(function, '_init_wrapped', function)  # NNI's ModelSpace wraps __init__
    hints = typing.get_type_hints(function)
    params = inspect.signature(function).parameters
    wanted = names if names is not None else [
        n for n, p in params.items() if p.default is not inspect.Parameter.empty and n != 'self']
    return {n: _key(section, n, hints.get(n, type(params[n].default)), params[n].default) for n in wanted}


def _key(section: str, name: str, hint: Any, default: Any) -> Key:
    return Key(hint, default, RANGES.get(f'{section}.{name}', Range()))


def section_keys(section: str, space: str = DEFAULT_SPACE) -> dict[str, Key]:
    """The keys of ``section`` with their types, defaults and ranges (``space``: the space whose knobs are allowed)."""
    if section == 'space':
        return {'name': _key('space', 'name', str, DEFAULT_SPACE),
                **{n: _key('space', n, type(d), d) for n, d in space_knobs(space).items()}}
    if section == 'data':
        return {'name': _key('data', 'name', str, DEFAULT_DATA), **_keys_of(load_splits, 'data')}
    if section == 'strategy':
        return {n: k for n, k in _keys_of(IDartsStrategy.__init__, 'strategy').items() if n not in FIXED_KEYS}
    if section == 'search':
        return {**_keys_of(search, 'search', SEARCH_KEYS),
                'log_every_n_steps': _key('search', 'log_every_n_steps', int, DEFAULT_LOG_EVERY_N_STEPS),
                'accelerator': _key('search', 'accelerator', str, DEFAULT_ACCELERATOR)}
    if section == 'retrain':
        return {**_keys_of(train_and_evaluate, 'retrain', RETRAIN_KEYS),
                'accelerator': _key('retrain', 'accelerator', str, DEFAULT_ACCELERATOR)}
    raise KeyError(section)


def schema(space: str = DEFAULT_SPACE) -> dict[str, Key]:
    """``{dotted name: Key}`` of every parameter of a config whose space is ``space``."""
    return {f'{s}.{n}': key for s in SECTIONS for n, key in section_keys(s, space).items()}


def _type_name(hint: Any) -> str:
    if _is_union(hint):
        return ' or '.join('null' if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    return getattr(hint, '__name__', str(hint))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """``value`` if it has type ``hint``, converted where that is lossless: an int where a float is expected, an
    integral float (as tuners send them, e.g. ``4.0`` from ``quniform``) where an int is expected."""
    if _is_union(hint):
        for option in typing.get_args(hint):
            try:
                return _check_type(key, value, option)
            except ConfigError:
                pass
    elif hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if _is_number(value):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    shown = 'null' if value is None else f'{type(value).__name__} {brief(value)}'
    raise ConfigError(f"config error: '{key}' must be {_type_name(hint)}, got {shown}{_hint(value, hint)}")


def _accepts(hint: Any, kind: type) -> bool:
    return hint is kind or (_is_union(hint) and kind in typing.get_args(hint))


def _hint(value: Any, hint: Any) -> str:
    """A hint for a number that YAML read as a string: YAML 1.1 (PyYAML) reads ``5e-2`` as text, ``5.0e-2`` as a
    number."""
    if not isinstance(value, str) or not (_accepts(hint, float) or _accepts(hint, int)):
        return ''
    try:
        number = float(value)
    except ValueError:
        return ''
    mantissa, _, exponent = value.strip().lower().partition('e')
    if exponent and '.' not in mantissa:
        return f' (YAML reads {value} as text: write {mantissa}.0e{exponent})'
    shown = int(number) if _accepts(hint, int) and number.is_integer() else number
    return f' (a number in quotes is text: write {shown!r} without quotes)'


def _show_bound(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


def check_value(name: str, value: Any, key: Key) -> Any:
    """``value`` checked against ``key`` (type, finiteness, range, choices) and converted; else :class:`ConfigError`."""
    value = _check_type(name, value, key.type)
    limits = key.range
    if _is_number(value):
        if not math.isfinite(value):
            raise ConfigError(f"config error: '{name}' must be a finite number, got {brief(value)}")
        too_low = limits.min is not None and (value <= limits.min if limits.min_open else value < limits.min)
        too_high = limits.max is not None and (value >= limits.max if limits.max_open else value > limits.max)
        if too_low or too_high:
            low = '' if limits.min is None else f"{'>' if limits.min_open else '>='} {_show_bound(limits.min)}"
            high = '' if limits.max is None else f"{'<' if limits.max_open else '<='} {_show_bound(limits.max)}"
            raise ConfigError(f"config error: '{name}' must be {' and '.join(filter(None, (low, high)))}, "
                              f'got {brief(value)}')
    if limits.choices is not None and value is not None and value not in limits.choices:
        raise ConfigError(f"config error: '{name}' must be one of {', '.join(map(str, limits.choices))}, "
                          f'got {brief(value)}')
    return value


def _key_name(key: Any) -> str:
    """A key as the message shows it: itself if it is a short string, else a bounded repr."""
    return key if isinstance(key, str) and len(key) <= 40 and key.isprintable() else brief(key, 40)


def _read_section(raw: Any, section: str, keys: dict[str, Key]) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: '{section}' must be a mapping of keys to values, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in keys]
    if unknown:
        raise ConfigError(f"config error: unknown key '{section}.{_key_name(unknown[0])}' "
                          f"(known keys: {', '.join(keys)})")
    return {k: check_value(f'{section}.{k}', raw[k], key) if k in raw else key.default for k, key in keys.items()}


def _check_together(config: Config) -> None:
    """Checks that involve two keys."""
    warmup, epochs = config.strategy.get('warmup_epochs', 0), config.search['epochs']
    if warmup >= epochs:
        raise ConfigError(f"config error: 'strategy.warmup_epochs' ({warmup}) must be less than 'search.epochs' "
                          f'({epochs}): the warm-up trains only the weights, so no architecture step would run')
    lr, lr_min = config.search['learning_rate'], config.search.get('learning_rate_min')
    if lr_min is not None and lr_min > lr:
        raise ConfigError(f"config error: 'search.learning_rate_min' ({lr_min}) must not exceed 'search.learning_rate' "
                          f'({lr}): the cosine schedule anneals the weight learning rate down to it')


def config_from_dict(raw: Any) -> Config:
    """Validate a parsed YAML document and fill in the defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f'config error: the config must be a mapping of sections, got {type(raw).__name__}')
    unknown = [k for k in raw if k not in (*SECTIONS, 'output_dir')]
    if unknown:
        raise ConfigError(f"config error: unknown key '{_key_name(unknown[0])}' "
                          f"(known keys: {', '.join(SECTIONS)}, output_dir)")

    space_raw = raw.get('space') or {}
    name = space_raw.get('name', DEFAULT_SPACE) if isinstance(space_raw, dict) else DEFAULT_SPACE
    check_value('space.name', name, section_keys('space')['name'])
    sections = {s: _read_section(raw.get(s), s, section_keys(s, name)) for s in SECTIONS}
    output_dir = check_value('output_dir', raw.get('output_dir', DEFAULT_OUTPUT_DIR), Key(str, DEFAULT_OUTPUT_DIR))
    if not output_dir.strip():
        raise ConfigError("config error: 'output_dir' is empty (use '.' for the current folder)")
    if '\0' in output_dir:
        raise ConfigError(f"config error: 'output_dir' must be a path, got {brief(output_dir)}")
    config = Config(**sections, output_dir=output_dir)
    _check_together(config)
    return config


def config_with_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> Config:
    """The config ``base`` (a document as in YAML) with ``overrides`` (``{dotted name: value}``) put over it."""
    if not isinstance(overrides, Mapping):
        raise ConfigError(f'config error: the parameters must be a mapping of dotted names to values, '
                          f'got {type(overrides).__name__}')
    raw: dict[str, Any] = {s: dict(v) if isinstance(v, Mapping) else v for s, v in base.items()}
    for name, value in overrides.items():
        section, dot, key = name.partition('.') if isinstance(name, str) else ('', '', '')
        if not dot or section not in SECTIONS or not key:
            known = ', '.join(schema(raw.get('space', {}).get('name', DEFAULT_SPACE)))
            raise ConfigError(f'config error: unknown parameter {brief(name, 40)}: parameters are dotted names '
                              f'(known: {known})')
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw)


def load_config(path: str | Path) -> Config:
    """Read, parse and validate the YAML file ``path``."""
    import yaml

    text = read_user_text(path, ConfigError, 'config error', max_bytes=MAX_CONFIG_BYTES, what='a YAML config')
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, 'problem_mark', None)
        where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else ''
        problem = getattr(error, 'problem', None) or str(error).splitlines()[0]
        problem = ' '.join(str(problem).split())[:120]
        raise ConfigError(f'config error: {path} is not valid YAML{where}: {problem}') from error
    except RecursionError as error:  # a deeply nested document
        raise ConfigError(f'config error: {path} is nested too deeply') from error
    return config_from_dict(raw)
