"""NNI model spaces for nni-idarts. Each is a plain ``nni.nas.nn.pytorch.ModelSpace``, usable by any NNI strategy.

:data:`SPACES` names them for configuration files; every space takes ``in_channels`` and ``num_classes`` so that it
fits any dataset, and size knobs (widths, depths) small enough for a CPU test.
"""

from __future__ import annotations

import inspect
from typing import Any

from nni.nas.nn.pytorch import ModelSpace

from .digits import DIGITS_OPS, DigitsCellSpace, DigitsMLPSpace
from .digits_deep import PARAMETER_FREE_OPS, DigitsDeepCellSpace
from .hub import DartsSpace, NasBench201Space
from .nasbench1shot1 import NASBENCH1SHOT1_OPS, NasBench1Shot1Space

#: name in a config -> model space class. ``nasbench1shot1_<n>`` fixes ``search_space=n``.
SPACES: dict[str, type[ModelSpace]] = {
    'digits': DigitsCellSpace,
    'digits_deep': DigitsDeepCellSpace,
    'nasbench201': NasBench201Space,
    'darts': DartsSpace,
    'nasbench1shot1_1': NasBench1Shot1Space,
    'nasbench1shot1_2': NasBench1Shot1Space,
    'nasbench1shot1_3': NasBench1Shot1Space,
}
#: Arguments that the registry sets itself, from the space's name or from the data.
_FIXED = {'nasbench1shot1_1': {'search_space': 1}, 'nasbench1shot1_2': {'search_space': 2},
          'nasbench1shot1_3': {'search_space': 3}}
_FROM_DATA = ('in_channels', 'num_classes')


def space_knobs(name: str) -> dict[str, Any]:
    """The size knobs of space ``name`` that a config may set, with their defaults (from the class signature)."""
    if name not in SPACES:
        raise KeyError(name)
    # ModelSpace wraps __init__ to record its arguments; the wrapped original has the real signature.
    init = getattr(SPACES[name], '_init_wrapped', SPACES[name].__init__)
    params = inspect.signature(init).parameters
    return {k: p.default for k, p in params.items()
            if k != 'self' and k not in _FROM_DATA and k not in _FIXED.get(name, {})}


def build_space(name: str, *, in_channels: int, num_classes: int, **knobs: Any) -> ModelSpace:
    """A fresh model space ``name`` for ``in_channels``-channel images and ``num_classes`` classes."""
    unknown = set(knobs) - set(space_knobs(name))
    if unknown:
        raise TypeError(f'space {name!r} has no knob(s) {sorted(unknown)}; it has {sorted(space_knobs(name))}.')
    return SPACES[name](**_FIXED.get(name, {}), **knobs, in_channels=in_channels, num_classes=num_classes)


__all__ = ['SPACES', 'build_space', 'space_knobs', 'DigitsCellSpace', 'DigitsMLPSpace', 'DIGITS_OPS', 'DigitsDeepCellSpace',
           'PARAMETER_FREE_OPS', 'NasBench201Space', 'DartsSpace',
           'NasBench1Shot1Space', 'NASBENCH1SHOT1_OPS']
