"""`tcbypass demo`: a node in a box.

Builds a private OVS (userspace datapath when there is no kernel module), a
server pod and a virt-launcher pod wired exactly like KubeVirt's bridge
binding with Kube-OVN's external_ids, then: latency through the bridge,
`attach <vmi>`, traffic, latency through the bypass, the status rows.
Everything it made is removed at the end unless `keep` is set.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

from .. import build, features
from .. import vmi as vmis
from ..model import Status
from .sandbox import Sandbox, ping, sh, tcp_transfer

VMI, NAMESPACE = "demo-vm", "demo"
SERVER_IP, VM_IP = "10.16.0.2", "10.16.0.5"


@dataclass
class DemoReport:
    sandbox_tag: str
    ovsdb_url: str
    node_netns: str
    attach_ms: float = 0.0
    compiled: bool = False  # the attach compiled the program (no cached object yet)
    ping_sent: int = 0
    ping_received: int = 0
    tcp_bytes: int = 0
    latency_bridge_us: tuple[float, float] | None = None  # (median, spread)
    latency_bypass_us: tuple[float, float] | None = None
    latency_tool: str = ""
    statuses: list[Status] = field(default_factory=list)
    kept: bool = False


def _qperf_tcp_lat(sb: Sandbox, vm_ns: str, server_ns: str, seconds: float = 2.0,
                   runs: int = 3) -> tuple[float, float] | None:
    """(median, max - min) of qperf tcp_lat (64 B) in µs, client and server on CPU 0."""
    if not shutil.which("qperf"):
        return None
    server = subprocess.Popen(["nsenter", f"--net={sb.netns_path(server_ns)}", "--", "taskset", "-c", "0",
                               "qperf", "--listen_port", "19765"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        values = []
        for _ in range(runs):
            out = sh("taskset", "-c", "0", "qperf", "-lp", "19765", "-t", str(seconds), "-m", "64", "-vu",
                     SERVER_IP, "tcp_lat", netns=vm_ns, check=False, timeout=seconds + 20).stdout
            for line in out.splitlines():
                if "latency" in line and "=" in line:
                    number, unit = line.split("=")[1].split()[:2]
                    scale = {"ns": 0.001, "us": 1.0, "ms": 1000.0}.get(unit, 1.0)
                    values.append(float(number) * scale)
        return (statistics.median(values), max(values) - min(values)) if values else None
    finally:
        server.kill()
        server.wait()


def run(keep: bool = False, step: Callable[[str], None] = lambda _: None) -> DemoReport:
    sb = Sandbox(ovs=True)
    step("starting a private Open vSwitch (ovsdb-server, ovs-vswitchd) in a node namespace")
    sb.__enter__()
    try:
        report = DemoReport(sb.tag, sb.ovsdb_url, sb.node)
        settings = vmis.Settings(ovsdb_url=sb.ovsdb_url, ovs_netns=sb.netns_path(sb.node))
        step("creating a server pod and a virt-launcher pod (bridge binding) plugged into br-int")
        server_ns = sb.add_server_pod("web", SERVER_IP, namespace=NAMESPACE)
        [nic] = sb.add_vm(VMI, [VM_IP], namespace=NAMESPACE)
        sh("ping", "-c", "1", "-W", "2", SERVER_IP, netns=nic.vm_ns, check=False)  # warm ARP and OVS flows

        # Keep OVS's userspace datapath on the CPU qperf uses: a wake-up across
        # CPUs costs tens of µs here and would drown the bridge's few µs.
        sh("taskset", "-apc", "0", str(sb.vswitchd_pid), check=False)
        step("measuring latency through the bridge (qperf tcp_lat, 64 B)")
        report.latency_tool = "qperf tcp_lat 64 B, median of 3 x 2 s, client and server on CPU 0"
        report.latency_bridge_us = _qperf_tcp_lat(sb, nic.vm_ns, server_ns)

        step(f"tcbypass attach {VMI} -n {NAMESPACE}")
        report.compiled = build.cached(build.Build(no_peer=not features.probe().redirect_peer)) is None
        started = time.monotonic()
        vmis.attach_vmi(VMI, NAMESPACE, settings)
        report.attach_ms = (time.monotonic() - started) * 1000

        step("sending traffic: 20 pings and a 4 MiB TCP transfer from the VM to the server pod")
        report.ping_sent, report.ping_received = ping(nic.vm_ns, SERVER_IP, count=20)
        report.tcp_bytes = tcp_transfer(nic.vm_ns, server_ns, SERVER_IP, 4 << 20)

        step("measuring latency through the bypass")
        report.latency_bypass_us = _qperf_tcp_lat(sb, nic.vm_ns, server_ns)
        report.statuses = vmis.statuses(NAMESPACE, VMI)
        if keep:
            report.kept = True
            return report
        step(f"tcbypass detach {VMI} -n {NAMESPACE}; removing the sandbox")
        vmis.detach_vmi(VMI, NAMESPACE)
        return report
    finally:
        if not keep:
            with contextlib.suppress(Exception):
                vmis.detach_vmi(VMI, NAMESPACE)
            sb.close()
