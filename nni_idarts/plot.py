"""Pictures of a search: the searched cell(s) as graphs, and the architecture probabilities over the search.

:func:`cell_graphs` turns an exported architecture of one of the cell spaces we ship into graphs (nodes, and edges
labelled with the chosen op and its probability); :func:`draw_arch` draws them, or, for any other space, a bar chart
of the probabilities of every label's choices. :func:`read_prob_trajectories` reads the ``prob/<label>/<choice>``
scalars that the search module logs to TensorBoard, and :func:`draw_prob_trajectories` plots them.

Drawn with matplotlib's Agg backend (files only, no display needed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

#: The cell spaces :func:`cell_graphs` knows, by the ``space`` name an architecture file records.
CELL_SPACES = ('digits', 'nasbench201', 'darts', 'nasbench1shot1_1', 'nasbench1shot1_2', 'nasbench1shot1_3')


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    op: str | None = None            #: the chosen op on this edge (None: the edge only passes its input on)
    prob: float | None = None        #: the op's (or, with ``op`` None, the input choice's) probability


@dataclass
class CellGraph:
    """One cell: ``nodes`` in topological order, ``ops`` of the nodes that apply one (NAS-Bench-1Shot1), edges."""
    title: str
    nodes: list[str]
    edges: list[Edge] = field(default_factory=list)
    node_ops: dict[str, tuple[str, float | None]] = field(default_factory=dict)


def _prob(probs: Mapping[str, Mapping[str, float]] | None, label: str, value: Any) -> float | None:
    if not probs or label not in probs:
        return None
    p = probs[label].get(str(value))
    return float(p) if p is not None else None


def _chosen(value: Any) -> list[int]:
    """An InputChoice's exported value: a list of indices (an int for n_chosen=1 in some exports)."""
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _edge_cell(title: str, arch: Mapping[str, Any], probs: Any, label_format: str, names: Sequence[str]) -> CellGraph:
    """A cell with an op on every edge ``i -> j``, i < j (digits, NAS-Bench-201); ``names`` names the nodes."""
    graph = CellGraph(title, list(names))
    for j in range(1, len(names)):
        for i in range(j):
            label = label_format.format(i, j)
            graph.edges.append(Edge(names[i], names[j], str(arch[label]), _prob(probs, label, arch[label])))
    return graph


def _darts_cell(kind: str, arch: Mapping[str, Any], probs: Any) -> CellGraph:
    nodes = sorted({int(m[1]) for label in arch if (m := re.fullmatch(rf'{kind}/op_(\d+)_\d+', label))})
    if not nodes:
        raise KeyError(f'{kind}/op_2_0')
    names = ['c_{k-2}', 'c_{k-1}'] + [str(n) for n in nodes] + ['c_{k}']  # the cell's inputs and output
    graph = CellGraph(f'{kind} cell', names)
    for node in nodes:
        for k in sorted(int(m[1]) for label in arch if (m := re.fullmatch(rf'{kind}/op_{node}_(\d+)', label))):
            op_label, input_label = f'{kind}/op_{node}_{k}', f'{kind}/input_{node}_{k}'
            op = str(arch[op_label])
            for source in _chosen(arch[input_label]):
                # NNI's differentiable DARTS cell keeps one distribution per edge, '<kind>/<node>_<source>'.
                edge_label = f'{kind}/{node}_{source}'
                prob = _prob(probs, edge_label if probs and edge_label in probs else op_label, op)
                graph.edges.append(Edge(names[source], str(node), op, prob))
    graph.edges.extend(Edge(str(node), 'c_{k}') for node in nodes)  # the cell output concatenates its nodes
    return graph


