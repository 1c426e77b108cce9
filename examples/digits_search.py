"""Search a small model space on scikit-learn's digits with IDartsStrategy through NNI's NasExperiment (CPU, < 1 min).

    python examples/digits_search.py [--epochs 3] [--hypergradient implicit] [--workdir DIR]

The space has a LayerChoice (which op), an InputChoice (which earlier feature to add back) and a layer whose
width is an ``nni.choice``; the exported architecture names a choice for every label.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import nni
import torch
import torch.nn as nn
from nni.nas.evaluator.pytorch import Classification, DataLoader
from nni.nas.experiment import NasExperiment
from nni.nas.nn.pytorch import InputChoice, LayerChoice, ModelSpace, MutableLinear
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from nni_idarts import IDartsStrategy


class DigitsSpace(ModelSpace):
    """An MLP space on 8x8 digits: 64 -> hidden (width chosen) -> op (chosen) -> skip (chosen) -> 10."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        width = nni.choice('width', [16, hidden])
        self.stem = MutableLinear(64, width)
        self.proj = MutableLinear(width, hidden)
        self.op = LayerChoice([
            nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()),
            nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()),
            nn.Identity(),
        ], label='op')
        self.skip = InputChoice(n_candidates=2, n_chosen=1, label='skip')
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        h = torch.relu(self.proj(torch.relu(self.stem(x))))
        o = self.op(h)
        return self.head(self.skip([o, h]))


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Half of the digits for the weights (train), half for the architecture (val), scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    half = len(x) // 2
    train = TensorDataset(x[perm[:half]], y[perm[:half]])
    val = TensorDataset(x[perm[half:]], y[perm[half:]])
    return (DataLoader(train, batch_size=batch_size, shuffle=True),
            DataLoader(val, batch_size=batch_size, shuffle=True))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--hypergradient', default='implicit', choices=['implicit', 'unrolled', 'first_order'])
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workdir', default=None, help='NNI experiment directory (default: a temporary one)')
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train_loader, val_loader = digits_loaders(seed=args.seed)
    evaluator = Classification(
        train_dataloaders=train_loader, val_dataloaders=val_loader, num_classes=10,
        learning_rate=0.05, optimizer=torch.optim.SGD, export_onnx=False,
        max_epochs=args.epochs, accelerator='cpu', enable_checkpointing=False, logger=False)
    strategy = IDartsStrategy(hypergradient=args.hypergradient, arc_learning_rate=3e-2)
    experiment = NasExperiment(DigitsSpace(), evaluator, strategy)
    with tempfile.TemporaryDirectory() as tmp:
        experiment.config.experiment_working_directory = args.workdir or tmp
        experiment.run()
        arch = experiment.export_top_models(formatter='dict')[0]
    print(json.dumps(arch, indent=2, sort_keys=True))
    return arch


if __name__ == '__main__':
    main()
