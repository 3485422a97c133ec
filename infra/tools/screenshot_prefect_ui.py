"""Screenshots of the Prefect UI: blipdiff's deployments, a completed build_pairs run, a dreambench_eval run,
the chain's triggers on the Automations page, and one chain of runs.

    python infra/tools/screenshot_prefect_ui.py [--data /tmp/blipdiff-ui] [--port 4311]

Starts `blipdiff server` on 127.0.0.1, serves the deployments with `blipdiff serve` (dreambench_eval on a
nightly schedule, Europe/Paris), runs the demo against that server (the demo serves its chain, whose
triggers start the pre-training and the two evaluations), then has headless Chromium (Debian's
`chromium`) capture into docs/img/ the deployments page, the completed build_pairs run, the markdown
artifact of the latest dreambench_eval run (its trend table and plot), the Automations page and the runs
page with the chain. Everything it starts, it stops.
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

from blipdiff.flows.dreambench_eval import DreamBenchEvalParameters
from blipdiff.infra.tools.screenshots import IMAGES, find_chromium, screenshot, wait_for

BLIPDIFF = Path(sys.executable).parent / "blipdiff"


def post(url: str, body: dict) -> list:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def write_eval_parameters(data: Path) -> Path:
    """The nightly dreambench_eval's defaults: the demo's run and benchmark (serving needs no path to exist)."""
    demo = data / "demo"
    parameters = DreamBenchEvalParameters(
        training_run=demo / "runs" / "demo", eval_root=demo / "evals", dreambench=demo / "sample" / "dreambench",
        prompts=3, images_per_prompt=2, steps=10, resolution=32, dino=str(demo / "models" / "dino"),
        clip=str(demo / "models" / "clip"))
    target = data / "nightly-eval.json"
    target.write_text(parameters.model_dump_json(indent=2))
    return target


def latest_completed_run(api: str, flow_name: str) -> dict:
    # By flow name: the demo runs three flows, and each screenshot shows one of them.
    runs = post(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}},
                                             "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                                             "sort": "END_TIME_DESC", "limit": 1})
    if not runs:
        sys.exit(f"no completed {flow_name} run to show")
    return runs[0]


def artifact_id(api: str, flow_run: dict, key: str) -> str:
    artifacts = post(f"{api}/artifacts/filter", {"artifacts": {"key": {"any_": [key]},
                                                                "flow_run_id": {"any_": [flow_run["id"]]}},
                                                  "sort": "CREATED_DESC", "limit": 1})
    if not artifacts:
        sys.exit(f"flow run {flow_run['name']} has no {key} artifact")
    return artifacts[0]["id"]


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
        started.append(subprocess.Popen([str(BLIPDIFF), "serve", "--data", str(args.data), "--cron", "0 2 * * *",
                                         "--eval-parameters", str(write_eval_parameters(args.data)),
                                         "--eval-cron", "0 2 * * *", "--timezone", "Europe/Paris"],
                                        env=environment, start_new_session=True, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        # Once: the chain evaluates both checkpoints, so the second evaluation has a trend of two runs.
        demo = subprocess.run([str(BLIPDIFF), "demo", "--out", str(args.data / "demo")], env=environment,
                              capture_output=True, text=True, timeout=900)
        if demo.returncode != 0:
            sys.exit(f"the demo failed:\n{demo.stderr[-3000:]}")
        build_pairs = latest_completed_run(api, "build_pairs")
        evaluation = artifact_id(api, latest_completed_run(api, "dreambench_eval"), "dreambench-eval")
        IMAGES.mkdir(parents=True, exist_ok=True)
        base = f"http://127.0.0.1:{args.port}"
        screenshot(chromium, f"{base}/deployments", IMAGES / "prefect-deployments.png")
        screenshot(chromium, f"{base}/runs/flow-run/{build_pairs['id']}", IMAGES / "prefect-build-pairs-run.png")
        # The flow run's page opens on its logs; the artifact's page renders the markdown, beside the flow run
        # it belongs to. Tall enough for the trend table, the plot and the per-subject deltas.
        screenshot(chromium, f"{base}/artifacts/artifact/{evaluation}", IMAGES / "prefect-dreambench-eval-run.png",
                   size="1440,1200")
        # The automations list renders after its own requests: a longer virtual-time budget.
        screenshot(chromium, f"{base}/automations", IMAGES / "prefect-automations.png", size="1440,700",
                   budget_ms=60000)
        screenshot(chromium, f"{base}/runs", IMAGES / "prefect-chain-runs.png", size="1440,1100")
    finally:
        for process in reversed(started):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
