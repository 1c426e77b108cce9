"""``nni-idarts search CONFIG --webui``: the one search as a single NNI trial under ``nnictl``, watched in NNI's web UI.

NNI 3.0's web UI shows nothing of a one-shot ``NasExperiment``, which runs in-process. This runs the same search as
the only trial of an ``nnictl`` experiment instead (a grid search over one value, the config file), so the web UI
shows the trial, one intermediate result per search epoch (reported by the search module, see
:mod:`nni_idarts.reporting`), the final result, and, through its TensorBoard button, the search's TensorBoard logs.

The command starts the experiment, prints the URL, follows the trial until it ends, prints what NNI recorded, and
stops the experiment, or leaves it running for the web UI with ``keep`` (``nnictl stop <id>`` ends it).
NNI's manager listens on all network interfaces: anyone who can reach the port can see and control the experiment.

The trial itself runs ``python -m nni_idarts.webui CONFIG``: it takes NNI's parameters (which makes it the trial the
search reports to), links the search's TensorBoard folder into the trial's output folder (where the web UI looks),
and runs ``nni-idarts search CONFIG``. Files: ``output_dir/webui/`` (NNI's experiment folder, the trial's logs),
``output_dir/webui.log`` (nnictl's output) and the usual search files in ``output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

#: Trial states after which the trial runs no more (NNI's TrialJobStatus).
TRIAL_FINISHED = ('SUCCEEDED', 'FAILED', 'USER_CANCELED', 'SYS_CANCELED', 'EARLY_STOPPED')
#: Experiment states after which nothing more happens.
EXPERIMENT_FINISHED = ('DONE', 'STOPPED', 'ERROR')


def rest(port: int, route: str, timeout: float = 10) -> Any:
    """GET ``/api/v1/nni/<route>`` of the NNI manager on this machine's ``port``."""
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/api/v1/nni/{route}', timeout=timeout) as response:
        return json.load(response)


def metric_value(entry: dict[str, Any]) -> Any:
    """What a trial reported, from one entry of ``metric-data`` (JSON-encoded twice by NNI)."""
    value = json.loads(entry['data'])
    return json.loads(value) if isinstance(value, str) else value


