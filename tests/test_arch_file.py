"""Architecture files (``arch.json``): every malformed file is one ArchError line naming the file (and through the
command line, exit code 2 and one line); values repeated in messages are bounded; what loads also formats."""

from __future__ import annotations

import json

import pytest

from nni_idarts.arch import ArchError, MAX_ARCH_FILE_BYTES, check_arch, format_arch, load_arch_file, save_arch
from nni_idarts.cli import EXIT_BAD_INPUT, main

GOOD = {'edge_0_1': 'conv_3x3', 'edge_0_2': 'skip_connect', 'edge_1_2': 'avg_pool_3x3'}
PROBS = {'edge_0_1': {'conv_3x3': 0.6, 'none': 0.4}}


def refused(path, match: str) -> str:
    with pytest.raises(ArchError) as error:
        load_arch_file(path)
    message = str(error.value)
    assert '\n' not in message and len(message) < 400, message
    assert message.startswith('arch error: ') and str(path) in message and match in message, message
    return message


def write(tmp_path, content) -> str:
    path = tmp_path / 'arch.json'
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return str(path)


def test_good_files_load(tmp_path):
    save_arch(tmp_path / 'a.json', GOOD, space={'name': 'digits', 'channels': 4}, probs=PROBS)
    doc = load_arch_file(tmp_path / 'a.json')
    assert doc == {'arch': GOOD, 'space': {'name': 'digits', 'channels': 4}, 'probs': PROBS}
    assert load_arch_file(write(tmp_path, GOOD)) == {'arch': GOOD, 'space': None, 'probs': None}  # NNI's bare dict
    # a byte-order mark, as some Windows editors write it, is skipped
    assert load_arch_file(write(tmp_path, b'\xef\xbb\xbf' + json.dumps({'arch': GOOD}).encode()))['arch'] == GOOD
    assert format_arch(doc['arch'], doc['probs']).splitlines() == [
        'edge 0 -> 1: conv_3x3  (p=0.60)', 'edge 0 -> 2: skip_connect', 'edge 1 -> 2: avg_pool_3x3']


