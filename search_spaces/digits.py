"""A CPU-sized cell space for scikit-learn's 8x8 digits: NAS-Bench-201's op set on a 3-edge cell (125 architectures).

The cell has nodes 0 (its input), 1 and 2 (its output); edges 0->1, 0->2 and 1->2 each pick one of five ops
(``none``, ``skip_connect``, ``conv_1x1``, ``conv_3x3``, ``avg_pool_3x3``), and node 2 sums its two edges. The
network is a 3x3 stem, ``num_cells`` cells that share one architecture (as in NAS-Bench-201), global average
pooling and a linear classifier. Labels are ``edge_0_1``, ``edge_0_2``, ``edge_1_2``.
"""

from __future__ import annotations

import nni
import torch
import torch.nn as nn
from nni.nas.nn.pytorch import InputChoice, LayerChoice, ModelSpace, MutableLinear

DIGITS_OPS = ('none', 'skip_connect', 'conv_1x1', 'conv_3x3', 'avg_pool_3x3')
DIGITS_EDGES = ((0, 1), (0, 2), (1, 2))


class Zero(nn.Module):
    """The ``none`` op: cuts the edge (outputs zeros of the input's shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


def _relu_conv_bn(channels: int, kernel_size: int) -> nn.Module:
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(channels, affine=False),
    )


def digits_op(name: str, channels: int) -> nn.Module:
    """One candidate op of the digits cell, shape-preserving."""
    if name == 'none':
        return Zero()
    if name == 'skip_connect':
        return nn.Identity()
    if name == 'conv_1x1':
        return _relu_conv_bn(channels, 1)
    if name == 'conv_3x3':
        return _relu_conv_bn(channels, 3)
    if name == 'avg_pool_3x3':
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(f'Unknown digits op {name!r}; expected one of {DIGITS_OPS}.')


class DigitsCell(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.edges = nn.ModuleDict({
            f'{i}_{j}': LayerChoice({op: digits_op(op, channels) for op in DIGITS_OPS}, label=f'edge_{i}_{j}')
            for i, j in DIGITS_EDGES
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        node1 = self.edges['0_1'](x)
        return self.edges['0_2'](x) + self.edges['1_2'](node1)


class DigitsCellSpace(ModelSpace):
    """The digits cell space: ``(N, 1, 8, 8)`` images in [0, 1] -> 10 logits (any size with ``in_channels``)."""

    def __init__(self, channels: int = 16, num_cells: int = 2, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.cells = nn.ModuleList([DigitsCell(channels) for _ in range(num_cells)])
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        return self.head(x)


class DigitsMLPSpace(ModelSpace):
    """A tiny MLP space on flattened digits that uses every kind of NNI choice the strategies support.

    ``width`` (an ``nni.choice`` on ``MutableLinear`` widths), ``op`` (a ``LayerChoice``) and ``skip`` (an
    ``InputChoice`` between the op's output and its input). Input: ``(N, 1, 8, 8)`` or ``(N, 64)``.
    """

    def __init__(self, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        width = nni.choice('width', [hidden // 2, hidden])
        self.stem = MutableLinear(64, width)
        self.proj = MutableLinear(width, hidden)
        self.op = LayerChoice({
            'linear_relu': nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()),
            'linear_tanh': nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()),
            'identity': nn.Identity(),
        }, label='op')
        self.skip = InputChoice(n_candidates=2, n_chosen=1, label='skip')
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(torch.relu(self.stem(x.flatten(1)))))
        return self.head(self.skip([self.op(h), h]))
