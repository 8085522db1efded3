"""The benchmark's traffic: qperf and iperf3 servers on the VM's peer, their
clients in the VM, and reading what the tools print.

Every process runs inside a scenario's namespace through nsenter, pinned to
one CPU with taskset; both exec, so a Popen's pid is the tool's own. The
servers are started through `setpriv --pdeathsig KILL` and killed by pid,
so none outlives the benchmark, even one killed with SIGKILL. Clients run to
completion under a timeout.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
from typing import Sequence

from .sandbox import sh, stop_all

log = logging.getLogger(__name__)

VM_IP, PEER_IP, PREFIX = "10.16.0.5", "10.16.0.2", 24
QPERF_PORT, IPERF3_PORT = 19765, 5201
LAT_TESTS = ("tcp_lat", "udp_lat")
TCP_BW, UDP_PPS = "tcp_bw", "udp_pps"
# CPU at a fixed load (per packet, per KiB) and a TCP stream at an MTU (lab/tcbypass_lab/cpu.py)
UDP_CPU, TCP_CPU, TCP_MTU, TCP_PER_CORE = "udp_cpu", "tcp_cpu", "tcp_bw_mtu", "tcp_per_core"
UNITS = {"tcp_lat": "us", "udp_lat": "us", TCP_BW: "Gbit/s", UDP_PPS: "kpps", UDP_CPU: "ns/packet",
         TCP_CPU: "ns/KiB", TCP_MTU: "Gbit/s", TCP_PER_CORE: "Gbit/s/core"}
UDP_MAX_PAYLOAD = 65507  # the largest UDP datagram: qperf's "64K" UDP message is sent at this size
IPERF3_TCP_LEN = 128 * 1024  # iperf3's default TCP write size
PPS_PAYLOAD = 64
SERVER_TOOLS = ("qperf", "iperf3")  # the traffic the bench measures
REQUIRED_TOOLS = (*SERVER_TOOLS, "nsenter", "taskset", "ss", "ip", "ping")


class ToolError(RuntimeError):
    """A server did not come up."""


# --- tool output (pure) -------------------------------------------------------------

_QPERF_UNITS = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "sec": 1e6, "s": 1e6}


def parse_qperf(text: str) -> dict[str, float]:
    """`qperf -vu ... tcp_lat udp_lat` output -> {test: latency in µs}.

    qperf prints `latency = 0 ns` for a run that failed (e.g. a UDP message
    over 65507 bytes): such tests are left out."""
    out: dict[str, float] = {}
    test = ""
    for line in text.splitlines():
        head = re.match(r"^(\w+):\s*$", line)
        if head:
            test = head.group(1)
            continue
        m = re.match(r"^\s+latency\s*=\s*([\d.,]+)\s*(ns|us|ms|sec|s)\b", line)
        if m and test:
            value = float(m.group(1).replace(",", "")) * _QPERF_UNITS[m.group(2)]
            if value > 0:
                out[test] = value
    return out


def parse_iperf3(text: str, udp: bool) -> float:
    """iperf3 -J output -> Gbit/s received (TCP) or thousands of packets per second received (UDP)."""
    data = json.loads(text)
    if data.get("error"):
        raise ValueError(data["error"])
    received = data["end"]["sum_received"]
    if not udp:
        return received["bits_per_second"] / 1e9
    seconds = received["seconds"] or data["end"]["sum_sent"]["seconds"]
    return (received["packets"] - received["lost_packets"]) / seconds / 1e3


def size_label(size: int) -> str:
    if size == UDP_MAX_PAYLOAD:
        return "65507"
    return f"{size // 1024}K" if size >= 1024 and size % 1024 == 0 else str(size)


# --- processes ------------------------------------------------------------------------

def in_netns(path: str, cpu: int, *cmd: str) -> list[str]:
    """A command line run inside the netns at `path`, pinned to one CPU."""
    return ["nsenter", f"--net={path}", "--", "taskset", "-c", str(cpu), *cmd]


def netns_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


class Servers:
    """qperf and iperf3 servers in peer namespaces, killed by pid at close()."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, peer_ns: str, lat_cpu: int, bw_cpu: int) -> None:
        pdeath = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        for cpu, cmd in ((lat_cpu, ("qperf", "--listen_port", str(QPERF_PORT))),
                         (bw_cpu, ("iperf3", "-s", "-p", str(IPERF3_PORT)))):
            self.procs.append(subprocess.Popen(pdeath + in_netns(peer_ns, cpu, *cmd),
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, start_new_session=True))

    @staticmethod
    def wait_listening(peer_ns: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = sh("ss", "-Hltn", netns=netns_name(peer_ns), check=False).stdout
            if f":{QPERF_PORT} " in out and f":{IPERF3_PORT} " in out:
                return
            time.sleep(0.05)
        raise ToolError(f"qperf/iperf3 servers did not start in {peer_ns}")

    def close(self) -> None:
        stop_all(self.procs, grace=3)


def run_client(cmd: list[str], timeout: float) -> str | None:
    """Run a client to completion (killed after `timeout`); its stdout, or None when it failed."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        log.warning("%s: timed out after %.0f s", " ".join(cmd[4:]), timeout)
        return None
    if proc.returncode != 0:
        log.warning("%s: exit %d: %s", " ".join(cmd[4:]), proc.returncode, (proc.stderr or proc.stdout).strip())
        return None
    return proc.stdout


# --- clients -----------------------------------------------------------------------------

def qperf_latency(vm_ns: str, size: int, tests: Sequence[str], seconds: int, cpu: int) -> dict[str, float]:
    """Latency (µs, half the round trip as qperf reports it) of each qperf test at `size`."""
    cmd = in_netns(vm_ns, cpu, "qperf", "--listen_port", str(QPERF_PORT), "-vu", "-t", str(seconds),
                   "-m", str(size), PEER_IP, *tests)
    out = run_client(cmd, timeout=len(tests) * (2 * seconds + 5) + 10)
    return parse_qperf(out) if out else {}


def iperf3_run(vm_ns: str, test: str, streams: int, seconds: int, cpu: int) -> float | None:
    """TCP Gbit/s (tcp_bw) or 64-byte UDP kpps received (udp_pps), or None when the run failed."""
    args = ["iperf3", "-c", PEER_IP, "-p", str(IPERF3_PORT), "-t", str(seconds), "-J"]
    udp = test == UDP_PPS
    if udp:
        args += ["-u", "-l", str(PPS_PAYLOAD), "-b", "0"]
    if streams > 1:
        args += ["-P", str(streams)]
    out = run_client(in_netns(vm_ns, cpu, *args), timeout=seconds + 20)
    if not out:
        return None
    try:
        return parse_iperf3(out, udp)
    except (ValueError, KeyError, ZeroDivisionError) as exc:
        log.warning("iperf3 %s in %s: %s", test, vm_ns, exc)
        return None


def ping_burst(vm_ns: str, count: int = 50, interval: float = 0.01) -> int:
    """ICMP echoes from the VM to its peer, quickly; how many were answered."""
    out = sh("ping", "-q", "-c", str(count), "-i", str(interval), "-W", "1", PEER_IP, netns=netns_name(vm_ns),
             check=False, timeout=count * interval + 15).stdout
    m = re.search(r"(\d+) received", out)
    return int(m.group(1)) if m else 0


def lat_jobs(sizes: Sequence[int]) -> list[tuple[int, int, tuple[str, ...]]]:
    """(nominal size, size sent, tests) per qperf call. UDP's "64K" is its largest datagram."""
    jobs = []
    for size in sizes:
        if size > UDP_MAX_PAYLOAD:
            jobs += [(size, size, ("tcp_lat",)), (size, UDP_MAX_PAYLOAD, ("udp_lat",))]
        else:
            jobs.append((size, size, LAT_TESTS))
    return jobs


BW_JOBS = ((TCP_BW, 1, IPERF3_TCP_LEN), (TCP_BW, 4, IPERF3_TCP_LEN), (UDP_PPS, 1, PPS_PAYLOAD))