@pytest.mark.parametrize('content, match', [
    (b'{"arch": {"edge_0_1": "conv\xe9"}}', 'is not UTF-8 text (byte 0xe9 at offset 27)'),  # Latin-1
    ('{"edge_0_1": "conv"}'.encode('utf-16'), 'is not UTF-8 text (byte 0xff at offset 0)'),
    (b'PK\x03\x04\x14\x00\x00\x00\x08\x00' + bytes(range(256)), 'is not UTF-8 text'),  # e.g. a checkpoint (zip)
    (b'', 'is not JSON (line 1: Expecting value)'),
    ('{"arch": {"edge_0_1": }', 'is not JSON (line 1: Expecting value)'),
    ('{"arch": 1' + '0' * 5000 + '}', 'is not readable JSON: '),  # an integer longer than Python converts
    ('[' * 200_000 + ']' * 200_000, 'is not'),                   # nesting deeper than the parser recurses
    ('[1, 2]', 'must hold a JSON object, got list [1, 2]'),
    ('"edge_0_1"', "must hold a JSON object, got str 'edge_0_1'"),
    ('null', 'must hold a JSON object, got NoneType None'),
    ('3.5', 'must hold a JSON object, got float 3.5'),
    ({}, "'arch' must be a non-empty object {label: choice}, got dict {}"),
    ({'arch': {}}, "'arch' must be a non-empty object {label: choice}, got dict {}"),
    ({'arch': ['conv_3x3', 'skip']}, "'arch' must be a non-empty object {label: choice}, got list ['conv_3x3',"),
    ({'arch': 'conv_3x3'}, "got str 'conv_3x3'"),
    ({'arch': None, 'space': {'name': 'digits'}}, 'got NoneType None'),
    ({'arch': GOOD, 'prob': PROBS}, "has the key 'prob'; a file with 'arch' may have only 'space' and 'probs'"),
    ({'space': {'name': 'digits'}, 'edge_0_1': 'conv_3x3'}, "has 'space' or 'probs' but no 'arch'"),
    ({'arch': GOOD, 'space': ['digits']}, "'space' must be an object {name: ..., <size knobs>}, got list ['digits']"),
    ({'arch': GOOD, 'space': 'digits'}, "'space' must be an object {name: ..., <size knobs>}, got str 'digits'"),
    ({'arch': GOOD, 'space': {'name': 5}}, "'space' has a 'name' that is not a string: 5"),
    ({'arch': GOOD, 'space': {'name': 'digits', 'channels': [4]}},
     "'space' knob 'channels' must be a number, string, boolean or null, got list [4]"),
    ({'arch': GOOD, 'probs': [0.5, 0.5]}, "'probs' must be an object {label: {choice: probability}}, got list"),
    ({'arch': GOOD, 'probs': 'high'}, "'probs' must be an object {label: {choice: probability}}, got str 'high'"),
    ({'arch': GOOD, 'probs': {'edge_0_1': [0.6, 0.4]}},
     "'probs' of 'edge_0_1' must be an object {choice: probability}, got list [0.6, 0.4]"),
    ({'arch': GOOD, 'probs': {'edge_0_1': 0.6}}, "must be an object {choice: probability}, got float 0.6"),
    ({'arch': GOOD, 'probs': {'edge_0_1': {'conv_3x3': 'high'}}},
     "'probs' of 'edge_0_1', choice 'conv_3x3': a probability must be a number in [0, 1], got 'high'"),
    ({'arch': GOOD, 'probs': {'edge_0_1': {'conv_3x3': None}}}, 'a probability must be a number in [0, 1], got None'),
    ({'arch': GOOD, 'probs': {'edge_0_1': {'conv_3x3': True}}}, 'a probability must be a number in [0, 1], got True'),
    ({'arch': GOOD, 'probs': {'edge_0_1': {'conv_3x3': 1.5}}}, 'a probability must be a number in [0, 1], got 1.5'),
    ({'arch': GOOD, 'probs': {'edge_0_1': {'conv_3x3': -0.1}}}, 'got -0.1'),
    ('{"arch": {"edge_0_1": "conv_3x3"}, "probs": {"edge_0_1": {"conv_3x3": NaN}}}', 'got nan'),
    ('{"arch": {"edge_0_1": "conv_3x3"}, "probs": {"edge_0_1": {"conv_3x3": Infinity}}}', 'got inf'),
    ({'arch': GOOD, 'probs': {'x' * 5000: {'conv_3x3': 2}}}, '... (5000 chars)'),  # a long label, bounded
    ({'arch': GOOD, 'space': {'name': 'digits', 'channels': {'deep': 'x' * 5000}}}, 'chars)'),
])
def test_malformed_file_is_one_line(tmp_path, content, match):
    refused(write(tmp_path, content), match)


def test_files_that_are_no_arch_file(tmp_path):
    refused(tmp_path / 'missing.json', 'cannot read')
    refused(tmp_path, 'is not a regular file')
    with pytest.raises(ArchError, match='/dev/null is not a regular file'):
        load_arch_file('/dev/null')  # a device (read like a file, /dev/zero would never end)
    big = tmp_path / 'big.json'
    big.write_bytes(b' ' * (MAX_ARCH_FILE_BYTES + 1))
    refused(big, f'has {MAX_ARCH_FILE_BYTES + 1} bytes, too many for an architecture file')


@pytest.fixture(scope='module')
def digits_space():
    from search_spaces import build_space

    return build_space('digits', in_channels=1, num_classes=10, channels=4, num_cells=1)


