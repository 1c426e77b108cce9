"""Exported architectures as files: what ``nni-idarts search`` writes, ``retrain`` reads and ``show`` prints.

The file is JSON: ``{"space": {"name": ..., <size knobs>}, "arch": {label: choice}, "probs": {label: {choice: p}}}``.
``arch`` is NNI's exported dict (``model_space.freeze(arch)`` builds the model); ``probs`` are the softmaxed
architecture weights at the end of the search. A bare ``{label: choice}`` dict, as NNI exports it, is accepted too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from nni.nas.nn.pytorch import ModelSpace

from .checkpoint import atomic_write_json


class ArchError(ValueError):
    """An architecture file that cannot be read or does not fit the space; the message is one line."""


def save_arch(path: str | Path, arch: dict[str, Any], *, space: dict[str, Any] | None = None,
              probs: dict[str, dict[Any, float]] | None = None) -> None:
    doc: dict[str, Any] = {'arch': arch}
    if space is not None:
        doc['space'] = space
    if probs is not None:
        doc['probs'] = {label: {str(c): p for c, p in choices.items()} for label, choices in probs.items()}
    atomic_write_json(path, doc)


def load_arch_file(path: str | Path) -> dict[str, Any]:
    """The document in ``path`` as ``{'arch': ..., 'space': ... or None, 'probs': ... or None}``."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as error:
        raise ArchError(f'arch error: cannot read {path}: {error.strerror or error}') from error
    except json.JSONDecodeError as error:
        raise ArchError(f'arch error: {path} is not JSON (line {error.lineno}: {error.msg})') from error
    if not isinstance(doc, dict):
        raise ArchError(f'arch error: {path} must hold a JSON object, got {type(doc).__name__}')
    if isinstance(doc.get('arch'), dict):
        return {'arch': doc['arch'], 'space': doc.get('space'), 'probs': doc.get('probs')}
    return {'arch': doc, 'space': None, 'probs': None}


def check_arch(arch: dict[str, Any], space: ModelSpace, space_name: str) -> None:
    """Raise :class:`ArchError` unless ``arch`` names exactly the choices of ``space``, each with a valid value."""
    mutables = space.simplify()
    missing = [label for label in mutables if label not in arch]
    extra = [label for label in arch if label not in mutables]
    if missing or extra:
        what = (f'misses {missing[0]!r}' if missing else f'has {extra[0]!r}, which the space does not have')
        raise ArchError(f'arch error: the architecture does not match space {space_name!r}: it {what} '
                        f'({len(missing)} missing, {len(extra)} unknown labels)')
    for label, mutable in mutables.items():
        error = mutable.check_contains(arch)
        if error is not None:
            raise ArchError(f'arch error: {label!r} = {arch[label]!r} is not a choice of space {space_name!r} '
                            f'({str(error).splitlines()[0]})')


def _probability(probs: dict[str, dict[str, float]] | None, label: str, value: Any) -> str:
    if not probs or label not in probs or isinstance(value, list):
        return ''
    p = probs[label].get(str(value))
    return f'  (p={p:.2f})' if p is not None else ''


def format_arch(arch: dict[str, Any], probs: dict[str, dict[str, float]] | None = None) -> str:
    """The architecture as readable lines: edges ``i -> j: op``, and DARTS-style nodes ``node n: op(input) + ...``."""
    lines: list[str] = []
    groups: dict[str, list[str]] = {}
    for label in sorted(arch):
        prefix, _, _ = label.rpartition('/')
        groups.setdefault(prefix, []).append(label)
    for prefix, labels in groups.items():
        if prefix:
            lines.append(f'{prefix}:')
        indent = '  ' if prefix else ''
        done: set[str] = set()
        for label in labels:
            short = label.rpartition('/')[2]
            edge = re.fullmatch(r'(?:edge_)?(\d+)_(\d+)', short)
            darts_op = re.fullmatch(r'op_(\d+)_(\d+)', short)
            node_op = re.fullmatch(r'node_(\d+)_op', short)
            if edge:
                lines.append(f'{indent}edge {edge[1]} -> {edge[2]}: {arch[label]}{_probability(probs, label, arch[label])}')
            elif darts_op and darts_op[1] not in done:
                node = darts_op[1]
                done.add(node)
                parts = []
                for k in sorted({m[1] for lab in labels if (m := re.fullmatch(rf'op_{node}_(\d+)', lab.rpartition('/')[2]))}):
                    op_label = f'{prefix}/op_{node}_{k}' if prefix else f'op_{node}_{k}'
                    input_label = op_label.replace(f'op_{node}_{k}', f'input_{node}_{k}')
                    inputs = arch.get(input_label, '?')
                    sources = ", ".join(map(str, inputs)) if isinstance(inputs, list) else inputs
                    # NNI's differentiable DARTS cell keeps one distribution per edge, '<prefix>/<node>_<source>'.
                    p = (probs or {}).get(f'{prefix}/{node}_{sources}' if prefix else f'{node}_{sources}', {}).get(
                        str(arch[op_label]))
                    parts.append(f'{arch[op_label]}(node {sources}{"" if p is None else f", p={p:.2f}"})')
                lines.append(f'{indent}node {node}: {" + ".join(parts)}')
            elif node_op:
                node = node_op[1]
                inputs = arch.get(label.replace('_op', '_inputs'))
                source = f' <- nodes {", ".join(map(str, inputs))}' if isinstance(inputs, list) else ''
                lines.append(f'{indent}node {node}: {arch[label]}{source}{_probability(probs, label, arch[label])}')
            elif darts_op or re.fullmatch(r'input_\d+_\d+', short) or re.fullmatch(r'node_\d+_inputs', short):
                continue  # shown with their node
            else:
                value = arch[label]
                shown = f'nodes {", ".join(map(str, value))}' if isinstance(value, list) else value
                lines.append(f'{indent}{short}: {shown}{_probability(probs, label, value)}')
    return '\n'.join(lines)
