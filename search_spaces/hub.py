"""NNI's own NAS-Bench-201 and DARTS spaces (``nni.nas.hub.pytorch``), with the input and output sizes as knobs.

NNI's classes fix 3 input channels and, for DARTS, 10 classes; these subclasses only swap the stem convolution and
the classifier, so the cells, labels and export format stay NNI's. Both run with inputs as small as 8x8.
"""

from __future__ import annotations

import torch.nn as nn
from nni.nas.hub.pytorch import DARTS, NasBench201
from nni.nas.space import model_context


class NasBench201Space(NasBench201):
    """NAS-Bench-201 (Dong & Yang, 2020): 3 stages of ``cells_per_stage`` cells sharing one 6-edge cell, 5 ops per
    edge (labels ``cell/<i>_<j>``), ResNet blocks between stages. The benchmark's sizes: channels=16, cells_per_stage=5.
    """

    def __init__(self, channels: int = 16, cells_per_stage: int = 5, in_channels: int = 3, num_classes: int = 10):
        super().__init__(stem_out_channels=channels, num_modules_per_stack=cells_per_stage, num_labels=num_classes)
        self.stem[0] = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False)


class DartsSpace(DARTS):
    """The DARTS CNN space (Liu et al., 2019): normal and reduction cells with 4 nodes, each node taking two of the
    earlier nodes through one of 7 ops (labels ``normal|reduce/op_<node>_<k>`` and ``.../input_<node>_<k>``).
    ``num_cells`` cells, reductions at 1/3 and 2/3 of the depth. DARTS' search: width=16, num_cells=8; its
    CIFAR-10 evaluation network: width=36, num_cells=20.
    """

    def __init__(self, width: int = 16, num_cells: int = 8, in_channels: int = 3, num_classes: int = 10):
        super().__init__(width=width, num_cells=num_cells, dataset='cifar')
        self._size_knobs = dict(width=width, num_cells=num_cells, in_channels=in_channels, num_classes=num_classes)
        stem_channels = self.stem[0].out_channels
        self.stem[0] = nn.Conv2d(in_channels, stem_channels, kernel_size=3, padding=1, bias=False)
        self.classifier = nn.Linear(self.classifier.in_features, num_classes)

    def freeze(self, sample: dict) -> nn.Module:
        # NNI's NDS.freeze rebuilds a plain NDS, which would drop the stem and classifier swapped above.
        with model_context(sample):
            return DartsSpace(**self._size_knobs)
