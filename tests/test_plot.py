"""Pictures: the searched cells as graphs (built, then drawn), probability bars, and probability trajectories."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from nni_idarts.cli import EXIT_BAD_INPUT, main
from nni_idarts.plot import (Edge, cell_graphs, draw_arch, draw_prob_trajectories, read_prob_trajectories,
                             space_of)
from search_spaces import build_space


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file; fails unless the file is one."""
    data = Path(path).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR', f'{path} is not a PNG'
    return struct.unpack('>II', data[16:24])


def assert_picture(path: Path, min_bytes: int = 8000) -> None:
    width, height = png_size(path)
    assert 300 <= width <= 4000 and 150 <= height <= 4000, (width, height)
    assert path.stat().st_size > min_bytes  # more than an empty canvas


def example(space: str, **knobs) -> tuple[dict, dict]:
    """An architecture of ``space`` (the last candidate of every choice, the last ones of an input choice) and
    probabilities that favour it, labelled as the real space labels them."""
    model_space = build_space(space, in_channels=1, num_classes=10, **knobs)
    arch, probs = {}, {}
    for label, mutable in model_space.simplify().items():
        values = list(mutable.values)
        n_chosen = getattr(mutable, 'n_chosen', None)
        arch[label] = values[-n_chosen:] if n_chosen else values[-1]
        probs[label] = {str(v): (0.6 if i == len(values) - 1 else 0.4 / (len(values) - 1)) for i, v in enumerate(values)}
    return arch, probs


def edges(graph) -> set[tuple]:
    return {(e.source, e.target, e.op) for e in graph.edges}


def test_digits_and_nasbench201_cells_have_one_labelled_edge_per_choice():
    arch, probs = example('digits', channels=4, num_cells=1)
    [graph] = cell_graphs(arch, probs, 'digits')
    assert graph.nodes == ['input', '1', 'output']
    assert edges(graph) == {('input', '1', 'avg_pool_3x3'), ('input', 'output', 'avg_pool_3x3'),
                            ('1', 'output', 'avg_pool_3x3')}
    assert all(e.prob == pytest.approx(0.6) for e in graph.edges)

    arch, probs = example('nasbench201', channels=4, cells_per_stage=1)
    arch['cell/0_3'] = 'none'
    [graph] = cell_graphs(arch, probs)  # recognised from its labels
    assert graph.nodes == ['input', '1', '2', 'output']
    names = graph.nodes
    assert {(e.source, e.target) for e in graph.edges} == {(names[i], names[j]) for j in range(1, 4) for i in range(j)}
    none_edge = next(e for e in graph.edges if (e.source, e.target) == ('input', 'output'))
    assert none_edge == Edge('input', 'output', 'none', pytest.approx(0.1))


def test_darts_cells_follow_the_chosen_inputs():
    arch, probs = example('darts', width=4, num_cells=3)
    arch['normal/input_4_1'] = [0]  # node 4's second op reads c_{k-2} instead of node 3
    arch['normal/op_4_1'] = 'skip_connect'
    graphs = cell_graphs(arch, probs, 'darts')
    assert [g.title for g in graphs] == ['normal cell', 'reduce cell']
    normal, reduce = graphs
    assert normal.nodes == ['c_{k-2}', 'c_{k-1}', '2', '3', '4', '5', 'c_{k}']
    op_edges = {e for e in edges(normal) if e[2] is not None}
    # example() takes the last candidate of each input choice: node n, input k reads node n-1
    assert op_edges == {('c_{k-1}', '2', 'dil_conv_5x5'), ('c_{k-1}', '2', 'dil_conv_5x5')} | {
        ('2', '3', 'dil_conv_5x5'), ('3', '4', 'dil_conv_5x5'), ('c_{k-2}', '4', 'skip_connect'),
        ('4', '5', 'dil_conv_5x5')}
    assert len([e for e in normal.edges if e.op is not None]) == 8  # two inputs per node, even when they coincide
    assert {(e.source, e.target) for e in normal.edges if e.op is None} == {(n, 'c_{k}') for n in '2345'}
    skip = next(e for e in normal.edges if e.op == 'skip_connect')
    assert skip.prob == pytest.approx(0.4 / 6)  # the probability of the op on that edge, not of the favourite
    assert len(reduce.edges) == 12

    # NNI's one-shot DARTS cell exports one distribution per edge ('normal/<node>_<input>'), as a search writes it.
    probs = {f'normal/{n}_{i}': {'skip_connect': 0.1 * i + 0.05, 'dil_conv_5x5': 0.5} for n in range(2, 6) for i in range(n)}
    normal = cell_graphs(arch, probs, 'darts')[0]
    assert {(e.source, e.target, e.prob) for e in normal.edges if e.op == 'skip_connect'} == {('c_{k-2}', '4', 0.05)}
    from nni_idarts.arch import format_arch  # the printed cell (show, the search summary) reads them the same way
    assert '  node 4: dil_conv_5x5(node 3, p=0.50) + skip_connect(node 0, p=0.05)' in format_arch(arch, probs)