def _nasbench1shot1_cell(space: int, arch: Mapping[str, Any], probs: Any) -> CellGraph:
    from search_spaces.nasbench1shot1 import NUM_PARENTS

    *node_parents, _ = NUM_PARENTS[space]
    n = len(node_parents)
    names = ['input'] + [str(k) for k in range(1, n + 1)] + ['output']
    graph = CellGraph(f'NAS-Bench-1Shot1 space {space} cell', names)
    for k in range(1, n + 2):
        label = f'node_{k}_inputs' if k <= n else 'output_inputs'
        parents = _chosen(arch[label]) if label in arch else list(range(k))  # no choice: all earlier nodes
        for parent in parents:
            graph.edges.append(Edge(names[parent], names[k], None, _prob(probs, label, parent)))
        if k <= n:
            op_label = f'node_{k}_op'
            graph.node_ops[names[k]] = (str(arch[op_label]), _prob(probs, op_label, arch[op_label]))
    return graph


def space_of(arch: Mapping[str, Any], space: Mapping[str, Any] | None = None) -> str | None:
    """The cell space an architecture belongs to: its file's ``space`` name, else recognised from its labels."""
    if space and space.get('name') in CELL_SPACES:
        return str(space['name'])
    labels = set(arch)
    if labels == {'edge_0_1', 'edge_0_2', 'edge_1_2'}:
        return 'digits'
    if labels == {f'cell/{i}_{j}' for j in range(1, 4) for i in range(j)}:
        return 'nasbench201'
    if labels and all(re.fullmatch(r'(normal|reduce)/(op|input)_\d+_\d+', label) for label in labels):
        return 'darts'
    return None


def cell_graphs(arch: Mapping[str, Any], probs: Mapping[str, Mapping[str, float]] | None = None,
                space: str | None = None) -> list[CellGraph]:
    """The cells of ``arch`` (an exported architecture of cell space ``space``, see :data:`CELL_SPACES`) as graphs.

    ``probs``: label -> {choice (as a string): probability}, as the architecture file stores them. Raises
    ``ValueError`` for a space that is not a cell space or an architecture that does not fit it.
    """
    space = space or space_of(arch)
    try:
        if space == 'digits':
            return [_edge_cell('digits cell', arch, probs, 'edge_{}_{}', ['input', '1', 'output'])]
        if space == 'nasbench201':
            return [_edge_cell('NAS-Bench-201 cell', arch, probs, 'cell/{}_{}', ['input', '1', '2', 'output'])]
        if space == 'darts':
            return [_darts_cell(kind, arch, probs) for kind in ('normal', 'reduce')]
        if space in ('nasbench1shot1_1', 'nasbench1shot1_2', 'nasbench1shot1_3'):
            return [_nasbench1shot1_cell(int(space[-1]), arch, probs)]
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise ValueError(f'the architecture does not fit the {space} cell space ({type(error).__name__}: {error})') from error
    raise ValueError(f'{space!r} is not a cell space we can draw (known: {", ".join(CELL_SPACES)})')


# ----- drawing -----

def _pyplot() -> Any:
    import matplotlib
    matplotlib.use('Agg')  # files only; also safe without a display
    import matplotlib.pyplot as plt
    return plt


#: Drawing scale: inches per data unit (nodes are 3 units apart), and the size of an 8-point character in units.
_INCH = 0.42
_CHAR_W, _LINE_H = 0.067 / _INCH, 0.15 / _INCH


