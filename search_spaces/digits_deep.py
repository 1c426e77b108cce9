"""A harder CPU-sized ground-truth space for scikit-learn's digits: a 4-edge residual cell, 5^4 = 625 architectures.

The cell has nodes 0 (its input) to 3 (its output). A chain of three edges 0->1->2->3 and a shortcut edge 0->3
each pick one of NAS-Bench-201's five ops (``none``, ``skip_connect``, ``conv_1x1``, ``conv_3x3``,
``avg_pool_3x3``, as in :data:`~search_spaces.digits.DIGITS_OPS`); node 3 sums the chain and the shortcut.
So the space holds plain chains (shortcut ``none``), residual blocks (shortcut ``skip_connect``), cells whose
chain is cut by a ``none`` (only the shortcut remains) and 16 "dead" cells whose output is identically zero;
parameter-free ops can stand anywhere, which is where DARTS's drift to them shows.

The network is a 3x3 stem, ``num_cells`` cells sharing one architecture (as in NAS-Bench-201), global average
pooling and a linear classifier. Labels: ``edge_0_1``, ``edge_1_2``, ``edge_2_3``, ``edge_0_3``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from nni.nas.nn.pytorch import LayerChoice, ModelSpace

from .digits import DIGITS_OPS, digits_op

DEEP_EDGES = ((0, 1), (1, 2), (2, 3), (0, 3))
#: The ops without weights (the drift of DARTS goes to these).
PARAMETER_FREE_OPS = ('none', 'skip_connect', 'avg_pool_3x3')


class DigitsDeepCell(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.edges = nn.ModuleDict({
            f'{i}_{j}': LayerChoice({op: digits_op(op, channels) for op in DIGITS_OPS}, label=f'edge_{i}_{j}')
            for i, j in DEEP_EDGES
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chain = self.edges['2_3'](self.edges['1_2'](self.edges['0_1'](x)))
        return chain + self.edges['0_3'](x)


class DigitsDeepCellSpace(ModelSpace):
    """The 625-architecture digits space: ``(N, 1, 8, 8)`` images in [0, 1] -> 10 logits."""

    def __init__(self, channels: int = 8, num_cells: int = 1, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.cells = nn.ModuleList([DigitsDeepCell(channels) for _ in range(num_cells)])
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        return self.head(x)
