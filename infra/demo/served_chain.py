"""The demo's served chain: a Prefect server, one local Ray, and `blipdiff serve --chain` in a subprocess,
and the reads of the Prefect API by which the demo watches what the chain's triggers start."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


def deployment_runs(deployment: str) -> list:
    """The flow runs of a deployment (``flow/deployment``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])))


def flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


class ServedChain:
    """The chain being served: its `blipdiff serve` process, since when, and how to open its UI."""

    def __init__(self, process, how: str):
        self.process, self.how, self.started = process, how, time.time()


def wait_for(found, what: str, served: ServedChain, timeout: float = 1800):
    """Poll ``found`` until it returns something; fail if the served chain stops first."""
    deadline = time.monotonic() + timeout
    while not (result := found()):
        if served.process.poll() is not None:
            raise RuntimeError(f"blipdiff serve stopped while waiting for {what}: see its log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(2)
    return result


@contextmanager
def chain_served(out: Path, chain_file: Path, log: Callable[[str], None]):
    """A Prefect server (the demo's own, its state in OUT/prefect, unless PREFECT_API_URL names one), one
    local Ray that the runs join, and `blipdiff serve --chain` in a subprocess, all stopped at the end."""
    import os
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from blipdiff.infra.ray_cluster import connect_ray

    server = None
    api = os.environ.get("PREFECT_API_URL")
    if api is None:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start(timeout=300)
        api = server.api_url
        how = f"`blipdiff server --data {out}`, then open http://127.0.0.1:4200/runs"
    else:
        how = f"{api.removesuffix('/api')}/runs"
    import ray

    connect_ray()
    environment = {**os.environ, "PREFECT_API_URL": api, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    serve_log = out / "serve.log"
    with open(serve_log, "ab") as sink, temporary_settings({PREFECT_API_URL: api}):
        process = subprocess.Popen([sys.executable, "-m", "blipdiff.infra.cli", "serve", "--data", str(out),
                                    "--name", "demo", "--chain", str(chain_file)],
                                   env=environment, stdout=sink, stderr=sink, preexec_fn=_own_group_ending_with_parent)
        log(f"blipdiff serve --chain {chain_file} (pid {process.pid}; its log: {serve_log.resolve()})")
        served = ServedChain(process, how)
        try:
            wait_for(lambda: _deployed("build_pairs/demo", "pretrain/demo", "dreambench_eval/demo"),
                     "the served deployments", served, timeout=600)
            served.started = time.time()
            yield served
        finally:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            finally:
                if server is not None:
                    server.stop()


def _own_group_ending_with_parent() -> None:
    """In the child before it runs: a process group of its own (so the end stops its runs too), and a SIGTERM
    when the demo dies, even by SIGKILL, so no served chain outlives it."""
    import ctypes
    import os
    import signal

    os.setsid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _deployed(*names: str) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            for name in names:
                client.read_deployment_by_name(name)
        except Exception:
            return False
    return True
