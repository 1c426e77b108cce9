"""Datasets for searching and retraining. The default, scikit-learn's digits, ships with scikit-learn (no download);
CIFAR-10/100 and image folders are read from local files (nothing is downloaded at run time)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset, Subset, TensorDataset


@dataclass
class Splits:
    """``train`` trains the weights, ``val`` the architecture (the bilevel split); ``test`` is held out for retraining."""
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int = 10


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


# ----- CIFAR-10 / CIFAR-100 and image folders: real datasets from local files, never downloaded -----

#: Per-channel mean and std of the CIFAR training sets (the usual normalisation of DARTS-style code).
CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class DataError(ValueError):
    """A dataset cannot be loaded as configured; the message says what is missing and where."""


def _local_cifar_class(num_classes: int) -> type:
    """torchvision's CIFAR class with the md5 checks replaced by presence checks.

    The download is never used here, and a presence check lets a partial or test-made copy in the same format load;
    the pickle loader still fails on a corrupt file.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    base = {10: CIFAR10, 100: CIFAR100}[num_classes]
    return type(f'Local{base.__name__}', (base,), {
        'train_list': [[name, None] for name, _ in base.train_list],
        'test_list': [[name, None] for name, _ in base.test_list],
        'meta': {**base.meta, 'md5': None},
    })


def cifar_files(num_classes: int) -> tuple[str, list[str]]:
    """The folder (below ``root``) and the files that CIFAR-``num_classes`` needs, as in the official python archive."""
    cls = _local_cifar_class(num_classes)
    return cls.base_folder, [name for name, _ in cls.train_list + cls.test_list] + [cls.meta['filename']]


def _split_train_val(pool: Dataset, seed: int, val_fraction: float) -> tuple[Dataset, Dataset]:
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()  # type: ignore[arg-type]
    n_val = int(round(len(order) * val_fraction))
    if n_val == 0 or n_val == len(order):
        raise DataError(f'val_fraction={val_fraction} leaves an empty train or val part of {len(order)} examples.')
    return Subset(pool, order[n_val:]), Subset(pool, order[:n_val])


def _random_subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """A random subset of ``n`` examples (all when ``n`` is None), fixed by ``seed``."""
    if n is None or n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]  # type: ignore[arg-type]
    return Subset(dataset, order.tolist())


def _capped(splits: Splits, subset: int | None, seed: int) -> Splits:
    if subset is not None and subset < 1:
        raise DataError(f'subset must be at least 1, got {subset}')
    return Splits(train=_random_subset(splits.train, subset, seed), val=_random_subset(splits.val, subset, seed),
                  test=_random_subset(splits.test, subset, seed), num_classes=splits.num_classes)


def cifar_splits(root: str | os.PathLike, num_classes: int = 10, *, seed: int = 0, val_fraction: float = 0.5,
                 subset: int | None = None) -> Splits:
    """CIFAR-10 or CIFAR-100 from ``root/cifar-10-batches-py`` or ``root/cifar-100-python`` (the official python
    archives, extracted). The 50k training images are split into train (weights) and val (architecture), by
    default in halves as in DARTS; the 10k test images are ``test``. Images are normalised with the training set's
    per-channel mean and std. ``subset``: see :func:`load_splits`.
    """
    from torchvision import transforms

    if num_classes not in CIFAR_STATS:
        raise DataError(f'CIFAR has 10 or 100 classes, not {num_classes}.')
    folder, needed = cifar_files(num_classes)
    where = Path(root).expanduser() / folder
    missing = [name for name in needed if not (where / name).is_file()]
    if missing:
        raise DataError(f'CIFAR-{num_classes} files missing in {where}: {", ".join(missing)} (extract the official '
                        f'python archive into {Path(root).expanduser()}; nothing is downloaded)')
    mean, std = CIFAR_STATS[num_classes]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    cls = _local_cifar_class(num_classes)
    try:
        pool = cls(str(Path(root).expanduser()), train=True, transform=transform, download=False)
        test = cls(str(Path(root).expanduser()), train=False, transform=transform, download=False)
    except Exception as error:  # a truncated or foreign file: name it rather than fail deep in pickle
        raise DataError(f'cannot read CIFAR-{num_classes} from {where}: {error}') from error
    train, val = _split_train_val(pool, seed, val_fraction)
    return _capped(Splits(train=train, val=val, test=test, num_classes=num_classes), subset, seed)


def image_folder_splits(root: str | os.PathLike, *, image_size: int = 32, seed: int = 0, val_fraction: float = 0.5,
                        test_fraction: float = 0.2, grayscale: bool = False, subset: int | None = None) -> Splits:
    """Images in ``root/<class name>/<image>`` (torchvision's ``ImageFolder``), resized to ``image_size`` squared.

    A ``test_fraction`` part is held out for retraining, the rest is split into train and val by ``val_fraction``.
    """
    from torchvision import datasets, transforms

    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f'image folder {path} does not exist (expected {path}/<class name>/<image files>)')
    steps: list[Any] = [transforms.Resize((image_size, image_size))]
    if grayscale:
        steps.append(transforms.Grayscale())
    steps.append(transforms.ToTensor())
    try:
        data = datasets.ImageFolder(str(path), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as error:
        raise DataError(f'cannot read image folder {path}: {error}') from error
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(round(len(order) * test_fraction))
    if n_test == 0:
        raise DataError(f'test_fraction={test_fraction} of {len(order)} images in {path} leaves no test images.')
    train, val = _split_train_val(Subset(data, order[n_test:]), seed, val_fraction)
    return _capped(Splits(train=train, val=val, test=Subset(data, order[:n_test]), num_classes=len(data.classes)),
                   subset, seed)


#: The ``data.name`` values of a config and what loads them.
DATASETS: Sequence[str] = ('digits', 'cifar10', 'cifar100', 'image_folder')


def load_splits(name: str, *, root: str | None = None, seed: int = 0, val_fraction: float = 0.5,
                subset: int | None = None, image_size: int = 32, grayscale: bool = False) -> Splits:
    """The splits of dataset ``name`` (one of :data:`DATASETS`); ``root`` is the local folder of the files.

    ``subset``: keep at most this many examples (a random choice fixed by ``seed``) in each of train, val and test,
    for quick runs and tests.
    """
    if name == 'digits':
        return _capped(digits_splits(seed), subset, seed)
    if name not in DATASETS:
        raise DataError(f'unknown dataset {name!r}; expected one of {", ".join(DATASETS)}')
    if root is None:
        raise DataError(f'dataset {name!r} needs data.root, the local folder that holds its files')
    if name in ('cifar10', 'cifar100'):
        return cifar_splits(root, 10 if name == 'cifar10' else 100, seed=seed, val_fraction=val_fraction,
                            subset=subset)
    return image_folder_splits(root, image_size=image_size, seed=seed, val_fraction=val_fraction,
                               grayscale=grayscale, subset=subset)
