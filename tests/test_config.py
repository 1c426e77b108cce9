"""The one schema of every user parameter, shared by the YAML config and the NNI trial (fast: no training)."""

from __future__ import annotations

import re

import pytest
import yaml

from nni_idarts import config as config_module
from nni_idarts.config import (ConfigError, Range, config_from_dict, config_with_overrides, load_config, schema,
                               section_keys)
from nni_idarts.strategy import IDartsStrategy
from nni_idarts.trial import TRIAL_CONFIG, TrialParameterError, trial_config


def test_defaults_come_from_the_signatures_and_ranges_from_one_table():
    keys = schema('digits')
    assert keys['strategy.K'].default == 2 and keys['strategy.K'].range == Range(min=0, max=10_000)
    assert keys['search.batch_size'].default == 64 and keys['search.batch_size'].range.max == 65_536
    assert keys['space.channels'].default == 16 and keys['space.channels'].range.min == 1
    # Every range belongs to a key that exists in some space's schema (no stale entries).
    known = {name for space in config_module.SPACES for name in schema(space)}
    assert set(config_module.RANGES) <= known, set(config_module.RANGES) - known


def test_a_new_strategy_option_is_configurable_and_checked_without_touching_the_schema(monkeypatch):
    class Future(IDartsStrategy):
        def __init__(self, *, shrinkage: float = 0.0, gamma: float | str | None = None, **kwargs):
            super().__init__(**kwargs)

    monkeypatch.setattr(config_module, 'IDartsStrategy', Future)
    keys = section_keys('strategy')
    assert keys['shrinkage'].default == 0.0 and keys['shrinkage'].range == Range()
    assert config_from_dict({'strategy': {'shrinkage': 0.5, 'gamma': 'auto'}}).strategy['gamma'] == 'auto'
    # An unlisted number must still be finite, in YAML and from a tuner alike.
    with pytest.raises(ConfigError, match=r"'strategy.shrinkage' must be a finite number, got nan"):
        config_from_dict({'strategy': {'shrinkage': float('nan')}})
    with pytest.raises(ConfigError, match=r"'strategy.shrinkage' must be a finite number, got inf"):
        config_with_overrides({}, {'strategy.shrinkage': float('inf')})


@pytest.mark.parametrize('key, value, message', [
    ('search.batch_size', 0, "'search.batch_size' must be >= 1 and <= 65536, got 0"),
    ('search.batch_size', 10**9, "'search.batch_size' must be >= 1 and <= 65536, got 1000000000"),
    ('search.learning_rate', -0.1, "'search.learning_rate' must be > 0, got -0.1"),
    ('search.learning_rate', '5e-2', "got str '5e-2' (YAML reads 5e-2 as text: write 5.0e-2)"),
    ('search.seed', -1, "'search.seed' must be >= 0 and <= 4294967295, got -1"),
    ('search.seed', 2**64, "'search.seed' must be >= 0 and <= 4294967295, got 18446744073709551616"),
    ('space.channels', 0, "'space.channels' must be >= 1 and <= 1024, got 0"),
    ('space.channels', 10**6, "'space.channels' must be >= 1 and <= 1024"),
    ('search.epochs', 0, "'search.epochs' must be >= 1"),
    ('search.epochs', -1, "'search.epochs' must be >= 1"),
    ('retrain.epochs', 0, "'retrain.epochs' must be >= 1"),
    ('retrain.epochs', -1, "'retrain.epochs' must be >= 1"),
    ('search.checkpoint_every_n_steps', 0, "'search.checkpoint_every_n_steps' must be >= 1, got 0"),
    ('strategy.gradient_clip_val', -1, "'strategy.gradient_clip_val' must be > 0, got -1.0"),
    ('strategy.gamma', 0, "'strategy.gamma' must be > 0, got 0.0"),
    ('strategy.damping', -0.1, "'strategy.damping' must be >= 0, got -0.1"),
    ('search.learning_rate_min', -1e-3, "'search.learning_rate_min' must be >= 0, got -0.001"),
    ('search.nesterov', 1, "'search.nesterov' must be bool, got int 1"),
    ('strategy.warmup_epochs', 10, "'strategy.warmup_epochs' (10) must be less than 'search.epochs' (10)"),
    ('search.accelerator', 'tpu2', "'search.accelerator' must be one of auto, cpu, cuda, gpu, mps, tpu, got 'tpu2'"),
    ('retrain.weight_decay', -1e-4, "'retrain.weight_decay' must be >= 0, got -0.0001"),
    ('data.val_fraction', 1.5, "'data.val_fraction' must be > 0 and < 1, got 1.5"),
    ('data.subset', 0, "'data.subset' must be >= 1, got 0"),
    ('strategy.K', float('inf'), "'strategy.K' must be int, got float inf"),
    ('search.learning_rate', float('nan'), "'search.learning_rate' must be a finite number, got nan"),
])
def test_yaml_and_trial_refuse_the_same_values_with_the_same_line(key, value, message):
    section, _, name = key.partition('.')
    raw = {'search': {'epochs': 10}, section: {name: value}} if section != 'search' else {section: {
        'epochs': 10, name: value}}
    with pytest.raises(ConfigError) as from_yaml:
        config_from_dict(raw)
    overrides = {key: value, **({} if key == 'search.epochs' else {'search.epochs': 10})}
    with pytest.raises(TrialParameterError) as from_trial:
        trial_config(overrides)
    assert message in str(from_yaml.value)
    assert str(from_trial.value) == str(from_yaml.value)
    assert len(str(from_yaml.value)) < 300 and '\n' not in str(from_yaml.value)


