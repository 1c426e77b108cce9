"""Datasets for searching and retraining. The default, scikit-learn's digits, ships with scikit-learn (no download);
CIFAR-10/100 and image folders are read from local files (nothing is downloaded at run time).

Everything a file could get wrong is found here, at load time, as one :class:`DataError` line naming the file: a
search never starts on data that would fail (or be silently wrong) in its middle or, for the test split, at its end.
CIFAR's pickled batches are read by :class:`CifarUnpickler`, which can build only dicts, lists, strings, numbers and
numpy arrays, so a crafted file under ``data.root`` cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import brief, reason


class DataError(ValueError):
    """A dataset cannot be loaded as configured; the message (one line) says what is wrong and where."""


@dataclass
class Splits:
    """``train`` trains the weights, ``val`` the architecture (the bilevel split); ``test`` is held out for retraining."""
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int = 10


def _check_fraction(key: str, value: Any) -> float:
    """``value`` if it is a number strictly between 0 and 1 (a fraction that leaves both of its parts a share)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise DataError(f'data error: {key} must be a number strictly between 0 and 1, got {brief(value)}')
    return float(value)


def digits_splits(seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.5) -> Splits:
    """The 1797 8x8 digits as ``(1, 8, 8)`` float images in [0, 1]: a held-out test part, the rest split into train
    and val by ``val_fraction`` (by default halved: 719 / 719, and 359 test digits).

    The split depends only on ``seed``, so a search and the retraining of its result see the same test set.
    """
    from sklearn.datasets import load_digits

    test_fraction = _check_fraction('test_fraction', test_fraction)
    val_fraction = _check_fraction('data.val_fraction', val_fraction)
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    labels = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    n_val = int(round((len(labels) - n_test) * val_fraction))
    n_train = len(labels) - n_test - n_val
    if n_train == 0 or n_val == 0:
        raise DataError(f'data error: data.val_fraction={brief(val_fraction)} leaves an empty train or val part of '
                        f'{len(labels) - n_test} digits')
    parts = order[n_test:n_test + n_train], order[n_test + n_train:], order[:n_test]
    train, val, test = (TensorDataset(images[idx], labels[idx]) for idx in parts)
    return Splits(train=train, val=val, test=test)


# ----- CIFAR-10 / CIFAR-100 and image folders: real datasets from local files, never downloaded -----

#: Per-channel mean and std of the CIFAR training sets (the usual normalisation of DARTS-style code).
CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

#: The files of the official python archives (as torchvision lists them): folder, training batches, test batch,
#: meta file, and the keys of the labels and of the class names.
_CIFAR_LAYOUT = {
    10: ('cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)], 'test_batch', 'batches.meta',
         'labels', 'label_names'),
    100: ('cifar-100-python', ['train'], 'test', 'meta', 'fine_labels', 'fine_label_names'),
}

#: Values per CIFAR image: 3 channels of 32 x 32 bytes, channel-major, as the official batches store them.
CIFAR_IMAGE_BYTES = 3 * 32 * 32


def cifar_files(num_classes: int) -> tuple[str, list[str]]:
    """The folder (below ``root``) and the files that CIFAR-``num_classes`` needs, as in the official python archive."""
    folder, train, test, meta, _, _ = _CIFAR_LAYOUT[num_classes]
    return folder, [*train, test, meta]


class _PickleGlobal:
    """A global that a CIFAR pickle may name. Instances have no state a pickle could change: no ``__dict__`` and no
    ``__setstate__``, so ``BUILD`` on one fails; they are not types, so ``NEWOBJ`` refuses them."""
    __slots__ = ()


#: Stands for ``numpy.ndarray``, which numpy's pickles only pass to ``_reconstruct``: not callable, so a pickle
#: cannot allocate an array of a shape it chooses.
_NDARRAY = _PickleGlobal()


