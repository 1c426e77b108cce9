"""The ``nni-idarts`` command: search -> export -> retrain, driven by a YAML config (see :mod:`nni_idarts.config`).

    nni-idarts search CONFIG [--resume | --overwrite]   search; TensorBoard logs, checkpoints, arch.json in output_dir
    nni-idarts search CONFIG --webui                    the same search as one NNI trial, watched in NNI's web UI
    nni-idarts retrain CONFIG --arch FILE               train FILE's architecture from scratch, report test accuracy
    nni-idarts show FILE [--plot PNG]                   print (and draw) the architecture's cells and edges

Files in ``output_dir``: ``tensorboard/`` (event files), ``checkpoints/last.ckpt`` (the whole search state and the
config it was made with), ``arch.json`` (the exported architecture), ``config.yaml`` (the config with all defaults
filled in), ``probs.png`` (the architecture probabilities over the search), ``retrain.json`` (the retraining
result), ``search.log`` / ``retrain.log`` (what NNI and Lightning said; the console shows it only with
``--verbose``), ``nni/`` (NNI's experiment files), and the hidden ``.nni-idarts.lock`` and
``.nni-idarts-outputs.json`` (see :mod:`nni_idarts.rundir`). ``--webui`` adds ``webui/`` and ``webui.log``.

Every check (config, data, space, strategy, output folder, checkpoint for ``--resume``) runs before anything is
written. Exit codes: 0 done; 2 bad input (one line on stderr); 1 a run without a usable result (diverged, alphas
that never moved); 130 / 143 stopped by SIGINT / SIGTERM (after saving a checkpoint: ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .pipeline import InputError, ResultError

#: Exit code for bad input (the same as argparse's).
EXIT_BAD_INPUT = 2
#: Exit code for a run that ended without a usable result.
EXIT_NO_RESULT = 1

__all__ = ['main', 'InputError', 'EXIT_BAD_INPUT', 'EXIT_NO_RESULT']


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    from .checkpoint import atomic_write_bytes

    text = yaml.safe_dump(data, sort_keys=False)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def cmd_search(args: argparse.Namespace) -> int:
    from .arch import format_arch, save_arch
    from .checkpoint import RecordConfig, checkpoint_config
    from .config import load_config
    from .console import EpochProgressBar, format_summary, quiet
    from .pipeline import build, check_resumable, run_search
    from .plot import save_prob_trajectories
    from .rundir import RETRAIN_OUTPUTS, SEARCH_OUTPUTS, OutputDir

    if args.resume and args.overwrite:
        raise InputError('--resume continues the search in output_dir, --overwrite replaces it: give one of them')
    if args.webui:
        from .webui import search_in_webui
        return search_in_webui(args.config, port=args.port or 8080, keep=args.keep, resume=args.resume,
                               overwrite=args.overwrite)
    if args.port is not None or args.keep:
        raise InputError('--port and --keep go with --webui')
    config = load_config(args.config)
    out = OutputDir(config.output_dir)
    out.check_usable()
    checkpoints, tensorboard = out.path / 'checkpoints', out.path / 'tensorboard'
    last = checkpoints / 'last.ckpt'
    args.checkpoint = last
    if args.resume:
        if not last.is_file():
            raise InputError(f'--resume: no checkpoint at {last} (run the search without --resume first)')
        out.check_ours(SEARCH_OUTPUTS + RETRAIN_OUTPUTS)
        check_resumable(checkpoint_config(last), config, str(last))
    else:
        out.check_fresh(args.overwrite)
    prepared = build(config)

    # Everything is checked: from here on the output folder is written.
    progress = EpochProgressBar()
    started = time.monotonic()
    with out.locked():
        args.writing = True
        if not args.resume:
            out.check_fresh(args.overwrite)  # again, now that no other run can write here
            out.remove(SEARCH_OUTPUTS + RETRAIN_OUTPUTS)  # only what this tool wrote (see rundir.py)
        out.claim(SEARCH_OUTPUTS)
        _write_yaml(out.path / 'config.yaml', config.as_dict())
        with quiet(out.path / 'search.log', verbose=args.verbose) as log:
            result = run_search(prepared, config, workdir=str(out.path / 'nni'), tensorboard_dir=str(tensorboard),
                                checkpoint_dir=str(checkpoints), resume_from=str(last) if args.resume else None,
                                callbacks=[RecordConfig(config.as_dict()), args.stop, progress])
            out.remove(RETRAIN_OUTPUTS)  # it measured another architecture
            arch_path = out.path / 'arch.json'
            save_arch(arch_path, result.arch, space={'name': config.space_name, **config.space_knobs},
                      probs=result.probs)
            probs_png = save_prob_trajectories(tensorboard, out.path / 'probs.png')
    files = {'architecture': arch_path, 'probabilities over the search': probs_png or '(no prob/ scalars logged)',
             'TensorBoard logs': tensorboard, 'checkpoint': last, 'full log': log.path}
    print(format_summary(format_arch(result.arch, json.loads(arch_path.read_text()).get('probs')),
                         seconds=time.monotonic() - started, epochs=config.search['epochs'],
                         metrics=progress.epoch_means[-1] if progress.epoch_means else None, files=files, hidden=log))
    print(f'next: nni-idarts retrain {args.config} --arch {arch_path}   (draw it: nni-idarts show {arch_path} --plot '
          f'{out.path / "arch.png"})')
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from torch.utils.data import ConcatDataset

    from .arch import check_arch, load_arch_file
    from .checkpoint import atomic_write_json
    from .config import load_config
    from .console import quiet
    from .pipeline import build, run_retrain
    from .rundir import RETRAIN_OUTPUTS, OutputDir

    config = load_config(args.config)
    doc = load_arch_file(args.arch)
    # Size knobs may differ (DARTS retrains a wider, deeper network than it searched); the labels may not.
    searched_in = (doc['space'] or {}).get('name', config.space_name)
    if searched_in != config.space_name:
        raise InputError(f'arch error: {args.arch} was searched in space {searched_in!r}, but the config has space '
                         f'{config.space_name!r}')
    out = OutputDir(config.output_dir)
    out.check_usable()
    out.check_ours(RETRAIN_OUTPUTS)
    prepared = build(config)
    check_arch(doc['arch'], prepared.space, config.space_name)
    splits = prepared.splits
    with out.locked():
        out.claim(RETRAIN_OUTPUTS)
        with quiet(out.path / 'retrain.log', verbose=args.verbose):
            # As in DARTS, the final network trains on all the training data: the search's train and val parts.
            result = run_retrain(config, prepared.space, doc['arch'], ConcatDataset([splits.train, splits.val]),
                                 splits.test, splits.num_classes, callbacks=[args.stop])
        atomic_write_json(out.path / 'retrain.json', {
            'arch_file': str(args.arch), 'test_accuracy': result.accuracy, 'test_loss': result.loss,
            'num_parameters': result.num_parameters})
    print(f'test accuracy: {result.accuracy:.4f} (loss {result.loss:.4f}, {result.num_parameters} parameters, '
          f'{len(splits.test)} test examples); written to {out.path / "retrain.json"}')
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
    search.add_argument('--overwrite', action='store_true',
                        help="replace a previous search in output_dir (deletes only the files nni-idarts wrote)")
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


def _stopped(args: argparse.Namespace, signal_name: str) -> str:
    last = getattr(args, 'checkpoint', None)
    if args.command == 'search' and last is not None and Path(last).is_file():
        return f'stopped by {signal_name}; the search can continue with --resume (checkpoint {last})'
    if args.command == 'search' and getattr(args, 'writing', False):
        return f'stopped by {signal_name} before the first checkpoint; start the search again with --overwrite'
    return f'stopped by {signal_name}; nothing was written'


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import signal

    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from .arch import ArchError
    from .checkpoint import CheckpointError, Interrupted, StopOnSignal
    from .config import ConfigError
    from .data import DataError
    from .module import NonFiniteStepError
    from .rundir import OutputDirError

    prefix = f'nni-idarts {args.command}'
    args.stop = StopOnSignal()
    try:
        with args.stop.installed():
            return args.run(args)
    except (ConfigError, ArchError, DataError, InputError, OutputDirError) as error:
        print(f'{prefix}: {error}', file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckpointError as error:
        print(f'{prefix}: --resume: {error}', file=sys.stderr)
        return EXIT_BAD_INPUT
    except (NonFiniteStepError, ResultError) as error:  # NonFiniteHypergradientError is a NonFiniteStepError
        print(f'{prefix}: {args.command} failed: {error}', file=sys.stderr)
        return EXIT_NO_RESULT
    except Interrupted as stop:
        print(f'{prefix}: {_stopped(args, stop.signal_name)}', file=sys.stderr)
        return stop.exit_code
    except SIGTERMException:  # Lightning's (a SystemExit without a code, i.e. exit status 0): never a success
        print(f'{prefix}: {_stopped(args, "SIGTERM")}', file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == '__main__':
    sys.exit(main())
