"""Bad data files: each is refused at load time with one short DataError line naming the file; a crafted CIFAR
pickle runs no code. (The files loaded successfully, and their exact sizes, are in test_data.py.)"""

from __future__ import annotations

import copyreg
import io
import json
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from nni_idarts.data import DataError, cifar_files, load_splits, read_cifar_pickle

from test_data import python2_pickle, write_cifar


def refused(match: str, name: str, **kwargs) -> str:
    """The one-line DataError message of ``load_splits(name, **kwargs)``; it must contain ``match``."""
    with pytest.raises(DataError) as error:
        load_splits(name, **kwargs)
    message = str(error.value)
    assert '\n' not in message and len(message) < 400, message
    assert match in message, message
    return message


# ----- code execution: CIFAR batches are pickles, and a pickle can call anything it names -----

class MakeDir:
    """A harmless payload: unpickling it with plain pickle creates the folder ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def payloads(marker) -> dict[str, bytes]:
    """Pickles that create ``marker`` when plain ``pickle.loads`` reads them, hidden in several places."""
    data = np.zeros((2, 3072), dtype=np.uint8)
    return {
        'whole file': pickle.dumps(MakeDir(marker)),
        'in data': pickle.dumps({'data': MakeDir(marker), 'labels': [0, 1]}),
        'in labels': pickle.dumps({'data': data, 'labels': [0, MakeDir(marker)]}),
        'protocol 0': pickle.dumps({'data': data, 'labels': [0, MakeDir(marker)]}, protocol=0),
        'protocol 2': pickle.dumps({'data': data, 'labels': [0, MakeDir(marker)]}, protocol=2),
        # numpy's own code-running helper, in case a loader trusts everything under numpy
        'numpy gadget': b'\x80\x02cnumpy.testing._private.utils\nrunstring\n' + pickle.dumps(
            f'import os; os.mkdir({str(marker)!r})', protocol=2)[2:-1] + b'}\x86R.',
        # builtins.eval on protocol 4's STACK_GLOBAL
        'eval': b'\x80\x04\x8c\x08builtins\x8c\x04eval\x93' + pickle.dumps(
            f'__import__("os").mkdir({str(marker)!r})', protocol=2)[2:-1] + b'\x85R.',
    }


@pytest.mark.parametrize('where', ['whole file', 'in data', 'in labels', 'protocol 0', 'protocol 2', 'numpy gadget',
                                   'eval'])
def test_crafted_cifar_pickle_runs_no_code(tmp_path, where):
    marker = tmp_path / 'marker'
    raw = payloads(marker)[where]
    pickle.loads(raw)  # the payload is real: plain pickle runs it
    assert marker.is_dir()
    marker.rmdir()

    write_cifar(tmp_path, 10)
    batch = tmp_path / 'cifar-10-batches-py' / 'data_batch_1'
    batch.write_bytes(raw)
    message = refused('is not a CIFAR python batch', 'cifar10', root=str(tmp_path))
    assert str(batch) in message and 'refused global' in message
    assert not marker.exists()


@pytest.mark.parametrize('file', ['test_batch', 'batches.meta'])
def test_payload_in_the_test_batch_or_meta_file(tmp_path, file):
    marker = tmp_path / 'marker'
    write_cifar(tmp_path, 10)
    (tmp_path / 'cifar-10-batches-py' / file).write_bytes(payloads(marker)['in labels'])
    assert str(tmp_path / 'cifar-10-batches-py' / file) in refused('refused global', 'cifar10', root=str(tmp_path))
    assert not marker.exists()


def test_payload_through_the_extension_registry(tmp_path):
    """EXT opcodes name a global by a registered code; the unpickler still asks find_class for it."""
    marker = tmp_path / 'marker'
    copyreg.add_extension('posix', 'mkdir', 0xf00)
    try:
        raw = pickle.dumps({'data': MakeDir(marker)}, protocol=2)
        assert b'posix' not in raw
        (tmp_path / 'batch').write_bytes(raw)
        with pytest.raises(DataError, match="refused global 'posix.mkdir'"):
            read_cifar_pickle(tmp_path / 'batch')
    finally:
        copyreg.remove_extension('posix', 'mkdir', 0xf00)
    assert not marker.exists()


def test_numpy_globals_cannot_allocate_what_the_file_asks(tmp_path):
    """numpy.ndarray itself cannot be instantiated by a pickle (NEWOBJ), _reconstruct takes only numpy's (0,), and
    the allowed globals cannot be changed (BUILD)."""
    huge = pickle.dumps((1 << 40,), protocol=2)[2:-1]
    newobj = b'\x80\x02cnumpy\nndarray\n' + huge + b'\x81.'
    reconstruct = b'\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n' + huge + b'U\x01b\x87R.'
    # BUILD on an allowed global (to change it for later loads): refused, the globals have no state
    build = b'\x80\x02cnumpy\ndtype\n}U\x04evil\x88sb.'
    slots = b'\x80\x02cnumpy.core.multiarray\n_reconstruct\nN}U\x08__call__\x88s\x86b.'
    for raw in (newobj, reconstruct, build, slots):
        (tmp_path / 'batch').write_bytes(raw)
        with pytest.raises(DataError, match='is not a CIFAR python batch'):
            read_cifar_pickle(tmp_path / 'batch')


# ----- CIFAR: shapes, types, label counts and ranges checked at load time -----

def write_batch(tmp_path, num_classes: int, doc, file: str | None = None, python2: bool = False):
    """A valid CIFAR copy in which one batch file holds ``doc`` instead; the path of that file."""
    write_cifar(tmp_path, num_classes)
    folder, names = cifar_files(num_classes)
    path = tmp_path / folder / (file or names[0])
    path.write_bytes(python2_pickle(doc) if python2 else pickle.dumps(doc))
    return path


def images(n: int, width: int = 3072, dtype=np.uint8):
    return np.zeros((n, width), dtype=dtype)


@pytest.mark.parametrize('doc, match', [
    ({'data': images(4, 3071), 'labels': [0] * 4}, "'data' must be a uint8 array of shape (N, 3072), got uint8 array "
                                                   "of shape (4, 3071)"),
    ({'data': np.zeros((4, 3, 32, 32), np.uint8), 'labels': [0] * 4}, 'got uint8 array of shape (4, 3, 32, 32)'),
    ({'data': images(4, dtype=np.float32), 'labels': [0] * 4}, 'got float32 array of shape (4, 3072)'),
    ({'data': images(4, dtype=np.int64), 'labels': [0] * 4}, 'got int64 array'),
    ({'data': np.array([None] * 4, dtype=object), 'labels': [0] * 4}, 'got object array of shape (4,)'),
    ({'data': [[0] * 3072] * 4, 'labels': [0] * 4}, 'got list'),
    ({'data': images(4), 'labels': [0] * 3}, "3 'labels' for 4 images"),
    ({'data': images(4), 'labels': [0] * 5}, "5 'labels' for 4 images"),
    ({'data': images(4), 'labels': [0, 1, 10, 2]}, 'label 10 is not in [0, 10) (1 labels out of range)'),
    ({'data': images(4), 'labels': [-1, 1, 2, 2]}, 'label -1 is not in [0, 10)'),
    ({'data': images(4), 'labels': [0.0, 1, 2, 3]}, "'labels' must be a list of integers, got [0.0, 1, 2, 3]"),
    ({'data': images(4), 'labels': [True, 1, 2, 3]}, "'labels' must be a list of integers"),
    ({'data': images(4), 'labels': 'abcd'}, "'labels' must be a list of integers, got 'abcd'"),
    ({'data': images(4), 'labels': list(range(200)) * 100}, "20000 'labels' for 4 images"),
    ({'data': images(0), 'labels': []}, "'data' holds no images"),
    ({'data': images(4)}, "has no 'labels' entry (keys: ['data'])"),
    ({'labels': [0]}, "has no 'data' entry"),
])
def test_wrong_cifar10_batch(tmp_path, doc, match):
    path = write_batch(tmp_path, 10, doc)
    assert str(path) in refused(match, 'cifar10', root=str(tmp_path))


def test_wrong_cifar_batch_in_the_official_format(tmp_path):
    path = write_batch(tmp_path, 100, {'data': images(3), 'fine_labels': [5, 100, 7]}, file='test', python2=True)
    assert str(path) in refused('label 100 is not in [0, 100)', 'cifar100', root=str(tmp_path))


def test_labels_as_an_array_are_checked_too(tmp_path):
    write_batch(tmp_path, 10, {'data': images(3), 'labels': np.array([1, 2, 3])})
    splits = load_splits('cifar10', root=str(tmp_path))
    assert (len(splits.train), len(splits.val)) == (13, 14)  # 3 + 4 x 6 examples, val_fraction 0.5 -> round(13.5)
    write_batch(tmp_path / 'b', 10, {'data': images(3), 'labels': np.array([1, 2, 30])})
    refused('label 30 is not in [0, 10)', 'cifar10', root=str(tmp_path / 'b'))


@pytest.mark.parametrize('content, match', [
    (b'', 'Ran out of input'),
    (b'\x00\x01garbage bytes', 'is not a CIFAR python batch'),
    (pickle.dumps([1, 2, 3]), 'must hold a pickled dict (a CIFAR python batch), got list'),
    (pickle.dumps('text' * 10000), 'got str'),
    ('half', 'is not a CIFAR python batch'),  # a truncated copy of a valid batch
])
def test_unreadable_cifar_file(tmp_path, content, match):
    write_cifar(tmp_path, 10)
    path = tmp_path / 'cifar-10-batches-py' / 'data_batch_2'
    if content == 'half':
        content = path.read_bytes()[:len(path.read_bytes()) // 2]
    path.write_bytes(content)
    assert str(path) in refused(match, 'cifar10', root=str(tmp_path))


@pytest.mark.parametrize('doc, match', [
    ({'label_names': ['a'] * 9}, "'label_names' must list the 10 class names, got ['a', 'a'"),
    ({'names': ['a'] * 10}, "'label_names' must list the 10 class names, got None"),
])
def test_wrong_cifar_meta(tmp_path, doc, match):
    path = write_batch(tmp_path, 10, doc, file='batches.meta')
    assert str(path) in refused(match, 'cifar10', root=str(tmp_path))


def test_cifar_batch_that_is_a_folder_is_missing(tmp_path):
    write_cifar(tmp_path, 10)
    path = tmp_path / 'cifar-10-batches-py' / 'data_batch_4'
    path.unlink()
    path.mkdir()
    refused('CIFAR-10 files missing in', 'cifar10', root=str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason='root reads files whatever their mode')
def test_unreadable_cifar_permissions(tmp_path):
    write_cifar(tmp_path, 10)
    path = tmp_path / 'cifar-10-batches-py' / 'data_batch_1'
    path.chmod(0)
    assert str(path) in refused('cannot read', 'cifar10', root=str(tmp_path))


# ----- fractions and sizes -----

@pytest.mark.parametrize('value', [0, 1, -0.5, 1.5, float('nan'), float('inf'), '0.5', True, None])
@pytest.mark.parametrize('name', ['digits', 'cifar10', 'image_folder'])
def test_val_fraction_out_of_range(tmp_path, name, value):
    if name == 'cifar10':
        write_cifar(tmp_path, 10)
    elif name == 'image_folder':
        write_images(tmp_path)
    message = refused('data.val_fraction must be a number strictly between 0 and 1, got', name, root=str(tmp_path),
                      val_fraction=value)
    assert message.endswith(repr(value))


@pytest.mark.parametrize('value, match', [(0.0001, 'leaves an empty train or val part of 1438'),
                                          (0.9999, 'leaves an empty train or val part of 1438')])
def test_val_fraction_that_empties_a_part(value, match):
    refused(match, 'digits', val_fraction=value)


@pytest.mark.parametrize('value', [0, -3, 2.5, 'all', True])
def test_subset_out_of_range(value):
    refused(f'data.subset must be null or an integer of at least 1, got {value!r}', 'digits', subset=value)


@pytest.mark.parametrize('value', [-1, 2**32, 2**64, 1.5, None, '3', True])
def test_seed_out_of_range(value):
    refused(f'data.seed must be an integer in [0, 4294967295], got {value!r}', 'digits', seed=value)


@pytest.mark.parametrize('value', [5, '', ['a']])
def test_root_of_the_wrong_type(value):
    refused(f'data.root must be the path of a folder, got {value!r}', 'cifar10', root=value)


def test_unknown_dataset_name_is_bounded():
    message = refused('unknown dataset', 'x' * 10_000)
    assert '(10000 chars)' in message  # the value's length


# ----- image folders: every image decoded once before training -----

def write_images(root, classes=('cat', 'dog', 'eel'), per_class: int = 4, size=(12, 10), fmt: str = 'png'):
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f'{i}.{fmt}')


def encoded(fmt: str, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize('file, content, match', [
    ('bad.png', lambda: encoded('PNG')[:-300], 'cannot be read'),    # truncated PNG
    ('bad.jpg', lambda: encoded('JPEG')[:-300], 'cannot be read'),   # truncated JPEG (verify() would pass it)
    ('bad.png', lambda: encoded('PNG')[:40], 'cannot be read'),
    ('bad.png', lambda: b'', 'not an image format PIL knows'),
    ('bad.jpeg', lambda: b'this is a text file, not a picture\n' * 20, 'not an image format PIL knows'),
    ('bad.png', lambda: encoded('PNG')[:100] + b'\x00' * 500 + encoded('PNG')[600:], 'cannot be read'),  # corrupt
])
@pytest.mark.parametrize('cls', ['cat', 'eel'])
def test_bad_image_named_before_training(tmp_path, file, content, match, cls):
    write_images(tmp_path)
    path = tmp_path / cls / file
    path.write_bytes(content())
    message = refused(match, 'image_folder', root=str(tmp_path), image_size=8)
    assert str(path) in message


def test_bad_test_image_found_at_load_time(tmp_path):
    """The test images are checked too: the one bad image is in the held-out test part (whatever the seed does)."""
    import torch

    write_images(tmp_path)
    good = load_splits('image_folder', root=str(tmp_path), image_size=8, seed=0)
    test_files = [good.test.dataset.samples[i][0] for i in good.test.indices]
    assert len(test_files) == 2
    with open(test_files[0], 'r+b') as f:
        f.truncate(80)
    assert test_files[0] in refused('cannot be read', 'image_folder', root=str(tmp_path), image_size=8, seed=0)
    assert torch.is_tensor(good.train[0][0])


def test_decompression_bomb(tmp_path, monkeypatch):
    write_images(tmp_path, size=(30, 30))  # 900 pixels
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 2000)
    assert load_splits('image_folder', root=str(tmp_path), image_size=8).num_classes == 3
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / 'dog' / 'warned.png')  # 2500 > limit: warning
    message = refused('warned.png has 2500 pixels, more than PIL.Image.MAX_IMAGE_PIXELS = 2000 (a guard against '
                      'decompression bombs)', 'image_folder', root=str(tmp_path), image_size=8)
    assert str(tmp_path / 'dog' / 'warned.png') in message
    (tmp_path / 'dog' / 'warned.png').unlink()
    Image.fromarray(np.zeros((70, 70, 3), np.uint8)).save(tmp_path / 'dog' / 'bomb.png')  # 4900 > 2 x limit: error
    assert str(tmp_path / 'dog' / 'bomb.png') in refused('has 4900 pixels, more than', 'image_folder',
                                                          root=str(tmp_path), image_size=8)


def test_huge_png_header_is_refused_without_decoding(tmp_path):
    """A 5 kB PNG that claims 100000 x 100000 pixels (with the real limit): refused at open, nothing allocated."""
    write_images(tmp_path)
    png = encoded('PNG', size=(4, 4))
    ihdr = png.index(b'IHDR')
    header = b'IHDR' + struct.pack('>II', 100_000, 100_000) + png[ihdr + 12:ihdr + 17]
    import zlib
    png = png[:ihdr] + header + struct.pack('>I', zlib.crc32(header)) + png[ihdr + 21:]
    (tmp_path / 'dog' / 'huge.png').write_bytes(png)
    refused('huge.png has 10000000000 pixels, more than PIL.Image.MAX_IMAGE_PIXELS = 89478485', 'image_folder',
            root=str(tmp_path))


@pytest.mark.parametrize('layout, match', [
    (('cat',), "has 1 class folder(s) ['cat']; a classifier needs at least 2"),
    ((), 'has 0 class folder(s) []; a classifier needs at least 2'),
    (('cat', 'dog', 'empty'), 'has no images (1 empty class folders'),
    (('cat', 'dog', '.ipynb_checkpoints'), '.ipynb_checkpoints has no images'),
    (('cat', 'dog', 'notes'), 'notes has no images'),  # a class folder of files that are no images
])
def test_wrong_class_folders(tmp_path, layout, match):
    write_images(tmp_path, classes=[c for c in layout if c in ('cat', 'dog')])
    for cls in layout:
        (tmp_path / cls).mkdir(exist_ok=True)
    (tmp_path / 'README.txt').write_text('loose file at the top')
    if 'notes' in layout:
        (tmp_path / 'notes' / 'todo.txt').write_text('not an image')
    message = refused(match, 'image_folder', root=str(tmp_path))
    assert str(tmp_path) in message


@pytest.mark.parametrize('value', [0, -1, 1025, 2.0, 'big', True])
def test_image_size_out_of_range(tmp_path, value):
    write_images(tmp_path)
    refused(f'data.image_size must be an integer in [1, 1024], got {value!r}', 'image_folder', root=str(tmp_path),
            image_size=value)


def test_image_folder_root_is_a_file(tmp_path):
    (tmp_path / 'file').write_text('x')
    refused('is not a folder', 'image_folder', root=str(tmp_path / 'file'))
    refused('does not exist', 'image_folder', root=str(tmp_path / 'nope'))


# ----- through the command line: exit code 2 and one line, before any training -----

@pytest.mark.parametrize('dataset', ['cifar10', 'image_folder'])
def test_cli_refuses_bad_data_in_one_line(tmp_path, capsys, dataset):
    from nni_idarts.cli import EXIT_BAD_INPUT, main
    from test_cli import write_config

    marker = tmp_path / 'marker'
    if dataset == 'cifar10':
        write_cifar(tmp_path / 'data', 10)
        bad = tmp_path / 'data' / 'cifar-10-batches-py' / 'data_batch_3'
        bad.write_bytes(payloads(marker)['in labels'])
    else:
        write_images(tmp_path / 'data')
        bad = tmp_path / 'data' / 'dog' / '2.png'
        bad.write_bytes(bad.read_bytes()[:-50])
    config = write_config(tmp_path, data={'name': dataset, 'root': str(tmp_path / 'data'), 'subset': None})
    for command in (['search', str(config)], ['retrain', str(config), '--arch', str(tmp_path / 'arch.json')]):
        (tmp_path / 'arch.json').write_text(json.dumps({f'edge_{e}': 'skip_connect' for e in ('0_1', '0_2', '1_2')}))
        assert main(command) == EXIT_BAD_INPUT
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith(f'nni-idarts {command[0]}: data error: ') and str(bad) in err, err
        assert '\n' not in err and 'Traceback' not in err
    assert not marker.exists()
