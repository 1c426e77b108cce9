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
from .errors import brief, read_user_text, reason


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


#: The largest architecture file read (they are a few kB; a bigger file is something else, e.g. a checkpoint).
MAX_ARCH_FILE_BYTES = 10 * 2**20


def load_arch_file(path: str | Path) -> dict[str, Any]:
    """The document in ``path`` as ``{'arch': ..., 'space': ... or None, 'probs': ... or None}``, each part checked
    for its type; anything else is one :class:`ArchError` line naming the file."""
    text = read_user_text(path, ArchError, 'arch error', max_bytes=MAX_ARCH_FILE_BYTES, what='an architecture file')
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as error:
        raise ArchError(f'arch error: {path} is not JSON (line {error.lineno}: {error.msg})') from error
    except (ValueError, RecursionError) as error:  # e.g. an integer of over 4300 digits, or nesting too deep
        raise ArchError(f'arch error: {path} is not readable JSON: {reason(error)}') from error
    try:
        return _check_document(doc)
    except ArchError as error:
        raise ArchError(f'arch error: {path}: {error}') from None


def _check_document(doc: Any) -> dict[str, Any]:
    """``doc`` (a parsed architecture file) as ``{'arch', 'space', 'probs'}`` if its parts have the right types:
    ``arch`` a non-empty ``{label: choice}`` object; ``space`` null or an object whose ``name`` (if any) is a string
    and whose other values are numbers, strings, booleans or null; ``probs`` null or ``{label: {choice: p}}`` with
    every ``p`` a number in [0, 1]. A document without ``arch`` is a bare ``{label: choice}`` dict, as NNI exports it."""
    if not isinstance(doc, dict):
        raise ArchError(f'must hold a JSON object, got {type(doc).__name__} {brief(doc)}')
    if 'arch' in doc:
        unknown = [key for key in doc if key not in ('arch', 'space', 'probs')]
        if unknown:
            raise ArchError(f"has the key {brief(unknown[0])}; a file with 'arch' may have only 'space' and 'probs'")
        arch, space, probs = doc['arch'], doc.get('space'), doc.get('probs')
    elif 'space' in doc or 'probs' in doc:
        raise ArchError("has 'space' or 'probs' but no 'arch', the {label: choice} object of the architecture")
    else:
        arch, space, probs = doc, None, None
    if not isinstance(arch, dict) or not arch:
        raise ArchError(f"'arch' must be a non-empty object {{label: choice}}, got {type(arch).__name__} {brief(arch)}")
    if space is not None:
        if not isinstance(space, dict):
            raise ArchError(f"'space' must be an object {{name: ..., <size knobs>}}, got {type(space).__name__} "
                            f"{brief(space)}")
        if 'name' in space and not isinstance(space['name'], str):
            raise ArchError(f"'space' has a 'name' that is not a string: {brief(space['name'])}")
        for knob, value in space.items():
            if not isinstance(value, (int, float, str, bool, type(None))):
                raise ArchError(f"'space' knob {brief(knob, 40)} must be a number, string, boolean or null, got "
                                f"{type(value).__name__} {brief(value)}")
    if probs is not None:
        if not isinstance(probs, dict):
            raise ArchError(f"'probs' must be an object {{label: {{choice: probability}}}}, got "
                            f"{type(probs).__name__} {brief(probs)}")
        for label, choices in probs.items():
            if not isinstance(choices, dict):
                raise ArchError(f"'probs' of {brief(label)} must be an object {{choice: probability}}, got "
                                f"{type(choices).__name__} {brief(choices)}")
            for choice, p in choices.items():
                if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                    raise ArchError(f"'probs' of {brief(label)}, choice {brief(choice)}: a probability must be a "
                                    f"number in [0, 1], got {brief(p)}")
    return {'arch': arch, 'space': space, 'probs': probs}


def check_arch(arch: dict[str, Any], space: ModelSpace, space_name: str) -> None:
    """Raise :class:`ArchError` unless ``arch`` names exactly the choices of ``space``, each with a valid value."""
    if not isinstance(arch, dict):
        raise ArchError(f'arch error: an architecture is a {{label: choice}} dict, got {type(arch).__name__} '
                        f'{brief(arch)}')
    mutables = space.simplify()
    missing = [label for label in mutables if label not in arch]
    extra = [label for label in arch if label not in mutables]
    if missing or extra:
        what = (f'misses {brief(missing[0])}' if missing else f'has {brief(extra[0])}, which the space does not have')
        raise ArchError(f'arch error: the architecture does not match space {brief(space_name)}: it {what} '
                        f'({len(missing)} missing, {len(extra)} unknown labels)')
    for label, mutable in mutables.items():
        try:
            error = mutable.check_contains(arch)
        except Exception as raised:  # a value of a type NNI does not expect (e.g. an object) may raise, not return
            error = raised
        if error is not None:
            raise ArchError(f'arch error: {brief(label)} = {brief(arch[label])} is not a choice of space '
                            f'{brief(space_name)}: {reason(error)}')


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