class _Reconstruct(_PickleGlobal):
    """numpy's ``_reconstruct`` for what numpy pickles (an empty array that ``__setstate__`` then fills), and nothing
    else: the data, and so the size, comes from the file's bytes."""
    __slots__ = ()

    def __call__(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _NDARRAY or shape != (0,) or not isinstance(dtype, (str, bytes)):
            raise pickle.UnpicklingError('numpy._reconstruct called with other arguments than numpy pickles use')
        return np.ndarray((0,), dtype=np.dtype(dtype))


class _FromBuffer(_PickleGlobal):
    """numpy's ``_frombuffer`` (how numpy pickles arrays with protocol 5)."""
    __slots__ = ()

    def __call__(self, buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or order not in 'CF':
            raise pickle.UnpicklingError('numpy._frombuffer called with other arguments than numpy pickles use')
        return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


class _Dtype(_PickleGlobal):
    """``numpy.dtype`` as numpy pickles it: ``dtype(code, align, copy)`` with a type code such as ``'u1'`` (the flags
    are booleans, or 0/1 in Python 2's pickles)."""
    __slots__ = ()

    def __call__(self, code: Any, align: Any = False, copy: Any = False) -> np.dtype:
        if not isinstance(code, (str, bytes)) or not all(isinstance(f, int) and f in (0, 1) for f in (align, copy)):
            raise pickle.UnpicklingError('numpy.dtype called with other arguments than numpy pickles use')
        return np.dtype(code, bool(align), bool(copy))


class _Latin1Encode(_PickleGlobal):
    """``_codecs.encode`` as protocol-2 pickles of bytes use it (latin-1 only)."""
    __slots__ = ()

    def __call__(self, text: Any, encoding: Any = 'latin1') -> bytes:
        if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
            raise pickle.UnpicklingError('_codecs.encode called with other arguments than pickles of bytes use')
        return text.encode('latin1')


class CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches and nothing else: the only globals are stand-ins for numpy's array and dtype
    rebuilders.

    Pickle runs code only through the globals that ``find_class`` returns (``REDUCE`` calls them, ``BUILD`` calls
    ``__setstate__`` of what they return). Here they are the :class:`_PickleGlobal` objects above, which check their
    arguments and make numpy arrays and dtypes; everything else a pickle can build is a dict, list, tuple, str,
    bytes, number, bool or None. ``persistent_load`` is not defined, so persistent ids are refused too.
    """

    ALLOWED = {
        ('numpy.core.multiarray', '_reconstruct'): _Reconstruct(),   # written with numpy 1 (the official files)
        ('numpy._core.multiarray', '_reconstruct'): _Reconstruct(),  # numpy 2
        ('numpy.core.numeric', '_frombuffer'): _FromBuffer(),        # protocol 5
        ('numpy._core.numeric', '_frombuffer'): _FromBuffer(),
        ('numpy', 'ndarray'): _NDARRAY,
        ('numpy', 'dtype'): _Dtype(),
        ('_codecs', 'encode'): _Latin1Encode(),                      # bytes in protocol-2 pickles of Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[module, name]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f'refused global {brief(f"{module}.{name}")} '
                                         f'(a CIFAR batch holds only dicts, lists and numpy arrays)') from None


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """The dict pickled in ``path`` (keys as ``str``), read by :class:`CifarUnpickler`; one-line DataError if not."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f'data error: cannot read {path}: {error.strerror or error}') from error
    try:
        # latin1: the official files are Python 2 pickles, whose byte strings numpy needs as latin-1 text
        doc = CifarUnpickler(io.BytesIO(raw), encoding='latin1').load()
    except MemoryError as error:
        raise DataError(f'data error: {path} asks for more memory than there is: not a CIFAR batch') from error
    except Exception as error:  # pickle raises many types (UnpicklingError, EOFError, ValueError, ...) on bad bytes
        raise DataError(f'data error: {path} is not a CIFAR python batch: {reason(error)}') from error
    if not isinstance(doc, dict):
        raise DataError(f'data error: {path} must hold a pickled dict (a CIFAR python batch), got {type(doc).__name__}')
    return {key.decode('latin1') if isinstance(key, bytes) else key: value for key, value in doc.items()}


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The images ``(N, 3072)`` uint8 and labels ``(N,)`` int64 of one batch file, with their shapes, types and
    ranges checked."""
    doc = read_cifar_pickle(path)
    for key in ('data', label_key):
        if key not in doc:
            raise DataError(f'data error: {path} has no {key!r} entry (keys: {brief(sorted(map(str, doc)))})')
    data, labels = doc['data'], doc[label_key]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == CIFAR_IMAGE_BYTES):
        what = f'{data.dtype} array of shape {data.shape}' if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"data error: {path}: 'data' must be a uint8 array of shape (N, {CIFAR_IMAGE_BYTES}), "
                        f"got {what}")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or not all(type(v) is int for v in labels):
        raise DataError(f'data error: {path}: {label_key!r} must be a list of integers, got {brief(labels)}')
    if len(data) == 0:  # an empty test batch would fail only after all the training
        raise DataError(f"data error: {path}: 'data' holds no images")
    if len(labels) != len(data):
        raise DataError(f'data error: {path}: {len(labels)} {label_key!r} for {len(data)} images')
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise DataError(f'data error: {path}: label {brief(bad[0])} is not in [0, {num_classes}) '
                        f'({len(bad)} labels out of range)')
    return data, np.asarray(labels, dtype=np.int64)


def _check_cifar_meta(path: Path, names_key: str, num_classes: int) -> None:
    names = read_cifar_pickle(path).get(names_key)
    if not isinstance(names, (list, tuple)) or len(names) != num_classes:
        raise DataError(f'data error: {path}: {names_key!r} must list the {num_classes} class names, '
                        f'got {brief(names)}')


class CifarImages(Dataset):
    """CIFAR images kept as uint8 ``(N, 3, 32, 32)`` and normalised when read: ``(x / 255 - mean) / std`` per
    channel, the same floats as torchvision's ``ToTensor`` + ``Normalize``. Items are ``(image, label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images.reshape(-1, 3, 32, 32)))
        self.labels = torch.from_numpy(labels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].float().div(255)
        return image.sub_(self.mean).div_(self.std), self.labels[index]


def _split_train_val(pool: Dataset, seed: int, val_fraction: float) -> tuple[Dataset, Dataset]:
    val_fraction = _check_fraction('data.val_fraction', val_fraction)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()  # type: ignore[arg-type]
    n_val = int(round(len(order) * val_fraction))
    if n_val == 0 or n_val == len(order):
        raise DataError(f'data error: data.val_fraction={brief(val_fraction)} leaves an empty train or val part of '
                        f'{len(order)} examples')
    return Subset(pool, order[n_val:]), Subset(pool, order[:n_val])


def _random_subset(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """A random subset of ``n`` examples (all when ``n`` is None), fixed by ``seed``."""
    if n is None or n >= len(dataset):  # type: ignore[arg-type]
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]  # type: ignore[arg-type]
    return Subset(dataset, order.tolist())


def _capped(splits: Splits, subset: int | None, seed: int) -> Splits:
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise DataError(f'data error: data.subset must be null or an integer of at least 1, got {brief(subset)}')
    return Splits(train=_random_subset(splits.train, subset, seed), val=_random_subset(splits.val, subset, seed),
                  test=_random_subset(splits.test, subset, seed), num_classes=splits.num_classes)


def cifar_splits(root: str | os.PathLike, num_classes: int = 10, *, seed: int = 0, val_fraction: float = 0.5,
                 subset: int | None = None) -> Splits:
    """CIFAR-10 or CIFAR-100 from ``root/cifar-10-batches-py`` or ``root/cifar-100-python`` (the official python
    archives, extracted). The 50k training images are split into train (weights) and val (architecture), by
    default in halves as in DARTS; the 10k test images are ``test``. Images are normalised with the training set's
    per-channel mean and std. ``subset``: see :func:`load_splits`.

    Every file is read with :class:`CifarUnpickler` and checked (``data`` an ``(N, 3072)`` uint8 array, one label
    in ``[0, num_classes)`` per image, the meta file naming ``num_classes`` classes) before anything trains.
    """
    if num_classes not in _CIFAR_LAYOUT:
        raise DataError(f'data error: CIFAR has 10 or 100 classes, not {brief(num_classes)}')
    _check_fraction('data.val_fraction', val_fraction)
    folder, train_files, test_file, meta_file, label_key, names_key = _CIFAR_LAYOUT[num_classes]
    where = Path(root).expanduser() / folder
    missing = [name for name in cifar_files(num_classes)[1] if not (where / name).is_file()]
    if missing:
        raise DataError(f'data error: CIFAR-{num_classes} files missing in {where}: {", ".join(missing)} (extract the '
                        f'official python archive into {Path(root).expanduser()}; nothing is downloaded)')
    _check_cifar_meta(where / meta_file, names_key, num_classes)
    mean, std = CIFAR_STATS[num_classes]
    batches = [_cifar_batch(where / name, label_key, num_classes) for name in train_files]
    pool = CifarImages(np.concatenate([d for d, _ in batches]), np.concatenate([lab for _, lab in batches]), mean, std)
    del batches
    test = CifarImages(*_cifar_batch(where / test_file, label_key, num_classes), mean, std)
    train, val = _split_train_val(pool, seed, val_fraction)
    return _capped(Splits(train=train, val=val, test=test, num_classes=num_classes), subset, seed)


#: The largest ``data.image_size`` accepted (a supernet on bigger inputs would not fit in memory anyway).
MAX_IMAGE_SIZE = 1024


def check_image(path: str | os.PathLike, image_size: int = 32) -> None:
    """Raise :class:`DataError` unless ``path`` is an image that PIL decodes completely, and converts to RGB as
    torchvision's loader does, within PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).

    JPEGs are decoded at the smallest scale that still covers ``image_size`` (``draft``): every byte is still
    decoded, so a truncated file still fails, at a fraction of the cost.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)  # above the limit, not only above twice it
            with Image.open(path) as image:
                image.draft('RGB', (image_size, image_size))
                image.load()
                image.convert('RGB')
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        pixels = re.search(r'\((\d+) pixels\)', str(error))
        raise DataError(f'data error: image {path} has {pixels[1] if pixels else "too many"} pixels, more than '
                        f'PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} (a guard against decompression '
                        f'bombs)') from error
    except UnidentifiedImageError as error:  # its message repeats the path
        raise DataError(f'data error: image {path} cannot be read: not an image format PIL knows, or its header is '
                        f'damaged') from error
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on corrupt files
        raise DataError(f'data error: image {path} cannot be read: {reason(error)}') from error


def image_folder_splits(root: str | os.PathLike, *, image_size: int = 32, seed: int = 0, val_fraction: float = 0.5,
                        test_fraction: float = 0.2, grayscale: bool = False, subset: int | None = None) -> Splits:
    """Images in ``root/<class name>/<image>`` (torchvision's ``ImageFolder``), resized to ``image_size`` squared.

    A ``test_fraction`` part is held out for retraining, the rest is split into train and val by ``val_fraction``.
    Before anything trains, every image (test images too) is decoded once by :func:`check_image`, and a folder with
    fewer than two classes or a class folder without images is refused.
    """
    from torchvision import datasets, transforms

    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise DataError(f'data error: data.image_size must be an integer in [1, {MAX_IMAGE_SIZE}], '
                        f'got {brief(image_size)}')
    _check_fraction('data.val_fraction', val_fraction)
    _check_fraction('test_fraction', test_fraction)
    path = Path(root).expanduser()
    if not path.is_dir():
        what = 'is not a folder' if path.exists() else 'does not exist'
        raise DataError(f'data error: image folder {path} {what} (expected {path}/<class name>/<image files>)')
    try:
        classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())  # as ImageFolder finds them
    except OSError as error:
        raise DataError(f'data error: cannot read image folder {path}: {error.strerror or error}') from error
    if len(classes) < 2:
        raise DataError(f'data error: image folder {path} has {len(classes)} class folder(s) {brief(classes)}; a '
                        f'classifier needs at least 2 ({path}/<class name>/<image files>)')
    steps: list[Any] = [transforms.Resize((image_size, image_size))]
    if grayscale:
        steps.append(transforms.Grayscale())
    steps.append(transforms.ToTensor())
    try:
        data = datasets.ImageFolder(str(path), transform=transforms.Compose(steps), allow_empty=True)
    except (OSError, RuntimeError) as error:
        raise DataError(f'data error: cannot read image folder {path}: {reason(error)}') from error
    counts = Counter(data.targets)
    empty = [name for index, name in enumerate(data.classes) if counts[index] == 0]
    if empty:
        raise DataError(f'data error: class folder {path / empty[0]} has no images ({len(empty)} empty class folders; '
                        f'image files end in {" ".join(datasets.folder.IMG_EXTENSIONS)})')
    for file, _ in data.samples:
        check_image(file, image_size)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(round(len(order) * test_fraction))
    if n_test == 0:
        raise DataError(f'data error: test_fraction={test_fraction} of {len(order)} images in {path} leaves no test '
                        f'images')
    train, val = _split_train_val(Subset(data, order[n_test:]), seed, val_fraction)
    return _capped(Splits(train=train, val=val, test=Subset(data, order[:n_test]), num_classes=len(data.classes)),
                   subset, seed)


#: The largest seed (Lightning's ``seed_everything`` range, so one seed can serve both).
MAX_SEED = 2**32 - 1

#: The ``data.name`` values of a config and what loads them.
DATASETS: Sequence[str] = ('digits', 'cifar10', 'cifar100', 'image_folder')


def load_splits(name: str, *, root: str | None = None, seed: int = 0, val_fraction: float = 0.5,
                subset: int | None = None, image_size: int = 32, grayscale: bool = False) -> Splits:
    """The splits of dataset ``name`` (one of :data:`DATASETS`); ``root`` is the local folder of the files.

    ``val_fraction``: the share of the training examples that trains the architecture (val); the rest trains the
    weights. ``subset``: keep at most this many examples (a random choice fixed by ``seed``) in each of train, val
    and test, for quick runs and tests.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise DataError(f'data error: data.seed must be an integer in [0, {MAX_SEED}], got {brief(seed)}')
    if name == 'digits':
        return _capped(digits_splits(seed, val_fraction=val_fraction), subset, seed)
    if name not in DATASETS:
        raise DataError(f'data error: unknown dataset {brief(name)}; expected one of {", ".join(DATASETS)}')
    if root is None:
        raise DataError(f'data error: dataset {name!r} needs data.root, the local folder that holds its files')
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise DataError(f'data error: data.root must be the path of a folder, got {brief(root)}')
    if name in ('cifar10', 'cifar100'):
        return cifar_splits(root, 10 if name == 'cifar10' else 100, seed=seed, val_fraction=val_fraction,
                            subset=subset)
    return image_folder_splits(root, image_size=image_size, seed=seed, val_fraction=val_fraction,
                               grayscale=grayscale, subset=subset)
