"""The three search spaces of NAS-Bench-1Shot1 (Zela, Siems & Hutter, ICLR 2020), as NNI model spaces.

NAS-Bench-1Shot1 re-reads NAS-Bench-101's cell as a one-shot search space. A cell has an input node (0), ``n``
intermediate nodes ("choice blocks", 1..n) and an output node (n+1):

- every choice block applies one op chosen among ``conv3x3-bn-relu``, ``conv1x1-bn-relu`` and ``maxpool3x3``
  (a ``LayerChoice`` labelled ``node_<k>_op``) to the sum of its parents;
- choice block ``k`` takes a fixed number of parents chosen among the earlier nodes ``0..k-1``, and the output node
  a fixed number among ``0..n`` (an ``InputChoice`` labelled ``node_<k>_inputs`` / ``output_inputs``, sum reduction).
  When the number of parents equals the number of candidates there is nothing to choose and no InputChoice is made.

Parent counts, from the paper's definitions (``num_parents_per_node`` of its search spaces 1, 2 and 3):

====== ===================== ==== ==== ==== ==== ==== ======
space  intermediate nodes n  1    2    3    4    5    output
====== ===================== ==== ==== ==== ==== ==== ======
1      4                     1    2    2    2    -    2
2      4                     1    1    2    2    -    3
3      5                     1    1    1    2    2    2
====== ===================== ==== ==== ==== ==== ==== ======

So space 1 chooses the parents of nodes 3, 4 and the output (node 1 has only node 0, node 2 takes both of 0, 1);
every cell has at most 9 edges, NAS-Bench-101's limit.

Simplifications against NAS-Bench-101, kept because they do not change which architectures exist: the cell input
is projected once (conv1x1-bn-relu) to the cell's width instead of per edge, and the output node sums its parents
instead of concatenating channel slices, so its width does not depend on the choice. NAS-Bench-101's extra fixed
conv1x1 node of spaces 1 and 2 (which exists only to reach its 5-node format) is left out.

The network, as in NAS-Bench-101: a conv3x3-bn-relu stem, ``num_stacks`` stacks of ``cells_per_stack`` cells with a
2x2 max-pool and doubled width between stacks, global average pooling and a linear classifier. All cells share one
architecture (the same labels). NAS-Bench-101 uses channels=128, num_stacks=3, cells_per_stack=3.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from nni.nas.nn.pytorch import InputChoice, LayerChoice, ModelSpace

NASBENCH1SHOT1_OPS = ('conv3x3-bn-relu', 'conv1x1-bn-relu', 'maxpool3x3')

#: search space -> number of parents of choice blocks 1..n, then of the output node.
NUM_PARENTS = {
    1: (1, 2, 2, 2, 2),
    2: (1, 1, 2, 2, 3),
    3: (1, 1, 1, 2, 2, 2),
}


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def nasbench1shot1_op(name: str, channels: int) -> nn.Module:
    if name == 'conv3x3-bn-relu':
        return _conv_bn_relu(channels, channels, 3)
    if name == 'conv1x1-bn-relu':
        return _conv_bn_relu(channels, channels, 1)
    if name == 'maxpool3x3':
        return nn.MaxPool2d(3, stride=1, padding=1)
    raise ValueError(f'Unknown NAS-Bench-1Shot1 op {name!r}; expected one of {NASBENCH1SHOT1_OPS}.')


class _Parents(nn.Module):
    """Sums the chosen parents of one node: an InputChoice, or all candidates when there is nothing to choose."""

    def __init__(self, n_candidates: int, n_chosen: int, label: str):
        super().__init__()
        if not 1 <= n_chosen <= n_candidates:
            raise ValueError(f'{label}: cannot choose {n_chosen} parents among {n_candidates} nodes.')
        self.choice = (InputChoice(n_candidates=n_candidates, n_chosen=n_chosen, reduction='sum', label=label)
                       if n_chosen < n_candidates else None)

    def forward(self, nodes: list[torch.Tensor]) -> torch.Tensor:
        if self.choice is None:
            return torch.stack(nodes).sum(0)
        return self.choice(nodes)


class NasBench1Shot1Cell(nn.Module):
    def __init__(self, search_space: int, in_channels: int, channels: int):
        super().__init__()
        *node_parents, output_parents = NUM_PARENTS[search_space]
        self.preprocess = _conv_bn_relu(in_channels, channels, 1)
        self.parents = nn.ModuleList([_Parents(k, n, f'node_{k}_inputs') for k, n in enumerate(node_parents, 1)])
        self.ops = nn.ModuleList([
            LayerChoice({op: nasbench1shot1_op(op, channels) for op in NASBENCH1SHOT1_OPS}, label=f'node_{k}_op')
            for k in range(1, len(node_parents) + 1)
        ])
        self.output = _Parents(len(node_parents) + 1, output_parents, 'output_inputs')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [self.preprocess(x)]
        for parents, op in zip(self.parents, self.ops):
            nodes.append(op(parents(nodes)))
        return self.output(nodes)


class NasBench1Shot1Space(ModelSpace):
    """NAS-Bench-1Shot1 search space ``search_space`` (1, 2 or 3): ``(N, in_channels, H, W)`` -> ``num_classes`` logits.

    H and W must be divisible by ``2 ** (num_stacks - 1)``.
    """

    def __init__(self, search_space: int = 1, channels: int = 16, num_stacks: int = 3, cells_per_stack: int = 3,
                 in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if search_space not in NUM_PARENTS:
            raise ValueError(f'search_space must be 1, 2 or 3; got {search_space!r}.')
        self.stem = _conv_bn_relu(in_channels, channels, 3)
        layers: list[nn.Module] = []
        width = channels
        for stack in range(num_stacks):
            if stack > 0:
                layers.append(nn.MaxPool2d(2, stride=2))
            out = channels * 2 ** stack
            for _ in range(cells_per_stack):
                layers.append(NasBench1Shot1Cell(search_space, width, out))
                width = out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))
