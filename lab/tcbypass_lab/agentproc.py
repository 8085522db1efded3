"""`tcbypass agent` as a child process on an emulated node, as a DaemonSet runs it.

The tests, the scale bench and the soak start it the same way: the node's
OVSDB and OVS namespace on the command line, metrics on a free local port,
its log in a file, and SIGKILL for it if we die (pdeathsig). What an
operator would watch is read from outside: the metrics endpoint, and the
process's RSS, file descriptors, threads and CPU time from /proc.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable


def cli_command() -> list[str]:
    """How a node hook runs tcbypass: the console script next to this Python, else -m."""
    script = os.path.join(os.path.dirname(sys.executable), "tcbypass")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "tcbypass"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def memory_of(pid: int) -> dict:
    """VmRSS and VmHWM of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mib": out.get("VmRSS"), "hwm_mib": out.get("VmHWM")}


@dataclass(frozen=True)
class Usage:
    """What the agent process holds at one moment."""

    rss_mib: float
    fds: int
    threads: int
    cpu_s: float


def usage_of(pid: int) -> Usage:
    return Usage(rss_mib=memory_of(pid)["rss_mib"] or 0.0, fds=len(os.listdir(f"/proc/{pid}/fd")),
                 threads=len(os.listdir(f"/proc/{pid}/task")), cpu_s=cpu_seconds_of(pid))


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of a Prometheus text page: 'name{labels}' (as written) -> value."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


class AgentProcess:
    """One `tcbypass agent` for a node whose OVSDB is `ovsdb_url` and whose OVS
    ports live in `ovs_netns` (a path). Extra CLI arguments and environment
    (a private bpffs, a failpoint) are passed through."""

    def __init__(self, ovsdb_url: str, ovs_netns: str, log_path: str, *extra: str, env: dict | None = None,
                 metrics: bool = True, command: list[str] | None = None):
        self.port = free_port() if metrics else 0
        self.log_path = log_path
        self.log = open(log_path, "a")
        pdeath = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        self.started = time.monotonic()
        address = f"127.0.0.1:{self.port}" if metrics else ""
        self.proc = subprocess.Popen(
            pdeath + (command or cli_command()) + ["agent", "--ovsdb", ovsdb_url, "--ovs-netns", ovs_netns,
                                                   "--metrics-address", address, *extra],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env={**os.environ, **(env or {})})

    @classmethod
    def on(cls, sb, *extra: str, log_name: str = "agent.log", env: dict | None = None) -> "AgentProcess":
        """An agent for the sandbox node `sb`."""
        return cls(sb.ovsdb_url, sb.netns_path(sb.node), f"{sb.run_dir}/{log_name}", *extra, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics_text(self, timeout: float = 5) -> str | None:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=timeout).read().decode()
        except OSError:
            return None

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.metrics_text() or "")

    def metric(self, name: str, default: float = 0.0) -> float:
        return self.metrics().get(name, default)

    def usage(self) -> Usage:
        return usage_of(self.proc.pid)

    def log_text(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def wait_for(self, predicate: Callable[[], bool], timeout: float, poll: float = 0.005) -> float | None:
        """Seconds until `predicate()` held, or None after `timeout` (or when the agent died)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if predicate():
                return time.monotonic() - started
            if not self.alive():
                return None
            time.sleep(poll)
        return None

    def kill(self) -> int:
        """SIGKILL, as a crash or an OOM kill would end it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def stop(self, grace: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
