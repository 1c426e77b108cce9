"""Data loading: CIFAR-10/100 from files in the official python format (written here), image folders, digits."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from nni_idarts.data import CIFAR_STATS, DataError, cifar_files, load_splits


def write_cifar(root, num_classes: int, per_file: int = 6, seed: int = 0) -> dict:
    """Write a small CIFAR-``num_classes`` copy in the official pickle format; return the arrays written."""
    rng = np.random.default_rng(seed)
    folder, names = cifar_files(num_classes)
    (root / folder).mkdir(parents=True)
    label_key = 'labels' if num_classes == 10 else 'fine_labels'
    written = {}
    for name in names:
        if name in ('batches.meta', 'meta'):
            key = 'label_names' if num_classes == 10 else 'fine_label_names'
            doc = {key: [f'class{i}' for i in range(num_classes)]}
        else:
            data = rng.integers(0, 256, size=(per_file, 3 * 32 * 32), dtype=np.uint8)
            labels = rng.integers(0, num_classes, size=per_file).tolist()
            doc = {'data': data, label_key: labels}
            written[name] = doc
        with open(root / folder / name, 'wb') as f:
            pickle.dump(doc, f)
    return written


@pytest.mark.parametrize('num_classes', [10, 100])
def test_cifar_from_local_files(tmp_path, num_classes):
    written = write_cifar(tmp_path, num_classes)
    splits = load_splits(f'cifar{num_classes}', root=str(tmp_path), seed=0)
    train_files = [n for n in written if n not in ('test_batch', 'test')]
    assert len(splits.train) + len(splits.val) == 6 * len(train_files)
    assert len(splits.train) == len(splits.val) == 3 * len(train_files)  # val_fraction 0.5
    assert len(splits.test) == 6 and splits.num_classes == num_classes

    # The first test image, normalised independently from the bytes written: CHW order, /255, (x - mean) / std.
    test_doc = written['test_batch' if num_classes == 10 else 'test']
    image, label = splits.test[0]
    expected = torch.tensor(test_doc['data'][0].reshape(3, 32, 32) / 255.0, dtype=torch.float32)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in CIFAR_STATS[num_classes])
    assert torch.allclose(image, (expected - mean) / std, atol=1e-5)
    assert label == test_doc['labels' if num_classes == 10 else 'fine_labels'][0]

    # train and val are disjoint parts of the training files
    assert set(splits.train.indices).isdisjoint(splits.val.indices)


def test_cifar_missing_files_names_folder_and_files(tmp_path):
    write_cifar(tmp_path, 10)
    (tmp_path / 'cifar-10-batches-py' / 'data_batch_3').unlink()
    (tmp_path / 'cifar-10-batches-py' / 'test_batch').unlink()
    with pytest.raises(DataError) as error:
        load_splits('cifar10', root=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / 'cifar-10-batches-py') in message
    assert 'data_batch_3' in message and 'test_batch' in message and 'data_batch_1' not in message
    assert '\n' not in message


def test_cifar_needs_root(tmp_path):
    with pytest.raises(DataError, match='data.root'):
        load_splits('cifar100')


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ('cat', 'dog', 'eel'):
        (tmp_path / cls).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f'{i}.png')
    splits = load_splits('image_folder', root=str(tmp_path), image_size=8, seed=1)
    assert splits.num_classes == 3
    assert len(splits.test) == 3 and len(splits.train) + len(splits.val) == 12  # test_fraction 0.2 of 15
    image, label = splits.train[0]
    assert image.shape == (3, 8, 8) and 0 <= label < 3
    gray = load_splits('image_folder', root=str(tmp_path), image_size=8, grayscale=True, subset=2)
    assert gray.train[0][0].shape == (1, 8, 8) and len(gray.train) == len(gray.test) == 2


def test_image_folder_missing(tmp_path):
    with pytest.raises(DataError, match='does not exist'):
        load_splits('image_folder', root=str(tmp_path / 'nope'))


def test_digits_subset_is_a_fixed_random_choice():
    a, b = load_splits('digits', subset=10, seed=3), load_splits('digits', subset=10, seed=3)
    assert len(a.train) == len(a.val) == len(a.test) == 10
    assert all(torch.equal(a.train[i][0], b.train[i][0]) for i in range(10))
