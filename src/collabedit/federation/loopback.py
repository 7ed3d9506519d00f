"""A real Flower deployment on one machine: one SuperLink and N SuperNodes on 127.0.0.1.

For tests, benchmarks and drills. Every process is started in its own session and stopped by
PID; Flower starts some helpers detached (SuperExec, flwr-serverapp, flwr-clientapp), so `stop`
also ends any process whose command line names one of our ports or our folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from collabedit.federation.config import FLOWER_ENV

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pids_mentioning(needles: list[str]) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            out.append(int(proc.name))
    return out


class LoopbackDeployment:
    """`with LoopbackDeployment(work, node_configs) as d: d.run(app_dir); d.wait(summary)`."""

    def __init__(self, work: Path, node_configs: dict[int, dict], connect_timeout: float = 60):
        self.work = Path(work)
        self.node_configs = node_configs
        self.connect_timeout = connect_timeout
        self.procs: list[subprocess.Popen] = []
        self.link_port, *self.node_ports = free_ports(1 + len(node_configs))
        self.flwr_home = self.work / "flwr-home"
        self.logs = self.work / "logs"
        self.env = (
            os.environ
            | FLOWER_ENV
            | {
                "FLWR_HOME": str(self.flwr_home),
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.needles = [f"127.0.0.1:{p}" for p in (self.link_port, *self.node_ports)]
        self.needles.append(str(self.work))

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        p = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.work,
            start_new_session=True,
        )
        out.close()
        self.procs.append(p)
        return p

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode} ({what})")
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    def __enter__(self) -> LoopbackDeployment:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
        )
        try:
            self._start(
                "superlink",
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.link_port),
            )
            self.wait_for(lambda: port_open(self.link_port), self.connect_timeout, "SuperLink")
            for i, port in enumerate(self.node_ports):
                nc = self.node_configs[i]
                pairs = " ".join(f'{k}="{v}"' for k, v in nc.items())
                self._start(
                    f"supernode-{i}",
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.link_port}",
                    "--port",
                    str(port),
                    "--node-config",
                    pairs,
                )
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.work,
        )

    def run(self, app: Path, run_config: str | None = None) -> str:
        """`flwr run APP loopback`; returns the run id."""
        args = ["run", str(app), "loopback", "--format", "json"]
        if run_config:
            args += ["--run-config", run_config]
        done = self.flwr(*args)
        if done.returncode != 0:
            raise RuntimeError(f"flwr run failed: {done.stdout}{done.stderr}")
        started = json.loads(done.stdout)
        if not started.get("success"):
            raise RuntimeError(f"flwr run failed: {started}")
        return str(started["run-id"])

    def wait_summary(self, summary: Path, timeout: float, run_id: str | None = None) -> dict:
        """Wait until the ServerApp wrote a final summary.json; on timeout, Flower's run log."""

        def finished() -> bool:
            if not summary.is_file():
                return False
            return json.loads(summary.read_text())["status"] != "running"

        try:
            self.wait_for(finished, timeout, "the federation to finish")
        except (TimeoutError, RuntimeError) as exc:
            log = self.flwr("log", run_id, "loopback", "--show", timeout=60) if run_id else None
            tail = (log.stdout[-6000:] + log.stderr[-2000:]) if log else ""
            raise RuntimeError(f"{exc}\n{tail}") from None
        return json.loads(summary.read_text())

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for _ in range(5):  # detached helpers Flower started on our behalf
            left = pids_mentioning(self.needles)
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        left = pids_mentioning(self.needles)
        if left:
            raise RuntimeError(f"processes left behind: {left}")