def experiment_config(config_path: str | Path, output_dir: Path, *, python: str = sys.executable,
                      resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """The nnictl experiment: one trial that runs the search of ``config_path``."""
    config_path = Path(config_path).resolve()
    command = f'{shlex.quote(python)} -m nni_idarts.webui {shlex.quote(str(config_path))}'
    return {
        'experimentName': f'nni-idarts search {config_path.name}',
        'trialCommand': command + (' --resume' if resume else '') + (' --overwrite' if overwrite else ''),
        # The trial runs here, so that a relative output_dir in the config means the same folder.
        'trialCodeDirectory': os.getcwd(),
        'trialConcurrency': 1,
        'maxTrialNumber': 1,
        # One grid point, the config: NNI needs a tuner, and the web UI lists it as the trial's parameter.
        'searchSpace': {'config': {'_type': 'choice', '_value': [str(config_path)]}},
        'tuner': {'name': 'GridSearch'},
        'trainingService': {'platform': 'local'},
        'experimentWorkingDirectory': str(output_dir / 'webui'),
    }


def _nnictl(*args: str) -> list[str]:
    return [sys.executable, '-m', 'nni.tools.nnictl.nnictl', *args]


def _stop(experiment_id: str, port: int, log: Any) -> bool:
    """``nnictl stop``; True if the manager no longer answers."""
    stopped = subprocess.run(_nnictl('stop', experiment_id), capture_output=True, text=True, timeout=120)
    log.write(stopped.stdout + stopped.stderr)
    try:
        rest(port, 'check-status', timeout=3)
    except OSError:
        return True
    return False


def search_in_webui(config_path: str, *, port: int = 8080, keep: bool = False, resume: bool = False,
                    overwrite: bool = False, poll_seconds: float = 2.0) -> int:
    """Run the search of ``config_path`` as a single nnictl trial; the exit code of ``nni-idarts search``."""
    import yaml

    from .cli import InputError
    from .config import load_config
    from .rundir import OutputDir

    if not 1 <= port <= 65535:
        raise InputError(f'--port must be between 1 and 65535; got {port}')
    config = load_config(config_path)  # bad input ends here, before NNI starts
    # The trial's search checks all of this again; checked here too so that it is one line, not a FAILED trial.
    output = OutputDir(config.output_dir)
    output.check_usable()
    if not resume:
        output.check_fresh(overwrite)
    out = Path(config.output_dir).resolve()
    (out / 'webui').mkdir(parents=True, exist_ok=True)
    experiment_file = out / 'webui' / 'experiment.yml'
    experiment_file.write_text(yaml.safe_dump(experiment_config(config_path, out, resume=resume, overwrite=overwrite), sort_keys=False))
    print(f'warning: NNI\'s manager listens on all network interfaces: anyone who can reach port {port} of this '
          'machine can see and control the experiment while it runs.', file=sys.stderr)
    with open(out / 'webui.log', 'a') as log:
        created = subprocess.run(_nnictl('create', '--config', str(experiment_file), '--port', str(port)),
                                 capture_output=True, text=True, timeout=180)
        log.write(created.stdout + created.stderr)
        try:
            experiment_id = rest(port, 'experiment')['id'] if created.returncode == 0 else None
        except OSError:
            experiment_id = None
        if experiment_id is None:
            lines = [line for line in (created.stdout + created.stderr).splitlines() if line.strip()]
            print(f'nni-idarts search: nnictl create failed (exit {created.returncode}): '
                  f'{lines[-1] if lines else "no output"} (full output in {out / "webui.log"})', file=sys.stderr)
            return 1
        url = f'http://localhost:{port}'
        print(f'NNI web UI: {url}   (experiment {experiment_id}; the trial\'s files in {out / "webui" / experiment_id})')
        stopped = False
        try:
            trial, shown = _follow(port, poll_seconds)
            metrics = rest(port, 'metric-data')
        except OSError as error:
            _stop(experiment_id, port, log)
            print(f'nni-idarts search: lost the NNI manager on port {port} ({error}); its log: '
                  f'{out / "webui" / experiment_id / "log"}', file=sys.stderr)
            return 1
        except BaseException:
            _stop(experiment_id, port, log)  # Ctrl-C: do not leave the experiment behind
            raise
        if not keep:
            stopped = _stop(experiment_id, port, log)

    final = [metric_value(m) for m in metrics if m['type'] == 'FINAL']
    status = trial['status'] if trial else 'never started'
    print(f'trial {status}: {shown} intermediate results, final result '
          f'{json.dumps(final[-1]) if final else "none"}')
    if keep:
        print(f'the experiment stays viewable at {url}; stop it with: nnictl stop {experiment_id}')
    elif stopped:
        print('experiment stopped')
    else:
        print(f'warning: the NNI manager still answers on port {port}; stop it with: nnictl stop {experiment_id}',
              file=sys.stderr)
    if status != 'SUCCEEDED':
        print(f'nni-idarts search: the trial did not succeed ({status}); its log: '
              f'{out / "webui" / experiment_id / "trials"}', file=sys.stderr)
        return 1
    print(f'architecture written to {out / "arch.json"}')
    return 0


def _follow(port: int, poll_seconds: float) -> tuple[dict[str, Any] | None, int]:
    """Print the trial's state changes and intermediate results until it has finished; (the trial, #results)."""
    state, shown, trial = None, 0, None
    while True:
        trials = rest(port, 'trial-jobs')
        trial = trials[0] if trials else None
        if trial and trial['status'] != state:
            state = trial['status']
            print(f'trial {trial["trialJobId"]}: {state}')
        periodical = sorted((m for m in rest(port, 'metric-data') if m['type'] == 'PERIODICAL'),
                            key=lambda m: int(m['sequence']))
        for entry in periodical[shown:]:
            value = metric_value(entry)
            parts = ', '.join(f'{k}={v:.4f}' for k, v in value.items() if k != 'default' and isinstance(v, float))
            print(f'  epoch {entry["sequence"]}: {parts}')
        shown = max(shown, len(periodical))
        if (trial and state in TRIAL_FINISHED) or rest(port, 'check-status')['status'] in EXPERIMENT_FINISHED:
            return trial, shown
        time.sleep(poll_seconds)


def trial_main(argv: Sequence[str] | None = None) -> int:
    """The trial: become NNI's current trial, link the TensorBoard logs for the web UI, run the search."""
    import nni

    from .cli import main
    from .config import load_config

    parser = argparse.ArgumentParser(prog='python -m nni_idarts.webui', description='the trial of --webui')
    parser.add_argument('config')
    parser.add_argument('--resume', action='store_true')
    parser.add_argument('--overwrite', action='store_true')
    args = parser.parse_args(argv)
    nni.get_next_parameter()  # the search module reports to the trial whose parameters are current
    trial_dir = os.environ.get('NNI_OUTPUT_DIR')
    if trial_dir:
        # The web UI's TensorBoard button looks in <trial output dir>/tensorboard.
        link = Path(trial_dir) / 'tensorboard'
        if not link.exists() and not link.is_symlink():
            link.symlink_to(Path(load_config(args.config).output_dir).resolve() / 'tensorboard',
                            target_is_directory=True)
    return main(['search', args.config, *(['--resume'] if args.resume else []),
                 *(['--overwrite'] if args.overwrite else [])])


if __name__ == '__main__':
    sys.exit(trial_main())
