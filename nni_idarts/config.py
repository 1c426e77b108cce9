"""The YAML configuration of the ``nni-idarts`` command: sections, defaults and validation, in one place.

A config has the sections ``space``, ``data``, ``strategy``, ``search`` and ``retrain``, and ``output_dir``.
Each section's keys are the arguments of the function it configures, and their defaults and types are read from
that function's signature, so a default lives only where it is used:

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

:func:`load_config` rejects an unknown key or a value of the wrong type with a :class:`ConfigError` whose message
is one line naming the key and the expected type.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from search_spaces import SPACES, space_knobs

from .data import DATASETS, load_splits
from .retrain import train_and_evaluate
from .search import search
from .strategy import IDartsStrategy

#: The defaults that belong to the command itself rather than to a function it calls.
DEFAULT_SPACE = 'digits'
DEFAULT_DATA = 'digits'
DEFAULT_OUTPUT_DIR = 'runs/search'
#: Lightning's accelerator for search and retraining ('auto' takes a GPU when there is one).
DEFAULT_ACCELERATOR = 'cpu'
#: How often Lightning writes the logged metrics to TensorBoard (its own default, 50, hides short runs).
DEFAULT_LOG_EVERY_N_STEPS = 10

SEARCH_KEYS = ('epochs', 'batch_size', 'learning_rate', 'weight_decay', 'seed', 'checkpoint_every_n_steps')
RETRAIN_KEYS = ('epochs', 'batch_size', 'learning_rate', 'weight_decay', 'seed')
SECTIONS = ('space', 'data', 'strategy', 'search', 'retrain')


class ConfigError(ValueError):
    """A config that cannot be used; ``str(error)`` is one line naming the key."""


@dataclass(frozen=True)
class Key:
    type: Any      #: a type or a typing union, e.g. ``int`` or ``float | None``
    default: Any


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


def _keys_of(function: Callable[..., Any], names: typing.Iterable[str] | None = None) -> dict[str, Key]:
    """``{name: Key(type, default)}`` for the named parameters of ``function`` (all with a default if None)."""
    function = getattr(function, '_init_wrapped', function)  # NNI's ModelSpace wraps __init__
    hints = typing.get_type_hints(function)
    params = inspect.signature(function).parameters
    wanted = names if names is not None else [
        n for n, p in params.items() if p.default is not inspect.Parameter.empty and n != 'self']
    return {n: Key(hints.get(n, type(params[n].default)), params[n].default) for n in wanted}


def section_keys(section: str, space: str = DEFAULT_SPACE) -> dict[str, Key]:
    """The keys of ``section`` with their types and defaults (``space``: the space whose knobs are allowed)."""
    if section == 'space':
        return {'name': Key(str, DEFAULT_SPACE),
                **{n: Key(type(d), d) for n, d in space_knobs(space).items()}}
    if section == 'data':
        return {'name': Key(str, DEFAULT_DATA), **_keys_of(load_splits)}
    if section == 'strategy':
        return {n: k for n, k in _keys_of(IDartsStrategy.__init__).items() if n != 'kwargs'}
    if section == 'search':
        return {**_keys_of(search, SEARCH_KEYS), 'log_every_n_steps': Key(int, DEFAULT_LOG_EVERY_N_STEPS),
                'accelerator': Key(str, DEFAULT_ACCELERATOR)}
    if section == 'retrain':
        return {**_keys_of(train_and_evaluate, RETRAIN_KEYS), 'accelerator': Key(str, DEFAULT_ACCELERATOR)}
    raise KeyError(section)


def _type_name(hint: Any) -> str:
    if _is_union(hint):
        return ' or '.join('null' if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    return getattr(hint, '__name__', str(hint))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _check(key: str, value: Any, hint: Any) -> Any:
    """``value`` if it has type ``hint`` (an int is accepted, and converted, where a float is expected)."""
    if _is_union(hint):
        for option in typing.get_args(hint):
            try:
                return _check(key, value, option)
            except ConfigError:
                pass
    elif hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    shown = 'null' if value is None else f'{type(value).__name__} {value!r}'
    raise ConfigError(f"config error: '{key}' must be {_type_name(hint)}, got {shown}")


def _read_section(raw: Any, section: str, keys: dict[str, Key]) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: '{section}' must be a mapping of keys to values, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in keys]
    if unknown:
        raise ConfigError(f"config error: unknown key '{section}.{unknown[0]}' (known keys: {', '.join(keys)})")
    return {k: _check(f'{section}.{k}', raw[k], key.type) if k in raw else key.default for k, key in keys.items()}


def config_from_dict(raw: Any) -> Config:
    """Validate a parsed YAML document and fill in the defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f'config error: the config must be a mapping of sections, got {type(raw).__name__}')
    unknown = [k for k in raw if k not in (*SECTIONS, 'output_dir')]
    if unknown:
        raise ConfigError(f"config error: unknown key '{unknown[0]}' (known keys: {', '.join(SECTIONS)}, output_dir)")

    space_raw = raw.get('space') or {}
    name = space_raw.get('name', DEFAULT_SPACE) if isinstance(space_raw, dict) else DEFAULT_SPACE
    _check('space.name', name, str)
    if name not in SPACES:
        raise ConfigError(f"config error: 'space.name' must be one of {', '.join(SPACES)}, got {name!r}")
    sections = {s: _read_section(raw.get(s), s, section_keys(s, name)) for s in SECTIONS}
    if sections['data']['name'] not in DATASETS:
        raise ConfigError(f"config error: 'data.name' must be one of {', '.join(DATASETS)}, "
                          f"got {sections['data']['name']!r}")
    output_dir = _check('output_dir', raw.get('output_dir', DEFAULT_OUTPUT_DIR), str)
    return Config(**sections, output_dir=output_dir)


def load_config(path: str | Path) -> Config:
    """Read, parse and validate the YAML file ``path``."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f'config error: cannot read {path}: {error.strerror or error}') from error
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, 'problem_mark', None)
        where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else ''
        problem = getattr(error, 'problem', None) or str(error).splitlines()[0]
        raise ConfigError(f'config error: {path} is not valid YAML{where}: {problem}') from error
    return config_from_dict(raw)