def test_nasbench1shot1_cell_has_implicit_and_chosen_parents():
    from search_spaces.nasbench1shot1 import NUM_PARENTS

    arch, probs = example('nasbench1shot1_1', channels=4, num_stacks=1, cells_per_stack=1)
    [graph] = cell_graphs(arch, probs, 'nasbench1shot1_1')
    assert graph.nodes == ['input', '1', '2', '3', '4', 'output']
    pairs = {(e.source, e.target) for e in graph.edges}
    # node 1 <- input and node 2 <- input, 1 are fixed; nodes 3, 4 and the output take their last two candidates
    assert pairs == {('input', '1'), ('input', '2'), ('1', '2'), ('1', '3'), ('2', '3'), ('2', '4'), ('3', '4'),
                     ('3', 'output'), ('4', 'output')}
    assert len(pairs) == sum(NUM_PARENTS[1]) <= 9  # NAS-Bench-101's edge limit
    assert graph.node_ops == {str(k): ('maxpool3x3', pytest.approx(0.6)) for k in range(1, 5)}
    fixed = next(e for e in graph.edges if (e.source, e.target) == ('input', '1'))
    assert fixed.prob is None and fixed.op is None

    arch, probs = example('nasbench1shot1_3', channels=4, num_stacks=1, cells_per_stack=1)
    [graph] = cell_graphs(arch, probs, 'nasbench1shot1_3')
    assert len(graph.nodes) == 7 and len(graph.edges) == sum(NUM_PARENTS[3])


def test_cell_graphs_refuse_what_they_cannot_draw():
    arch, probs = example('digits', channels=4, num_cells=1)
    del arch['edge_1_2']
    with pytest.raises(ValueError, match='does not fit the digits cell space'):
        cell_graphs(arch, probs, 'digits')
    with pytest.raises(ValueError, match='not a cell space'):
        cell_graphs({'op': 'linear_relu'}, None)
    assert space_of({'op': 'linear_relu', 'skip': [0]}) is None


@pytest.mark.parametrize('space, knobs', [('digits', dict(channels=4, num_cells=1)),
                                          ('darts', dict(width=4, num_cells=3)),
                                          ('nasbench1shot1_2', dict(channels=4, num_stacks=1, cells_per_stack=1))])
def test_show_plot_writes_a_cell_picture(tmp_path, capsys, space, knobs):
    arch, probs = example(space, **knobs)
    arch_file = tmp_path / 'arch.json'
    arch_file.write_text(json.dumps({'space': {'name': space, **knobs}, 'arch': arch, 'probs': probs}))
    picture = tmp_path / 'arch.png'
    assert main(['show', str(arch_file), '--plot', str(picture)]) == 0
    assert f'{space} cell graph written to {picture}' in capsys.readouterr().out
    assert_picture(picture)
    if space == 'darts':  # two cells, one above the other
        width, height = png_size(picture)
        assert height > 0.6 * width


def test_other_spaces_get_a_probability_bar_chart(tmp_path, capsys):
    arch = {'width': 32, 'op': 'linear_tanh', 'skip': [1]}
    probs = {'width': {'16': 0.3, '32': 0.7}, 'op': {'linear_relu': 0.2, 'linear_tanh': 0.5, 'identity': 0.3},
             'skip': {'0': 0.45, '1': 0.55}}
    picture = tmp_path / 'bars.png'
    assert draw_arch(arch, probs, picture, {'name': 'mlp'}) == 'probability bar chart'
    assert_picture(picture, min_bytes=5000)

    bare = tmp_path / 'bare.json'  # NNI's bare export has no probabilities: nothing to draw, one line, exit 2
    bare.write_text(json.dumps(arch))
    assert main(['show', str(bare), '--plot', str(tmp_path / 'x.png')]) == EXIT_BAD_INPUT
    assert 'no probabilities' in capsys.readouterr().err
    assert not (tmp_path / 'x.png').exists()


def test_probability_trajectories_from_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / 'tb'))
    for step in range(0, 40, 2):
        writer.add_scalar('prob/edge_0_1/conv_3x3', 0.2 + step / 100, step)
        writer.add_scalar('prob/edge_0_1/none', 0.8 - step / 100, step)
        writer.add_scalar('prob/normal/op_2_0/skip_connect', 0.5, step)
        writer.add_scalar('train_loss', 1.0, step)
    writer.add_scalar('prob/edge_0_1/none', 0.0, 38)  # a resumed search logs step 38 again: the last value counts
    writer.close()
    trajectories = read_prob_trajectories(tmp_path / 'tb')
    assert set(trajectories) == {'edge_0_1', 'normal/op_2_0'}  # labels with a '/' stay whole
    assert set(trajectories['edge_0_1']) == {'conv_3x3', 'none'}
    steps, values = zip(*trajectories['edge_0_1']['none'])
    assert steps == tuple(range(0, 40, 2)) and values[-1] == 0.0 and values[0] == pytest.approx(0.8)
    picture = tmp_path / 'probs.png'
    draw_prob_trajectories(trajectories, picture)
    assert_picture(picture)
    with pytest.raises(ValueError):
        draw_prob_trajectories({}, picture)


def test_show_plot_into_a_missing_folder_is_one_line(tmp_path, capsys):
    arch, probs = example('digits', channels=4, num_cells=1)
    arch_file = tmp_path / 'arch.json'
    arch_file.write_text(json.dumps({'arch': arch, 'probs': probs}))
    assert main(['show', str(arch_file), '--plot', str(tmp_path / 'no' / 'such' / 'dir.png')]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith('nni-idarts show: --plot: cannot write') and '\n' not in err
