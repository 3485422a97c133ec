"""Screenshots of the Prefect UI with blipdiff's deployments and a completed build_pairs run.

    python infra/screenshot_prefect_ui.py [--data /tmp/blipdiff-ui] [--port 4311]

Starts `blipdiff server` on 127.0.0.1, serves the deployments with `blipdiff serve`, runs the demo
against that server, then has headless Chromium (Debian's `chromium`) capture the deployments page
and the completed run into docs/img/. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from blipdiff.infra.screenshots import IMAGES, find_chromium, screenshot, wait_for

BLIPDIFF = Path(sys.executable).parent / "blipdiff"


def post(url: str, body: dict) -> list:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "blipdiff-ui")
    parser.add_argument("--port", type=int, default=4311)
    args = parser.parse_args()
    chromium = find_chromium()
    api = f"http://127.0.0.1:{args.port}/api"
    environment = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_HOME": str(args.data / "prefect")}
    started = []
    try:
        server_env = {k: v for k, v in environment.items() if k != "PREFECT_API_URL"}
        server_env["PREFECT_UI_API_URL"] = api
        args.data.mkdir(parents=True, exist_ok=True)
        server_log = open(args.data / "server.log", "w")
        started.append(subprocess.Popen([str(BLIPDIFF), "server", "--data", str(args.data), "--port", str(args.port)],
                                        env=server_env, start_new_session=True, stdout=server_log,
                                        stderr=subprocess.STDOUT))
        wait_for(f"{api}/health", 180)
        started.append(subprocess.Popen([str(BLIPDIFF), "serve", "--data", str(args.data), "--cron", "0 2 * * *"],
                                        env=environment, start_new_session=True, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        demo = subprocess.run([str(BLIPDIFF), "demo", "--out", str(args.data / "demo")], env=environment,
                              capture_output=True, text=True, timeout=900)
        if demo.returncode != 0:
            sys.exit(f"the demo failed:\n{demo.stderr[-3000:]}")
        runs = post(f"{api}/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                                                 "sort": "END_TIME_DESC", "limit": 1})
        if not runs:
            sys.exit("no completed flow run to show")
        IMAGES.mkdir(parents=True, exist_ok=True)
        base = f"http://127.0.0.1:{args.port}"
        screenshot(chromium, f"{base}/deployments", IMAGES / "prefect-deployments.png")
        screenshot(chromium, f"{base}/runs/flow-run/{runs[0]['id']}", IMAGES / "prefect-build-pairs-run.png")
    finally:
        for process in reversed(started):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
