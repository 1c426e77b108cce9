"""Run examples/nnictl/config.yml with ``nnictl create`` and collect what NNI's REST API says about it.

Meant to run inside a network namespace that has only loopback (NNI's manager listens on every interface), e.g.

    unshare -n python tests/nnictl_driver.py --workdir /tmp/x --result /tmp/x/r.json

(a new network namespace's loopback is down; the driver brings it up).
The experiment directory, the config copy and ``HOME`` (nnictl keeps its experiment registry there) all live in
``--workdir``. The driver polls ``/api/v1/nni/check-status`` until the experiment is DONE (or fails or times out),
writes the trials, metrics, per-trial ``arch.json``/``result.json`` and, on failure, log tails to ``--result``,
optionally takes a screenshot of the web UI with headless Chromium, and always ends with ``nnictl stop``.
test_nnictl.py asserts on the result file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, 'examples', 'nnictl')
FINISHED = ('DONE', 'STOPPED', 'ERROR')  # NO_MORE_TRIAL: all submitted, the last still running


def bring_up_loopback() -> None:
    """``ip link set lo up`` without iproute2 (a no-op where ``lo`` is up already)."""
    import fcntl
    import socket
    import struct
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack('16sH22x', b'lo', 0)  # struct ifreq: the name, then the flags
        flags = struct.unpack('16sH22x', fcntl.ioctl(sock, siocgifflags, ifreq))[1]
        if not flags & iff_up:
            fcntl.ioctl(sock, siocsifflags, struct.pack('16sH22x', b'lo', flags | iff_up))


def prepare_config(workdir: str, python: str, max_trials: int | None) -> str:
    """The example config, with the trial's interpreter, absolute paths and everything NNI writes under ``workdir``."""
    with open(os.path.join(EXAMPLE, 'config.yml')) as f:
        config = yaml.safe_load(f)
    config['trialCommand'] = f'{shlex.quote(python)} -m nni_idarts.trial'
    config['trialCodeDirectory'] = REPO
    config['searchSpaceFile'] = os.path.join(EXAMPLE, config['searchSpaceFile'])
    config['experimentWorkingDirectory'] = os.path.join(workdir, 'experiments')
    if max_trials is not None:
        config['maxTrialNumber'] = max_trials
    path = os.path.join(workdir, 'config.yml')
    with open(path, 'w') as f:
        yaml.safe_dump(config, f)
    return path


def get(port: int, route: str) -> Any:
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/api/v1/nni/{route}', timeout=10) as response:
        return json.load(response)


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError:
        return ''