@pytest.mark.parametrize('path', sorted(config_module.Path(__file__).parent.parent.glob('examples/configs/*.yaml')),
                         ids=lambda p: p.name)
def test_every_example_config_loads(path):
    config = load_config(path)
    assert config.search['learning_rate_min'] is None or config.search['learning_rate_min'] <= config.search['learning_rate']
    IDartsStrategy(**config.strategy)  # the strategy accepts what the schema let through


def test_the_annealed_learning_rate_must_not_end_above_its_start():
    message = re.escape("'search.learning_rate_min' (1.0) must not exceed 'search.learning_rate' (0.5)")
    with pytest.raises(ConfigError, match=message):
        config_from_dict({'search': {'learning_rate': 0.5, 'learning_rate_min': 1.0}})
    with pytest.raises(TrialParameterError, match=message):
        trial_config({'search.learning_rate': 0.5, 'search.learning_rate_min': 1.0})
    assert config_from_dict({'search': {'learning_rate_min': None}}).search['learning_rate_min'] is None  # constant


def test_values_both_accept():
    # The trial used to refuse weight_decay 0, which the command accepted; one schema, one answer.
    assert config_from_dict({'search': {'weight_decay': 0}}).search['weight_decay'] == 0.0
    assert trial_config({'search.weight_decay': 0}).search['weight_decay'] == 0.0
    # Tuners send integral floats for integers (quniform): accepted as ints; 3.5 is not an int.
    assert trial_config({'strategy.inner_steps': 4.0}).strategy['inner_steps'] == 4
    assert isinstance(config_from_dict({'search': {'batch_size': 16.0}}).search['batch_size'], int)


def test_output_dir_and_document_shape(tmp_path):
    with pytest.raises(ConfigError, match="'output_dir' is empty"):
        config_from_dict({'output_dir': ''})
    with pytest.raises(ConfigError, match="unknown key 'searches'"):
        config_from_dict({'searches': {}})


def test_yaml_file_problems_are_one_short_line(tmp_path):
    latin1 = tmp_path / 'latin1.yaml'
    latin1.write_bytes('output_dir: r\xe9sultats\n'.encode('latin-1'))
    with pytest.raises(ConfigError, match=r'is not UTF-8 text \(byte 0xe9 at offset 13\)'):
        load_config(latin1)
    # Read the same way as architecture files (nni_idarts.errors.read_user_text): no device, folder or huge file.
    with pytest.raises(ConfigError, match='config error: /dev/zero is not a regular file'):
        load_config('/dev/zero')
    huge = tmp_path / 'huge.yaml'
    huge.write_bytes(b'#' * (config_module.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match='too many for a YAML config'):
        load_config(huge)

    # A 433-byte "billion laughs" document: its values expand to 9**9 strings, but a message shows a few of them.
    bomb = tmp_path / 'bomb.yaml'
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip('abcdefgh', 'bcdefghi'):
        lines.append(f'{name}: &{name} [' + ','.join([f'*{prev}'] * 9) + ']')
    lines.append('search: {epochs: *i}')
    bomb.write_text('\n'.join(lines) + '\n')
    assert len(bomb.read_bytes()) < 500
    with pytest.raises(ConfigError) as error:
        load_config(bomb)
    assert len(str(error.value)) < 200, len(str(error.value))
    assert "unknown key 'a'" in str(error.value)
    doc = yaml.safe_load('\n'.join(lines[:-1]))
    with pytest.raises(ConfigError) as error:
        config_from_dict({'search': {'epochs': doc['i']}})
    assert len(str(error.value)) < 200 and "'search.epochs' must be int, got list [[[[" in str(error.value)


@pytest.mark.parametrize('call, message', [
    (lambda s, d: s(epochs=0), 'epochs must be an integer >= 1; got 0'),
    (lambda s, d: s(epochs=-1), 'epochs must be an integer >= 1; got -1'),
    (lambda s, d: s(batch_size=0), 'batch_size must be an integer >= 1; got 0'),
    (lambda s, d: s(learning_rate=-0.1), 'learning_rate must be a finite number > 0.0; got -0.1'),
    (lambda s, d: s(weight_decay=float('nan')), 'weight_decay must be a finite number >= 0.0; got nan'),
    (lambda s, d: s(seed=2**64), 'seed must be an integer >= 0 and <= 4294967295'),
    (lambda s, d: s(checkpoint_every_n_steps=0), 'checkpoint_every_n_steps must be an integer >= 1; got 0'),
    (lambda s, d: s(strategy=IDartsStrategy(warmup_epochs=3), epochs=3), 'warmup_epochs=3 must be less than epochs=3'),
    (lambda s, d: d(epochs=0), 'epochs must be an integer >= 1; got 0'),
    (lambda s, d: d(seed=-1), 'seed must be an integer >= 0'),
])
def test_search_and_retraining_refuse_unusable_arguments_where_they_are_used(call, message):
    """The functions check their arguments too (for callers that do not go through a config)."""
    import torch
    from torch.utils.data import TensorDataset

    from nni_idarts.retrain import train_and_evaluate
    from nni_idarts.search import search
    from search_spaces import DigitsCellSpace

    data = TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))

    def run_search(strategy=None, **kwargs):
        return search(DigitsCellSpace(channels=2, num_cells=1), data, data, strategy or IDartsStrategy(), **kwargs)

    def run_retrain(**kwargs):
        return train_and_evaluate(torch.nn.Linear(64, 10), data, data, **kwargs)

    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)').replace('+', r'\+')):
        call(run_search, run_retrain)
