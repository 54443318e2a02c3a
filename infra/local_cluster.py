"""A real two-node Ray cluster plus an MLflow server on this machine, on 127.0.0.1 and free ports chosen at start
— what a cluster looks like, small enough for a laptop and for the tests.

    .venv/bin/python infra/local_cluster.py /tmp/raymia-cluster     # start, print the addresses, wait for Ctrl-C

Head (``ray start --head``, 1 CPU, resource ``head_node``), worker (``ray start --address``, 1 CPU, resource
``worker_node``) and ``mlflow server`` (SQLite backend, local artifact root, artifacts proxied). Every process is
started here, remembered by PID (each ``ray start`` in its own process group) and stopped by PID — never with
``ray stop``, which would kill every Ray process on the machine. Ray's token auth stays on
(``RAY_AUTH_MODE=token``); clients read ``~/.ray/auth_token``. A node that fails to start is retried once on
fresh ports; if it fails again, the error carries ``ray start``'s own output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nothing listens on now, from the OS's ephemeral range (outside Ray's worker ports 10002-19999)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Ports:
    """The ports the cluster listens on: chosen free when the cluster starts, never fixed (a fixed port can still
    be held by a Ray instance an earlier test is shutting down)."""

    gcs: int = field(default_factory=free_port)
    dashboard: int = field(default_factory=free_port)
    client: int = field(default_factory=free_port)
    mlflow: int = field(default_factory=free_port)
    head_agent: int = field(default_factory=free_port)
    worker_agent: int = field(default_factory=free_port)
    head_metrics: int = field(default_factory=free_port)
    worker_metrics: int = field(default_factory=free_port)
    worker_node_manager: int = field(default_factory=free_port)


@dataclass
class LocalCluster:
    root: Path
    ports: Ports = field(default_factory=Ports)
    head_cpus: int = 1
    worker_cpus: int = 1
    _mlflow: subprocess.Popen | None = None
    _temp: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for Ray CLI clients and jobs of this cluster."""
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports.dashboard}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports.mlflow}"

    @property
    def temp_dir(self) -> Path:
        """Ray's session root: short, under /tmp — Unix socket paths inside it must stay under 108 bytes."""
        if self._temp is None:
            self._temp = Path(tempfile.mkdtemp(prefix="raymia-ray-", dir="/tmp"))
        return self._temp

    #: Ray system config for the nodes: a dead node is noticed after ~3 s instead of ~15 s (the default suits
    #: real networks; here every node is on one machine).
    FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                              "RAY_health_check_timeout_ms": "1000"}

    def _ray(self, what: str, *args: str) -> None:
        """``ray start ARGS``; a non-zero exit raises with ``ray start``'s own output."""
        done = subprocess.run([str(BIN / "ray"), "start", *args, "--disable-usage-stats"],
                              env={**self.env, **self.FAST_FAILURE_DETECTION}, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"`ray start` for the {what} exited {done.returncode}:\n{done.stdout[-2000:]}\n"
                               f"{done.stderr[-4000:]}")

    def _with_one_retry(self, what: str, start: Callable[[], None]) -> None:
        try:
            start()
        except RuntimeError as first:
            print(f"local cluster: the {what} failed to start, retrying once on fresh ports:\n{first}",
                  file=sys.stderr, flush=True)
            self._kill_session()
            time.sleep(5)  # let whatever held the ports finish exiting
            self.ports = Ports(mlflow=self.ports.mlflow)
            start()

    def _start_head(self) -> None:
        p = self.ports
        self._ray("head", "--head", "--node-ip-address=127.0.0.1", f"--port={p.gcs}", f"--num-cpus={self.head_cpus}",
                  "--num-gpus=0", f"--temp-dir={self.temp_dir}", "--dashboard-host=127.0.0.1",
                  f"--dashboard-port={p.dashboard}", f"--ray-client-server-port={p.client}",
                  f"--dashboard-agent-listen-port={p.head_agent}", f"--metrics-export-port={p.head_metrics}",
                  '--resources={"head_node": 1}')
        self.wait_for_nodes(1)

    def start(self) -> "LocalCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        self._with_one_retry("head node", self._start_head)
        self.start_worker()
        self._start_mlflow()
        return self

    def _start_worker(self) -> None:
        p = self.ports
        self._ray("worker node", f"--address=127.0.0.1:{p.gcs}", "--node-ip-address=127.0.0.1",
                  f"--num-cpus={self.worker_cpus}", "--num-gpus=0", f"--node-manager-port={p.worker_node_manager}",
                  f"--dashboard-agent-listen-port={p.worker_agent}", f"--metrics-export-port={p.worker_metrics}",
                  '--resources={"worker_node": 1}')
        self.wait_for_nodes(2)

    def start_worker(self) -> None:
        """Start (or restart) the worker node; one retry on fresh worker ports if it fails."""
        try:
            self._start_worker()
        except RuntimeError as first:
            print(f"local cluster: the worker node failed to start, retrying once:\n{first}", file=sys.stderr,
                  flush=True)
            self.kill_worker()
            time.sleep(5)
            p = self.ports
            p.worker_node_manager, p.worker_agent, p.worker_metrics = free_port(), free_port(), free_port()
            self._start_worker()

    def _start_mlflow(self) -> None:
        store = self.root / "mlflow"
        store.mkdir(exist_ok=True)
        self._mlflow = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.ports.mlflow),
             "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination",
             (store / "artifacts").as_uri(), "--serve-artifacts", "--workers", "1"],
            env=self.env, stdout=open(store / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_for_mlflow()

    def wait_for_mlflow(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server on {self.tracking_uri} did not come up; see {self.root}/mlflow/server.log")

    def stop_mlflow(self) -> None:
        if self._mlflow and self._mlflow.poll() is None:
            os.killpg(self._mlflow.pid, signal.SIGTERM)
            self._mlflow.wait(timeout=30)

    def restart_mlflow(self) -> None:
        self.stop_mlflow()
        self._start_mlflow()

    def alive_nodes(self) -> list[dict]:
        """Ray's view of the nodes (from the dashboard's REST API)."""
        req = urllib.request.Request(f"{self.dashboard}/nodes?view=summary")
        token = Path.home() / ".ray" / "auth_token"
        if token.is_file():
            req.add_header("Authorization", f"Bearer {token.read_text().strip()}")
        with urllib.request.urlopen(req, timeout=5) as r:
            summary = json.load(r)["data"]["summary"]
        return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if len(self.alive_nodes()) == n:
                    return
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the Ray cluster did not reach {n} alive nodes")

    def _pids(self, needle: str) -> list[int]:
        out = subprocess.run(["pgrep", "-f", needle], capture_output=True, text=True).stdout
        return [int(x) for x in out.split() if int(x) != os.getpid()]

    def kill_worker(self) -> None:
        """Kill the worker node's raylet (and with it its workers) the way a machine failure would."""
        for pid in self._pids(f"node_manager_port={self.ports.worker_node_manager}"):
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop everything started here, by PID: MLflow, then every process of this cluster's Ray session."""
        self.stop_mlflow()
        self._kill_session()
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None

    def _kill_session(self) -> None:
        """Every process of this cluster's Ray session (found by its temp dir and head port), by PID."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._pids(str(self.temp_dir)) + self._pids(f"127.0.0.1:{self.ports.gcs}")
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if pids:
                time.sleep(2)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/raymia-cluster").resolve()
    with LocalCluster(root) as cluster:
        print(f"Ray head 127.0.0.1:{cluster.ports.gcs}, dashboard {cluster.dashboard}, MLflow {cluster.tracking_uri}")
        print(f"submit with: RAY_AUTH_MODE=token ray job submit --address {cluster.dashboard} -- "
              f"{sys.executable} {Path(__file__).resolve().parents[1] / 'jobs' / 'audit.py'} CONFIG "
              f"--set tracking.uri={cluster.tracking_uri} --set output_dir={root / 'runs'}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