@pytest.mark.parametrize('arch, match', [
    ({**GOOD, 'edge_1_2': ['conv_3x3']}, "'edge_1_2' = ['conv_3x3'] is not a choice of space 'digits': "),
    ({**GOOD, 'edge_1_2': {'op': 'conv_3x3'}}, "'edge_1_2' = {'op': 'conv_3x3'} is not a choice of space 'digits'"),
    ({**GOOD, 'edge_1_2': None}, "'edge_1_2' = None is not a choice"),
    ({**GOOD, 'edge_1_2': 3}, "'edge_1_2' = 3 is not a choice"),
    ({**GOOD, 'edge_1_2': 'c' * 10_000}, "... (10000 chars) is not a choice of space 'digits'"),
    ({**GOOD, 'e' * 10_000: 'conv_3x3'}, '... (10000 chars), which the space does not have (0 missing, 1 unknown'),
    ({'edge_0_1': 'conv_3x3'}, "misses 'edge_0_2' (2 missing, 0 unknown labels)"),
    (['conv_3x3'], "an architecture is a {label: choice} dict, got list ['conv_3x3']"),
])
def test_check_arch_against_the_space(digits_space, arch, match):
    with pytest.raises(ArchError) as error:
        check_arch(arch, digits_space, 'digits')
    message = str(error.value)
    assert '\n' not in message and len(message) < 400 and match in message, message


@pytest.mark.parametrize('arch', [
    GOOD, {'edge_0_1': ['conv', 1]}, {'edge_0_1': {'a': [1, {'b': None}]}}, {'edge_0_1': None}, {'edge_0_1': 1.5},
    {'normal/op_2_0': 'sep_conv_3x3', 'normal/input_2_0': [0], 'normal/op_2_1': 'skip', 'normal/input_2_1': 'x'},
    {'normal/op_2_0': 'sep_conv_3x3'}, {'node_1_op': 'conv', 'node_1_inputs': 'x'}, {'node_1_op': 'conv',
                                                                                      'node_1_inputs': [0, 1]},
    {'cell/width': 8, '': 'x', '/': 'y', 'a/b/c': [[1]]},
])
def test_format_arch_shows_any_loaded_file(tmp_path, arch):
    """Whatever passes load_arch_file can be shown (``show`` prints it before any space is built)."""
    probs = {label: {'conv': 0.5, str(value): 1.0, 'x': 0} for label, value in arch.items()}
    doc = load_arch_file(write(tmp_path, {'arch': arch, 'probs': probs}))
    lines = format_arch(doc['arch'], doc['probs']).splitlines()
    assert lines and all(line.strip() for line in lines)
    assert format_arch(doc['arch'], None)


@pytest.mark.parametrize('content, match', [
    (b'\xff\xfe{', 'is not UTF-8 text'),
    ({'arch': GOOD, 'space': ['digits']}, "'space' must be an object"),
    ({'arch': GOOD, 'space': 'digits'}, "'space' must be an object"),
    ({'arch': GOOD, 'probs': {'edge_0_1': {'conv_3x3': 'high'}}}, 'a probability must be a number in [0, 1]'),
    ({'arch': ['conv_3x3']}, "'arch' must be a non-empty object"),
])
@pytest.mark.parametrize('command', ['show', 'retrain'])
def test_cli_show_and_retrain_refuse_in_one_line(tmp_path, capsys, content, match, command):
    from test_cli import write_config

    path = write(tmp_path, content)
    args = ['show', path] if command == 'show' else ['retrain', str(write_config(tmp_path)), '--arch', path]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'nni-idarts {command}: arch error: {path}: ') or err.startswith(
        f'nni-idarts {command}: arch error: {path} is not UTF-8'), err
    assert match in err and '\n' not in err and 'Traceback' not in err


def test_cli_retrain_refuses_a_wrong_choice_type_in_one_line(tmp_path, capsys):
    from test_cli import write_config

    path = write(tmp_path, {'arch': {**GOOD, 'edge_1_2': {'op': 'x' * 5000}}, 'space': {'name': 'digits'}})
    assert main(['retrain', str(write_config(tmp_path)), '--arch', path]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "'edge_1_2' = {'op': 'xxx" in err and 'is not a choice of space' in err and '\n' not in err
    assert len(err) < 400