def screenshot(port: int, path: str, tab: str = 'Intermediate result') -> str:
    """Headless Chromium's picture of the web UI's trial page with ``tab`` open; returns a short log.

    Chromium is driven over its DevTools protocol (on loopback, in this namespace) to click the tab, since
    ``--screenshot`` alone cannot.
    """
    import base64

    from websockets.sync.client import connect

    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    if chromium is None:
        return 'chromium not found'
    profile = tempfile.mkdtemp(prefix='chromium-profile-')
    devtools_port = port + 1
    browser = subprocess.Popen(
        [chromium, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
         '--disable-component-update', '--no-first-run', f'--user-data-dir={profile}', '--hide-scrollbars',
         '--window-size=1400,1250', f'--remote-debugging-port={devtools_port}', 'about:blank'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = []
    try:
        pages: list = []
        for _ in range(100):
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{devtools_port}/json/list', timeout=2) as r:
                    pages = [p for p in json.load(r) if p.get('type') == 'page']
                if pages:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        with connect(pages[0]['webSocketDebuggerUrl'], max_size=None) as ws:
            ids = iter(range(1, 10**6))

            def call(method: str, **params: Any) -> Any:
                number = next(ids)
                ws.send(json.dumps({'id': number, 'method': method, 'params': params}))
                while True:
                    message = json.loads(ws.recv(timeout=60))
                    if message.get('id') == number:
                        return message.get('result', {})

            def evaluate(expression: str) -> Any:
                return call('Runtime.evaluate', expression=expression, returnByValue=True)['result'].get('value')

            def wait_for(expression: str, seconds: float = 30) -> bool:
                deadline = time.time() + seconds
                while time.time() < deadline:
                    if evaluate(expression):
                        return True
                    time.sleep(0.5)
                return False

            call('Page.navigate', url=f'http://127.0.0.1:{port}/detail')
            loaded = wait_for('document.body.innerText.includes("SUCCEEDED")')
            log.append(f'trial table loaded: {loaded}')
            clicked = evaluate(
                '(() => { const t = [...document.querySelectorAll("button, [role=tab], span")]'
                f'.find(e => e.textContent.trim() === {json.dumps(tab)});'
                ' if (!t) return false; (t.closest("button") || t).click(); return true; })()')
            log.append(f'clicked {tab!r}: {clicked}')
            time.sleep(3)  # the chart animates in
            png = call('Page.captureScreenshot', format='png')['data']
        with open(path, 'wb') as f:
            f.write(base64.b64decode(png))
        log.append(f'wrote {path}')
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    return '\n'.join(log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--result', required=True, help='JSON file for what the REST API and the trials reported')
    parser.add_argument('--python', default=sys.executable, help='interpreter of the trials')
    parser.add_argument('--max-trials', type=int, default=None, help='override maxTrialNumber of the example')
    parser.add_argument('--port', type=int, default=8080)
    parser.add_argument('--timeout', type=float, default=240.0, help='seconds to wait for the experiment')
    parser.add_argument('--screenshot', default=None, help='PNG of the web UI trial page once the trials are done')
    args = parser.parse_args(argv)

    bring_up_loopback()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(os.path.join(workdir, 'home'), exist_ok=True)
    config = prepare_config(workdir, args.python, args.max_trials)
    env = dict(os.environ, HOME=os.path.join(workdir, 'home'), PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    nnictl = [args.python, '-m', 'nni.tools.nnictl.nnictl']
    result: dict[str, Any] = {'config': config, 'status': None, 'trials': [], 'metrics': [], 'outputs': {}}
    start = time.time()
    experiment_id = None
    try:
        created = subprocess.run([*nnictl, 'create', '--config', config, '--port', str(args.port)], env=env,
                                 capture_output=True, text=True, timeout=120)
        result['create_output'] = created.stdout[-4000:] + created.stderr[-4000:]
        if created.returncode != 0:
            return 1
        experiment_id = get(args.port, 'experiment')['id']
        result['experiment_id'] = experiment_id
        result['create_seconds'] = time.time() - start
        while time.time() - start < args.timeout:
            result['status'] = get(args.port, 'check-status')['status']
            if result['status'] in FINISHED:
                break
            time.sleep(2)
        result['seconds'] = time.time() - start
        result['trials'] = get(args.port, 'trial-jobs')
        result['metrics'] = get(args.port, 'metric-data')
        experiment_dir = os.path.join(workdir, 'experiments', experiment_id)
        for trial in result['trials']:
            trial_dir = trial['logPath'].removeprefix('file://')  # the trial's NNI_OUTPUT_DIR
            result['outputs'][trial['trialJobId']] = {
                'arch': read_json(os.path.join(trial_dir, 'arch.json')),
                'result': read_json(os.path.join(trial_dir, 'result.json')),
                'stderr_tail': '' if trial['status'] == 'SUCCEEDED' else tail(os.path.join(trial_dir, 'trial.stderr')),
            }
        if result['status'] != 'DONE':
            result['manager_log_tail'] = tail(os.path.join(experiment_dir, 'log', 'nnimanager.log'))
        if args.screenshot:
            result['screenshot_output'] = screenshot(args.port, args.screenshot)
        return 0
    finally:
        if experiment_id is not None:
            stopped = subprocess.run([*nnictl, 'stop', experiment_id], env=env, capture_output=True, text=True,
                                     timeout=120)
            result['stop_returncode'] = stopped.returncode
            try:
                get(args.port, 'check-status')
                result['reachable_after_stop'] = True
            except OSError:
                result['reachable_after_stop'] = False
        with open(args.result, 'w') as f:
            json.dump(result, f, indent=2)


if __name__ == '__main__':
    sys.exit(main())