def _label_box(text: str, x: float, y: float) -> tuple[float, float, float, float]:
    lines = text.splitlines()
    w, h = (max(map(len, lines)) * _CHAR_W + 0.3) / 2, (len(lines) * _LINE_H + 0.2) / 2
    return x - w, x + w, y - h, y + h


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def _layout_cell(graph: CellGraph) -> tuple[dict[str, float], list[tuple[Edge, float, str | None]], float, float]:
    """Node x positions, each edge with the height of its arc's middle (+ above, - below) and its label text,
    and the extent above and below the node line. Labels are stacked so that no two overlap."""
    x = {name: 3.0 * i for i, name in enumerate(graph.nodes)}
    placed: list[tuple[float, ...]] = [_label_box(name, x[name], 0.0) for name in graph.nodes]
    laid_out = []
    top, bottom = 1.0, 1.0
    for edge in sorted(graph.edges, key=lambda e: (x[e.target] - x[e.source], x[e.source])):
        x0, x1 = x[edge.source], x[edge.target]
        above = edge.op is not None or bool(graph.node_ops)
        text = None
        if edge.op is not None:
            text = edge.op if edge.prob is None else f'{edge.op}\n{edge.prob:.2f}'
        elif edge.prob is not None:
            text = f'{edge.prob:.2f}'
        height = 0.6 + 0.2 * (x1 - x0)
        if text is not None:
            while any(_overlaps(_label_box(text, (x0 + x1) / 2, height), box) for box in placed):
                height += 0.25
            placed.append(_label_box(text, (x0 + x1) / 2, height))
            top = max(top, placed[-1][3] + 0.2)
        laid_out.append((edge, height if above else -height, text))
        if above:
            top = max(top, height + 0.4)
        else:
            bottom = max(bottom, height + 0.4)
    if graph.node_ops:
        bottom = max(bottom, 0.7 + 3 * _LINE_H)
    return x, laid_out, top, bottom


def _node_text(name: str) -> str:
    return f'${name}$' if '_{' in name else name  # c_{k-1}: mathtext subscripts


def _draw_cell(ax: Any, graph: CellGraph, layout: tuple[Any, ...]) -> None:
    """Nodes on a line, left to right; op edges arc above it, plain edges (DARTS' concatenation) below."""
    from matplotlib.patches import FancyArrowPatch

    x, laid_out, top, bottom = layout
    for edge, height, text in laid_out:
        x0, x1 = x[edge.source], x[edge.target]
        # Arc3's curve peaks at rad * span / 2 off the line; rad < 0 bends a left-to-right edge upwards.
        rad = -2 * height / (x1 - x0)
        faded = edge.op == 'none'
        ax.add_patch(FancyArrowPatch((x0, 0), (x1, 0), connectionstyle=f'arc3,rad={rad}', arrowstyle='-|>',
                                     mutation_scale=12, lw=1.0 if faded else 1.5, shrinkA=14, shrinkB=14,
                                     color='0.7' if faded else ('tab:blue' if height > 0 else '0.5'),
                                     linestyle='--' if faded else '-'))
        if text is not None:
            ax.text((x0 + x1) / 2, height, text, ha='center', va='center', fontsize=8,
                    color='0.5' if faded else 'black', zorder=4,
                    bbox=dict(boxstyle='round,pad=0.15', fc='white', ec='none', alpha=0.9))
    for name, position in x.items():
        op = graph.node_ops.get(name)
        ax.text(position, 0, _node_text(name), ha='center', va='center', fontsize=9, zorder=5,
                bbox=dict(boxstyle='round,pad=0.35', fc='#d8ecd8' if op else '#fde9c9', ec='0.3'))
        if op is not None:
            ax.text(position, -0.55, op[0] if op[1] is None else f'{op[0]}\n{op[1]:.2f}', ha='center', va='top',
                    fontsize=8)
    ax.set_xlim(-1.6, max(x.values()) + 1.6)
    ax.set_ylim(-bottom, top)
    ax.set_aspect('equal')
    ax.set_title(graph.title, fontsize=11)
    ax.axis('off')


