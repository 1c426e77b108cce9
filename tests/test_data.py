"""Data loading: CIFAR-10/100 from files in the official python format (written here), image folders, digits."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from nni_idarts.data import CIFAR_STATS, DataError, cifar_files, load_splits, read_cifar_pickle


def python2_pickle(doc: dict) -> bytes:
    """``doc`` pickled as the official CIFAR files are: by Python 2's cPickle (protocol 2) with numpy 1, so byte
    strings are Python 2 ``str`` (opcodes U/T) and arrays are rebuilt by ``numpy.core.multiarray._reconstruct``.
    Values: str, list of int or str, or a 2-d uint8 array."""
    def string(b: bytes) -> bytes:
        return b'U' + bytes([len(b)]) + b if len(b) < 256 else b'T' + struct.pack('<i', len(b)) + b

    def integer(v: int) -> bytes:
        return b'K' + bytes([v]) if 0 <= v < 256 else b'M' + struct.pack('<H', v) if 0 <= v < 65536 else \
            b'J' + struct.pack('<i', v)

    def value(v) -> bytes:
        if isinstance(v, str):
            return string(v.encode('latin1'))
        if isinstance(v, int):
            return integer(v)
        if isinstance(v, list):
            return b']' + (b'(' + b''.join(value(x) for x in v) + b'e' if v else b'')
        assert isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 2
        dtype = b'cnumpy\ndtype\n' + string(b'u1') + b'K\x00K\x01\x87R(K\x03' + string(b'|') + \
            b'NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb'
        return (b'cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85' + string(b'b') + b'\x87R'
                + b'(K\x01' + integer(v.shape[0]) + integer(v.shape[1]) + b'\x86' + dtype + b'\x89'
                + string(v.tobytes()) + b'tb')

    return b'\x80\x02}(' + b''.join(string(k.encode()) + value(v) for k, v in doc.items()) + b'u.'


def write_cifar(root, num_classes: int, per_file: int = 6, seed: int = 0, python2: bool = False) -> dict:
    """Write a small CIFAR-``num_classes`` copy in the official pickle format (by Python 3's pickle, or byte for byte
    as Python 2 wrote the official files); return the arrays written."""
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
            doc = {'data': data, label_key: labels, 'batch_label': f'batch {name}',
                   'filenames': [f'img{i}.png' for i in range(per_file)]}
            written[name] = doc
        (root / folder / name).write_bytes(python2_pickle(doc) if python2 else pickle.dumps(doc))
    return written


def test_python2_pickle_is_what_numpy_reads():
    """The writer above is right: plain pickle (encoding latin1, as torchvision reads CIFAR) rebuilds the dict."""
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    raw = python2_pickle({'data': data, 'labels': [3, 300], 'batch_label': 'b'})
    assert raw.startswith(b'\x80\x02}(U\x04datacnumpy.core.multiarray\n_reconstruct\n')
    doc = pickle.loads(raw, encoding='latin1')
    assert np.array_equal(doc['data'], data) and doc['labels'] == [3, 300] and doc['batch_label'] == 'b'


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_cifar_unpickler_reads_numpy_2_pickles(tmp_path, protocol):
    data = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
    (tmp_path / 'batch').write_bytes(pickle.dumps({'data': data, 'labels': [0, 1, 2, 3]}, protocol=protocol))
    doc = read_cifar_pickle(tmp_path / 'batch')
    assert doc['data'].dtype == np.uint8 and np.array_equal(doc['data'], data) and doc['labels'] == [0, 1, 2, 3]


@pytest.mark.parametrize('num_classes, python2', [(10, False), (100, False), (10, True), (100, True)])
def test_cifar_from_local_files(tmp_path, num_classes, python2):
    written = write_cifar(tmp_path, num_classes, python2=python2)
    splits = load_splits(f'cifar{num_classes}', root=str(tmp_path), seed=0)
    train_files = [n for n in written if n not in ('test_batch', 'test')]
    assert len(splits.train) + len(splits.val) == 6 * len(train_files)
    assert len(splits.train) == len(splits.val) == 3 * len(train_files)  # val_fraction 0.5
    assert len(splits.test) == 6 and splits.num_classes == num_classes
    assert splits.train[0][0].shape == splits.test[0][0].shape == (3, 32, 32)

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


def test_digits_split_sizes_and_val_fraction():
    default = load_splits('digits', seed=0)
    assert (len(default.train), len(default.val), len(default.test)) == (719, 719, 359)
    quarter = load_splits('digits', seed=0, val_fraction=0.25)
    assert (len(quarter.train), len(quarter.val), len(quarter.test)) == (1078, 360, 359)  # 1438 * 0.25 = 359.5 -> 360
    # the test part does not depend on val_fraction: a search and its retraining may use different fractions
    assert torch.equal(default.test.tensors[0], quarter.test.tensors[0])
    # the same pool of 1438 non-test digits, split differently
    def pool(splits):
        rows = torch.cat([splits.train.tensors[0], splits.val.tensors[0]]).flatten(1)
        return torch.unique(rows, dim=0, return_counts=True)
    assert all(torch.equal(a, b) for a, b in zip(pool(default), pool(quarter)))
    with pytest.raises(DataError, match='data.val_fraction must be a number strictly between 0 and 1, got 1.5'):
        load_splits('digits', val_fraction=1.5)
