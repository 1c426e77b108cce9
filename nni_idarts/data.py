"""Datasets for searching and retraining. The default, scikit-learn's digits, ships with scikit-learn (no download)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset


@dataclass
class Splits:
    """``train`` trains the weights, ``val`` the architecture (the bilevel split); ``test`` is held out for retraining."""
    train: Dataset
    val: Dataset
    test: Dataset


def digits_splits(seed: int = 0, test_fraction: float = 0.2) -> Splits:
    """The 1797 8x8 digits as ``(1, 8, 8)`` float images in [0, 1]: a held-out test part, the rest halved into train/val.

    The split depends only on ``seed``, so a search and the retraining of its result see the same test set.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    labels = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    n_train = (len(labels) - n_test) // 2
    parts = order[n_test:n_test + n_train], order[n_test + n_train:], order[:n_test]
    train, val, test = (TensorDataset(images[idx], labels[idx]) for idx in parts)
    return Splits(train=train, val=val, test=test)
