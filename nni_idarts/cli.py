"""The ``nni-idarts`` command: search -> export -> retrain, driven by a YAML config (see :mod:`nni_idarts.config`).

    nni-idarts search CONFIG [--resume]      search; TensorBoard logs, checkpoints and arch.json in output_dir
    nni-idarts search CONFIG --webui         the same search as one NNI trial, watched in NNI's web UI
    nni-idarts retrain CONFIG --arch FILE    train the architecture in FILE from scratch, report test accuracy
    nni-idarts show FILE [--plot PNG]        print (and draw) the architecture's cells and edges

Files in ``output_dir``: ``tensorboard/`` (event files), ``checkpoints/last.ckpt`` (the whole search state),
``arch.json`` (the exported architecture), ``config.yaml`` (the config with all defaults filled in),
``retrain.json`` (the retraining result), ``probs.png`` (the architecture probabilities over the search),
``search.log`` / ``retrain.log`` (what NNI and Lightning said; the console shows it only with ``--verbose``).

Bad input (config, architecture file, data files) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

#: Exit code for bad input (the same as argparse's).
EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad input found while running a command (a one-line message)."""


def _build(config: Any) -> tuple[Any, Any]:
    """The data splits and a fresh model space for ``config`` (weights initialised from the search seed)."""
    import pytorch_lightning as pl
    from search_spaces import build_space

    from .data import load_splits

    splits = load_splits(**config.data)
    in_channels = int(splits.train[0][0].shape[0])
    seed = config.search['seed']
    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)  # the supernet's initial weights come from this seed
    return splits, build_space(config.space_name, in_channels=in_channels, num_classes=splits.num_classes,
                               **config.space_knobs)


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    from .checkpoint import atomic_write_bytes

    text = yaml.safe_dump(data, sort_keys=False)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def cmd_search(args: argparse.Namespace) -> int:
    from .arch import format_arch, save_arch
    from .config import load_config
    from .console import EpochProgressBar, format_summary, quiet
    from .plot import save_prob_trajectories
    from .search import search
    from .strategy import IDartsStrategy

    if args.webui:
        from .webui import search_in_webui
        return search_in_webui(args.config, port=args.port or 8080, keep=args.keep, resume=args.resume)
    if args.port is not None or args.keep:
        raise InputError('--port and --keep go with --webui')
    config = load_config(args.config)
    out = Path(config.output_dir)
    checkpoints, tensorboard = out / 'checkpoints', out / 'tensorboard'
    last = checkpoints / 'last.ckpt'
    if args.resume and not last.is_file():
        raise InputError(f'--resume: no checkpoint at {last} (run the search without --resume first)')
    if not args.resume:
        # A fresh search starts a fresh record: old events and checkpoints would mix with the new ones.
        shutil.rmtree(checkpoints, ignore_errors=True)
        shutil.rmtree(tensorboard, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_yaml(out / 'config.yaml', config.as_dict())

    splits, space = _build(config)
    try:
        strategy = IDartsStrategy(**config.strategy)
    except ValueError as error:
        raise InputError(f'config error: strategy: {error}') from error
    options = dict(config.search)
    progress = EpochProgressBar()
    trainer_kwargs = {'log_every_n_steps': options.pop('log_every_n_steps'), 'accelerator': options.pop('accelerator'),
                      'callbacks': [progress]}
    started = time.monotonic()
    with quiet(out / 'search.log', verbose=args.verbose) as log:
        result = search(space, splits.train, splits.val, strategy, num_classes=splits.num_classes,
                        workdir=str(out / 'nni'), tensorboard_dir=str(tensorboard), checkpoint_dir=str(checkpoints),
                        resume_from=str(last) if args.resume else None,
                        trainer_kwargs=trainer_kwargs, **options)
        arch_path = out / 'arch.json'
        save_arch(arch_path, result.arch, space={'name': config.space_name, **config.space_knobs}, probs=result.probs)
        probs_png = save_prob_trajectories(tensorboard, out / 'probs.png')
    files = {'architecture': arch_path, 'probabilities over the search': probs_png or '(no prob/ scalars logged)',
             'TensorBoard logs': tensorboard, 'checkpoint': last, 'full log': log.path}
    print(format_summary(format_arch(result.arch, json.loads(arch_path.read_text()).get('probs')),
                         seconds=time.monotonic() - started, epochs=options['epochs'],
                         metrics=progress.epoch_means[-1] if progress.epoch_means else None, files=files, hidden=log))
    print(f'next: nni-idarts retrain {args.config} --arch {arch_path}   (draw it: nni-idarts show {arch_path} --plot '
          f'{out / "arch.png"})')
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from torch.utils.data import ConcatDataset

    from .arch import check_arch, load_arch_file
    from .checkpoint import atomic_write_json
    from .config import load_config
    from .console import quiet
    from .retrain import retrain

    config = load_config(args.config)
    doc = load_arch_file(args.arch)
    # Size knobs may differ (DARTS retrains a wider, deeper network than it searched); the labels may not.
    searched_in = (doc['space'] or {}).get('name', config.space_name)
    if searched_in != config.space_name:
        raise InputError(f'arch error: {args.arch} was searched in space {searched_in!r}, but the config has space '
                         f'{config.space_name!r}')
    splits, space = _build(config)
    check_arch(doc['arch'], space, config.space_name)
    # As in DARTS, the final network trains on all the training data: the search's train and val parts.
    options = dict(config.retrain)
    trainer_kwargs = {'logger': False, 'accelerator': options.pop('accelerator')}
    out = Path(config.output_dir)
    with quiet(out / 'retrain.log', verbose=args.verbose):
        result = retrain(space, doc['arch'], ConcatDataset([splits.train, splits.val]), splits.test,
                         num_classes=splits.num_classes, trainer_kwargs=trainer_kwargs, **options)
    atomic_write_json(out / 'retrain.json', {'arch_file': str(args.arch), 'test_accuracy': result.accuracy,
                                             'test_loss': result.loss, 'num_parameters': result.num_parameters})
    print(f'test accuracy: {result.accuracy:.4f} (loss {result.loss:.4f}, {result.num_parameters} parameters, '
          f'{len(splits.test)} test examples); written to {out / "retrain.json"}')
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .arch import format_arch, load_arch_file

    doc = load_arch_file(args.arch)
    if doc['space'] is not None:
        space = dict(doc['space'])
        knobs = ', '.join(f'{k}={v}' for k, v in space.items() if k != 'name')
        print(f'space: {space.get("name")} ({knobs})')
    print(format_arch(doc['arch'], doc['probs']))
    if args.plot:
        from .plot import draw_arch
        try:
            drawn = draw_arch(doc['arch'], doc['probs'], args.plot, doc['space'])
        except ValueError as error:
            raise InputError(f'--plot: {error}') from error
        except OSError as error:
            raise InputError(f'--plot: cannot write {args.plot}: {error.strerror or error}') from error
        print(f'{drawn} written to {args.plot}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='nni-idarts', description='iDARTS search -> export -> retrain, driven by a '
                                     'YAML config (see examples/configs/).')
    commands = parser.add_subparsers(dest='command', required=True)
    search = commands.add_parser('search', help='search a space; writes TensorBoard logs, checkpoints, arch.json')
    search.add_argument('config', help='YAML config')
    search.add_argument('--resume', action='store_true', help="continue from output_dir's checkpoints/last.ckpt")
    search.add_argument('--verbose', action='store_true', help="also show NNI's and Lightning's messages (always in "
                        'output_dir/search.log)')
    search.add_argument('--webui', action='store_true', help="run the search as one NNI trial under nnictl, to watch it "
                        "in NNI's web UI (NNI's manager listens on all network interfaces)")
    search.add_argument('--port', type=int, default=None, help='--webui: the web UI port (default 8080)')
    search.add_argument('--keep', action='store_true', help='--webui: leave the experiment viewable after the search '
                        '(stop it with nnictl stop)')
    search.set_defaults(run=cmd_search)
    retrain = commands.add_parser('retrain', help='train an exported architecture from scratch; report test accuracy')
    retrain.add_argument('config', help='YAML config (space, data, retrain sections)')
    retrain.add_argument('--arch', required=True, help='architecture JSON written by `nni-idarts search`')
    retrain.add_argument('--verbose', action='store_true', help="also show NNI's and Lightning's messages (always in "
                         'output_dir/retrain.log)')
    retrain.set_defaults(run=cmd_retrain)
    show = commands.add_parser('show', help="print an architecture's cells and edges")
    show.add_argument('arch', help='architecture JSON')
    show.add_argument('--plot', metavar='PNG', help='draw the cells as graphs (or, for other spaces, the probabilities '
                      'as bars) into this PNG file')
    show.set_defaults(run=cmd_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .arch import ArchError
    from .config import ConfigError
    from .data import DataError
    from .module import NonFiniteStepError

    try:
        return args.run(args)
    except (ConfigError, ArchError, DataError, InputError) as error:
        print(f'nni-idarts {args.command}: {error}', file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteStepError as error:  # also NonFiniteHypergradientError, its subclass
        print(f'nni-idarts {args.command}: search stopped: {error}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
