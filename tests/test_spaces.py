"""Every search space: built at CPU size, searched for one short epoch, exported, and frozen into a runnable model."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import pytorch_lightning as pl
import torch
from nni.nas.nn.pytorch import InputChoice, LayerChoice
from nni.nas.strategy import DARTS as NniDarts
from torch.utils.data import TensorDataset

from nni_idarts import IDartsStrategy
from nni_idarts.arch import check_arch
from nni_idarts.retrain import fixed_model
from nni_idarts.search import search
from search_spaces import SPACES, build_space
from search_spaces.nasbench1shot1 import NASBENCH1SHOT1_OPS, NUM_PARENTS

#: The smallest sizes that keep each space's structure (DARTS needs 3 cells for its two reduction cells).
TINY = {
    'digits': {'channels': 4, 'num_cells': 1},
    'digits_deep': {'channels': 4, 'num_cells': 1},
    'nasbench201': {'channels': 4, 'cells_per_stage': 1},
    'darts': {'width': 2, 'num_cells': 3},
    'nasbench1shot1_1': {'channels': 4, 'num_stacks': 2, 'cells_per_stack': 1},
    'nasbench1shot1_2': {'channels': 4, 'num_stacks': 2, 'cells_per_stack': 1},
    'nasbench1shot1_3': {'channels': 4, 'num_stacks': 2, 'cells_per_stack': 1},
}
TRAINER = {'enable_progress_bar': False, 'enable_model_summary': False}


def tiny_data(n: int = 16, channels: int = 3, size: int = 8, classes: int = 4) -> TensorDataset:
    """Images whose class is visible (the class index lights up one quadrant), so the losses have a direction."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    images = 0.1 * torch.randn(n, channels, size, size, generator=generator)
    half = size // 2
    for i, label in enumerate(labels.tolist()):
        r, c = divmod(label, 2)
        images[i, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 1.0
    return TensorDataset(images, labels)


def test_every_space_is_tested():
    assert set(TINY) == set(SPACES)


@pytest.mark.parametrize('name', sorted(SPACES))
def test_space_searches_exports_and_freezes(name, tmp_path):
    data = tiny_data(8 if name == 'darts' else 16)  # DARTS' supernet is the slowest: one batch
    pl.seed_everything(0, verbose=False)
    space = build_space(name, in_channels=3, num_classes=4, **TINY[name])
    strategy = IDartsStrategy(inner_steps=1, K=1, arc_learning_rate=0.1)
    result = search(space, data, data, strategy, epochs=1, batch_size=8, num_classes=4, workdir=str(tmp_path),
                    trainer_kwargs=TRAINER)

    # One architecture step per batch with Adam at 0.1 moves every alpha by about 0.1, far beyond NNI's
    # initialisation noise (1e-3): the probabilities leave the uniform distribution.
    moved = max(abs(p - 1 / len(choices)) for choices in result.probs.values() for p in choices.values())
    assert moved > 0.01, result.probs

    fresh = build_space(name, in_channels=3, num_classes=4, **TINY[name])
    check_arch(result.arch, fresh, name)  # every label, each a valid choice
    model = fixed_model(fresh, result.arch)
    assert not any(isinstance(m, (LayerChoice, InputChoice)) for m in model.modules())
    out = model(data.tensors[0][:2])
    assert out.shape == (2, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', ['nasbench1shot1_1', 'nasbench201'])
def test_space_works_with_nni_darts(name, tmp_path):
    """The spaces are plain NNI model spaces: NNI's own DARTS strategy searches and exports them too."""
    data = tiny_data()
    pl.seed_everything(0, verbose=False)
    space = build_space(name, in_channels=3, num_classes=4, **TINY[name])
    from nni.nas.evaluator.pytorch import Classification, DataLoader
    from nni.nas.experiment import NasExperiment

    evaluator = Classification(train_dataloaders=DataLoader(data, batch_size=8),
                               val_dataloaders=DataLoader(data, batch_size=8), num_classes=4, export_onnx=False,
                               max_epochs=1, accelerator='cpu', logger=False, enable_checkpointing=False, **TRAINER)
    experiment = NasExperiment(space, evaluator, NniDarts())
    experiment.config.experiment_working_directory = str(tmp_path)
    try:
        experiment.run()
        arch = experiment.export_top_models(formatter='dict')[0]
    finally:
        experiment.stop()  # else NNI stops it at exit, logging into streams pytest has closed
    fresh = build_space(name, in_channels=3, num_classes=4, **TINY[name])
    check_arch(arch, fresh, name)
    assert fixed_model(fresh, arch)(data.tensors[0][:2]).shape == (2, 4)


@pytest.mark.parametrize('number', [1, 2, 3])
def test_nasbench1shot1_choices_follow_the_paper(number):
    """Ops per choice block and parent choices per node, counted independently from NUM_PARENTS."""
    space = build_space(f'nasbench1shot1_{number}', in_channels=1, num_classes=2, channels=2, num_stacks=1,
                        cells_per_stack=2)
    mutables = space.simplify()
    *node_parents, output_parents = NUM_PARENTS[number]
    assert len(node_parents) == (5 if number == 3 else 4)
    assert sum(NUM_PARENTS[number]) <= 9  # NAS-Bench-101's edge limit
    expected_labels = {f'node_{k}_op' for k in range(1, len(node_parents) + 1)}
    expected_labels |= {f'node_{k}_inputs' for k, n in enumerate(node_parents, 1) if n < k}
    expected_labels |= {'output_inputs'}
    assert set(mutables) == expected_labels
    for k in range(1, len(node_parents) + 1):
        assert list(mutables[f'node_{k}_op'].values) == list(NASBENCH1SHOT1_OPS)

    # Architectures (before NAS-Bench-101's isomorphism merging): 3^n op choices x the parent subsets.
    expected = 3 ** len(node_parents) * math.prod(
        len(list(combinations(range(k), n))) for k, n in enumerate([*node_parents, output_parents], 1))
    assert math.prod(len(list(m.grid())) for m in mutables.values()) == expected
    # Space 2's count is the paper's 29,160; spaces 1 and 3 count more here than the paper's unique cells because
    # NAS-Bench-101 merges isomorphic graphs and drops nodes without a path to the output.
    assert expected == {1: 81 * 3 * 6 * 10, 2: 29_160, 3: 243 * 2 * 3 * 6 * 10 * 15}[number]