def draw_cells(graphs: Sequence[CellGraph], path: str | Path, title: str | None = None) -> None:
    plt = _pyplot()
    layouts = [_layout_cell(graph) for graph in graphs]
    width = max(3.0 * (len(g.nodes) - 1) + 3.2 for g in graphs)
    heights = [top + bottom for _, _, top, bottom in layouts]
    fig, axes = plt.subplots(len(graphs), 1, squeeze=False, gridspec_kw={'height_ratios': heights},
                             figsize=(max(5.0, width * _INCH), sum(heights) * _INCH + 0.45 * len(graphs)))
    for ax, graph, layout in zip(axes[:, 0], graphs, layouts):
        _draw_cell(ax, graph, layout)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_prob_bars(arch: Mapping[str, Any], probs: Mapping[str, Mapping[str, float]], path: str | Path,
                   title: str | None = None) -> None:
    """One horizontal bar chart per label: every choice's probability, the chosen one highlighted."""
    plt = _pyplot()
    labels = [label for label in sorted(probs) if probs[label]]
    if not labels:
        raise ValueError('the architecture has no probabilities to plot (it was not saved by nni-idarts search)')
    columns = min(3, len(labels))
    rows = math.ceil(len(labels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 0.35 * max(len(probs[l]) for l in labels) * rows + 1.2 * rows),
                             squeeze=False)
    for ax, label in zip(axes.flat, labels):
        choices = list(probs[label])
        chosen = arch.get(label)
        chosen_set = {str(c) for c in chosen} if isinstance(chosen, list) else {str(chosen)}
        ax.barh(range(len(choices)), [probs[label][c] for c in choices],
                color=['tab:blue' if c in chosen_set else '0.75' for c in choices])
        ax.set_yticks(range(len(choices)), choices, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis='x', labelsize=7)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis('off')
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_arch(arch: Mapping[str, Any], probs: Mapping[str, Mapping[str, float]] | None, path: str | Path,
              space: Mapping[str, Any] | None = None) -> str:
    """Draw ``arch`` to ``path``: its cells for a cell space, else a bar chart of ``probs``. Returns what it drew."""
    name = space_of(arch, space)
    if name is not None:
        draw_cells(cell_graphs(arch, probs, name), path)
        return f'{name} cell graph'
    if not probs:
        raise ValueError('cannot draw this architecture: it is not from a cell space we know, and its file has no '
                         'probabilities for a bar chart')
    draw_prob_bars(arch, probs, path, title=(space or {}).get('name'))
    return 'probability bar chart'


# ----- probability trajectories -----

def read_prob_trajectories(tensorboard_dir: str | Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """label -> choice -> [(step, probability)] from the ``prob/<label>/<choice>`` scalars in ``tensorboard_dir``.

    Steps are Lightning's global steps. A step logged twice (a search resumed from a checkpoint repeats the steps
    after it) keeps its last value.
    """
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tensorboard_dir))
    multiplexer.Reload()
    series: dict[str, dict[str, dict[int, float]]] = {}
    for run, tags in multiplexer.Runs().items():
        for tag in tags.get('scalars', []):
            if not tag.startswith('prob/'):
                continue
            label, _, choice = tag[len('prob/'):].rpartition('/')
            points = series.setdefault(label, {}).setdefault(choice, {})
            for event in sorted(multiplexer.Scalars(run, tag), key=lambda e: e.wall_time):
                points[int(event.step)] = float(event.value)
    return {label: {choice: sorted(points.items()) for choice, points in choices.items()}
            for label, choices in sorted(series.items())}


def draw_prob_trajectories(trajectories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
                           path: str | Path, title: str = 'architecture probabilities during the search') -> None:
    """One small plot per label: each choice's probability over Lightning's global steps."""
    if not trajectories:
        raise ValueError('no probability scalars (prob/...) to plot')
    plt = _pyplot()
    labels = list(trajectories)
    columns = min(3, len(labels))
    rows = math.ceil(len(labels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 2.9 * rows), squeeze=False, sharex=True)
    for ax, label in zip(axes.flat, labels):
        for choice, points in trajectories[label].items():
            steps, values = zip(*points) if points else ((), ())
            ax.plot(steps, values, label=choice, lw=1.4)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc='upper left', frameon=False)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis('off')
    for ax in axes[-1]:
        ax.set_xlabel('training step', fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_prob_trajectories(tensorboard_dir: str | Path, path: str | Path) -> Path | None:
    """Draw the ``prob/`` scalars of ``tensorboard_dir`` to ``path``; ``None`` (nothing written) if there are none."""
    trajectories = read_prob_trajectories(tensorboard_dir)
    if not trajectories:
        return None
    draw_prob_trajectories(trajectories, path)
    return Path(path)
