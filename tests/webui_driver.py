"""Run ``nni-idarts search CONFIG --webui`` and collect what NNI's REST API says about it (inside ``unshare -n``).

    unshare -n python tests/webui_driver.py --config C --workdir W --result W/r.json [--screenshot PNG]

1. ``--webui --keep``: after the command returns, the experiment is still up; the driver reads the trial, its metrics
   and the experiment status through the REST API, optionally takes a screenshot of the web UI, then stops it.
2. ``--webui`` (unless ``--keep-only``): the command must stop the experiment itself.
``HOME`` (nnictl's experiment registry) is ``W/home``. test_webui.py asserts on the result file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from nnictl_driver import bring_up_loopback, screenshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nni_idarts.webui import rest  # noqa: E402


def reachable(port: int) -> bool:
    try:
        rest(port, 'check-status', timeout=3)
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', required=True)
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--result', required=True)
    parser.add_argument('--port', type=int, default=8080)
    parser.add_argument('--screenshot', default=None)
    parser.add_argument('--keep-only', action='store_true', help='skip the run without --keep')
    args = parser.parse_args(argv)

    bring_up_loopback()
    env = dict(os.environ, HOME=os.path.join(args.workdir, 'home'), PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    os.makedirs(env['HOME'], exist_ok=True)
    command = [sys.executable, '-m', 'nni_idarts.cli', 'search', args.config, '--webui']
    result: dict = {}
    try:
        kept = subprocess.run([*command, '--keep', '--port', str(args.port)], env=env, cwd=args.workdir,
                              capture_output=True, text=True, timeout=240)
        result['keep'] = {'returncode': kept.returncode, 'stdout': kept.stdout, 'stderr': kept.stderr[-4000:]}
        if reachable(args.port):
            result['keep'].update(experiment=rest(args.port, 'experiment'),
                                  status=rest(args.port, 'check-status')['status'],
                                  trials=rest(args.port, 'trial-jobs'), metrics=rest(args.port, 'metric-data'))
            if args.screenshot:
                result['keep']['screenshot'] = screenshot(args.port, args.screenshot)
            stop = subprocess.run([sys.executable, '-m', 'nni.tools.nnictl.nnictl', 'stop', '--all'], env=env,
                                  capture_output=True, text=True, timeout=120)
            result['keep']['stopped'] = stop.returncode == 0 and not reachable(args.port)
        if not args.keep_only:
            port = args.port + 2
            # The same output_dir again: a second search there must say --overwrite (nothing is replaced silently).
            plain = subprocess.run([*command, '--overwrite', '--port', str(port)], env=env, cwd=args.workdir,
                                   capture_output=True, text=True, timeout=240)
            result['plain'] = {'returncode': plain.returncode, 'stdout': plain.stdout,
                               'stderr': plain.stderr[-4000:], 'reachable_after': reachable(port)}
        return 0
    finally:
        with open(args.result, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    sys.exit(main())
