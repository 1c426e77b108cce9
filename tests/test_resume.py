"""Checkpoints: atomic writes, the data position, and a search resumed after a mid-epoch kill ends exactly where an
uninterrupted one does (CPU, fixed seed)."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import Subset, TensorDataset

from nni_idarts import IDartsStrategy
from nni_idarts.checkpoint import AtomicCheckpointIO, atomic_write_json, resumable_loader
from nni_idarts.data import digits_splits
from nni_idarts.search import search
from search_spaces import build_space

TRAINER = {'enable_progress_bar': False, 'enable_model_summary': False}


class Killed(RuntimeError):
    pass


class KillAtBatch(pl.Callback):
    """Stops the search with an exception after its ``at``-th training batch (as a crash would)."""

    def __init__(self, at: int):
        self.at = at
        self.seen = 0

    def on_train_batch_end(self, trainer, *args):
        self.seen += 1
        if self.seen == self.at:
            raise Killed(f'killed after batch {self.seen}')


def run_search(tmp_path, options=None, **kwargs) -> tuple[torch.Tensor, dict]:
    splits = digits_splits(0)
    train, val = Subset(splits.train, range(160)), Subset(splits.val, range(130))  # 5 batches/epoch; val cycles
    pl.seed_everything(0, verbose=False)  # the supernet's weights
    space = build_space('digits', in_channels=1, num_classes=10, channels=4, num_cells=1)
    strategy = IDartsStrategy(inner_steps=2, K=1, arc_learning_rate=0.05, **(options or {}))
    trainer_kwargs = {**TRAINER, 'callbacks': kwargs.pop('callbacks', [])}
    search(space, train, val, strategy, epochs=2, batch_size=32, workdir=str(tmp_path / 'nni'),
           trainer_kwargs=trainer_kwargs, **kwargs)
    module = strategy.oneshot_module
    state = {'lambda_max': module._lambda_max, 'arch_steps': module._arch_steps,
             'power_vector': (None if module._power_vector is None
                              else torch.cat([v.flatten() for v in module._power_vector])),
             'validation_stream': module.validation_stream.state_dict()}
    return torch.cat([a.detach().flatten() for a in module.arch_parameters()]), state


@pytest.mark.parametrize('kill_at, options', [
    (7, {}),                                # last checkpoint mid-epoch: epoch 2, batch 1
    (6, {'gamma': 'auto', 'damping': 0.1}),  # after the last batch of epoch 1; with the power iteration's state
])
def test_resume_after_a_kill_ends_with_the_same_alphas(tmp_path, kill_at, options):
    uninterrupted, final_state = run_search(tmp_path, options)
    assert uninterrupted.abs().max() > 0.02  # the alphas moved (NNI starts them at ~1e-3)

    checkpoints = tmp_path / 'ckpt'
    # 10 batches in all (2 epochs of 5), killed after batch `kill_at`, before the checkpoint callback (which runs
    # last) saved it: the last checkpoint is of batch kill_at - 1.
    with pytest.raises(Killed):
        run_search(tmp_path, options, checkpoint_dir=str(checkpoints), checkpoint_every_n_steps=1,
                   callbacks=[KillAtBatch(kill_at)])
    saved = torch.load(checkpoints / 'last.ckpt', weights_only=False)
    batches_done = saved['loops']['fit_loop']['epoch_loop.batch_progress']['current']['processed']
    assert 5 * saved['epoch'] + batches_done == kill_at - 1, (saved['epoch'], batches_done)
    assert len(saved['optimizer_states']) == 2  # weights (SGD) and alphas (Adam)

    counter = KillAtBatch(at=-1)  # never kills; counts the batches trained
    resumed, resumed_state = run_search(tmp_path, options, checkpoint_dir=str(checkpoints), checkpoint_every_n_steps=1,
                                        resume_from=str(checkpoints / 'last.ckpt'), callbacks=[counter])
    assert counter.seen == 10 - (kill_at - 1)  # only the rest: it did resume, not restart (nor skip an epoch)
    assert torch.equal(resumed, uninterrupted)
    # the validation stream's position and gamma='auto''s estimate and warm start continued exactly
    assert resumed_state['validation_stream'] == final_state['validation_stream']
    assert resumed_state['arch_steps'] == final_state['arch_steps'] == 5
    assert resumed_state['lambda_max'] == final_state['lambda_max']
    if options:
        assert final_state['lambda_max'] is not None
        assert torch.equal(resumed_state['power_vector'], final_state['power_vector'])


@pytest.mark.parametrize('drawn', [1, 3, 4, 6])  # 3 and 6: a pass drawn to its very end (3 batches a pass)
def test_validation_stream_resumes_where_it_stood_also_at_the_end_of_a_pass(drawn):
    from nni_idarts.module import ValidationStream

    data = TensorDataset(torch.arange(9))
    whole = ValidationStream(resumable_loader(data, batch_size=3, seed=1))
    stream = ValidationStream(resumable_loader(data, batch_size=3, seed=1))
    for _ in range(drawn):
        stream.next()
    resumed = ValidationStream(resumable_loader(data, batch_size=3, seed=1))  # a fresh process's stream
    resumed.load_state_dict(stream.state_dict())
    expected = [whole.next()[0].tolist() for _ in range(drawn + 6)][drawn:]
    assert [resumed.next()[0].tolist() for _ in range(6)] == expected
    assert resumed.state_dict() == whole.state_dict()


def test_resumable_loader_continues_the_same_order():
    data = TensorDataset(torch.arange(10))
    whole = [batch[0].tolist() for batch in resumable_loader(data, batch_size=3, seed=5)]
    first = resumable_loader(data, batch_size=3, seed=5)
    it = iter(first)
    head = [next(it)[0].tolist() for _ in range(2)]
    state = first.state_dict()

    second = resumable_loader(data, batch_size=3, seed=5)
    second.load_state_dict(state)
    tail = [batch[0].tolist() for batch in second]
    assert head + tail == whole
    assert sorted(sum(whole, [])) == list(range(10))
    loader = resumable_loader(data, batch_size=3, seed=5)
    loader.sampler.set_epoch(1)
    assert [b[0].tolist() for b in loader] != whole  # a new permutation each epoch


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'last.ckpt'
    io = AtomicCheckpointIO()
    io.save_checkpoint({'step': 1}, path)

    def torn_save(obj, f):
        f.write(b'partial')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', torn_save)
    with pytest.raises(OSError, match='disk full'):
        io.save_checkpoint({'step': 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {'step': 1}
    assert [p.name for p in tmp_path.iterdir()] == ['last.ckpt']  # no temporary file left behind


def test_json_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'arch.json'
    atomic_write_json(path, {'a': 1})
    monkeypatch.setattr(json, 'dumps', lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {'a': 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {'a': 1}
