"""`tcbypass-lab demo`: a node in a box, and what the bypass wins there.

1. A private Open vSwitch (the kernel datapath where openvswitch.ko loads,
   else the userspace one), a server pod and a virt-launcher pod wired
   exactly like KubeVirt's bridge binding with Kube-OVN's external_ids;
   `attach <vmi>`; traffic through the bypass; the status rows.
2. What the in-pod bridge costs and how much of it the bypass wins back,
   with the node's switch out of the way (the bench's method: direct,
   bridge and bypass side by side, qperf tcp_lat 64 B interleaved, client
   and server on CPU 0): one line with the run's spread.

Everything it made is removed at the end unless `keep` is set. Under a
minute on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from tcbypass import build, features, health
from tcbypass.discovery import Settings
from tcbypass import vmi as vmis
from tcbypass.model import Status

from . import scenarios
from .sandbox import Sandbox, ping, sh, tcp_transfer, wait_for_ping
from .traffic import PEER_IP, Servers, netns_name, qperf_latency

VMI, NAMESPACE = "demo-vm", "demo"
SERVER_IP, VM_IP = "10.16.0.2", "10.16.0.5"
GAIN_ROUNDS = 5  # interleaved rounds of direct, bridge and bypass (1 s of qperf each)
GAIN_SCENARIOS = (scenarios.DIRECT, scenarios.BRIDGE, scenarios.BYPASS)


@dataclass
class Gain:
    """tcp_lat 64 B (µs) per round and scenario, and what follows."""

    rounds: list[dict] = field(default_factory=list)  # scenario -> µs, one dict per round

    def median(self, name: str) -> float:
        return statistics.median(r[name] for r in self.rounds if name in r)

    @property
    def cost(self) -> float:
        return self.median(scenarios.BRIDGE) - self.median(scenarios.DIRECT)

    @property
    def won(self) -> float:
        return self.median(scenarios.BRIDGE) - self.median(scenarios.BYPASS)

    def shares(self) -> list[float]:
        """What each round won back, as a share of what the bridge cost in that round."""
        out = []
        for r in self.rounds:
            cost = r[scenarios.BRIDGE] - r[scenarios.DIRECT]
            if cost > 0:
                out.append((r[scenarios.BRIDGE] - r[scenarios.BYPASS]) / cost)
        return out

    def line(self) -> str:
        if not self.rounds:
            return "could not measure the bridge's cost here (qperf gave no result)"
        shares = self.shares()
        if self.cost <= 0 or not shares:
            return (f"the pod bridge cost nothing measurable here ({self.median(scenarios.BRIDGE):.1f} µs against "
                    f"{self.median(scenarios.DIRECT):.1f} µs direct): nothing to win back on this run")
        spread = f"{min(shares) * 100:.0f}-{max(shares) * 100:.0f} % over {len(shares)} rounds"
        return (f"the pod bridge adds {self.cost:.1f} µs to a 64-byte TCP message here (qperf tcp_lat, one way; "
                f"{self.median(scenarios.DIRECT):.1f} µs direct, {self.median(scenarios.BRIDGE):.1f} µs bridged); "
                f"tcbypass wins back {self.won:.1f} µs of it ({self.won / self.cost * 100:.0f} %, {spread})")


@dataclass
class DemoReport:
    sandbox_tag: str
    ovsdb_url: str
    node_netns: str
    datapath: str = ""
    attach_ms: float = 0.0
    compiled: bool = False  # the attach compiled the program (no cached object yet)
    ping_sent: int = 0
    ping_received: int = 0
    tcp_bytes: int = 0
    statuses: list[Status] = field(default_factory=list)
    gain: Gain | None = None
    kept: bool = False


def on_a_node(keep: bool, step: Callable[[str], None]) -> DemoReport:
    """Part 1: the sandbox node, attach, traffic, status."""
    sb = Sandbox(ovs=True)
    step("starting a private Open vSwitch (ovsdb-server, ovs-vswitchd) in a node namespace")
    sb.__enter__()
    try:
        report = DemoReport(sb.tag, sb.ovsdb_url, sb.node, datapath=sb.datapath)
        settings = Settings(ovsdb_url=sb.ovsdb_url, ovs_netns=sb.netns_path(sb.node))
        step("creating a server pod and a virt-launcher pod (bridge binding) plugged into br-int")
        server_ns = sb.add_server_pod("web", SERVER_IP, namespace=NAMESPACE)
        [nic] = sb.add_vm(VMI, [VM_IP], namespace=NAMESPACE)
        sh("ping", "-c", "1", "-W", "2", SERVER_IP, netns=nic.vm_ns, check=False)  # warm ARP and OVS flows

        step(f"tcbypass attach {VMI} -n {NAMESPACE}")
        report.compiled = build.cached(build.Build(no_peer=not features.probe().redirect_peer)) is None
        started = time.monotonic()
        vmis.attach_vmi(VMI, NAMESPACE, settings)
        report.attach_ms = (time.monotonic() - started) * 1000

        step("sending traffic: 20 pings and a 4 MiB TCP transfer from the VM to the server pod")
        report.ping_sent, report.ping_received = ping(nic.vm_ns, SERVER_IP, count=20)
        report.tcp_bytes = tcp_transfer(nic.vm_ns, server_ns, SERVER_IP, 4 << 20)
        report.statuses = health.statuses(NAMESPACE, VMI)
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


def measure_gain(step: Callable[[str], None], rounds: int = GAIN_ROUNDS) -> Gain:
    """Part 2: direct, bridge and bypass side by side, qperf tcp_lat 64 B interleaved
    (the order rotates each round), client and server on CPU 0."""
    gain = Gain()
    with contextlib.ExitStack() as stack:
        built = []
        for name in GAIN_SCENARIOS:
            step(f"building {name} (namespaces only, no switch)")
            built.append(scenarios.build(name, stack))
        servers = Servers()
        stack.callback(servers.close)
        for scen in built:
            servers.start(scen.peer_ns, 0, 1)
        for scen in built:
            servers.wait_listening(scen.peer_ns)
            wait_for_ping(netns_name(scen.vm_ns), PEER_IP, timeout=10)
            qperf_latency(scen.vm_ns, 64, ("tcp_lat",), 1, 0)  # warm up, not recorded
        for i in range(rounds):
            got = {}
            for scen in built[i % len(built):] + built[:i % len(built)]:
                step(f"round {i + 1}/{rounds}: qperf tcp_lat 64 B {scen.name}")
                value = qperf_latency(scen.vm_ns, 64, ("tcp_lat",), 1, 0).get("tcp_lat")
                if value is not None:
                    got[scen.name] = value
            if len(got) == len(built):
                gain.rounds.append(got)
    return gain


def steps(rounds: int = GAIN_ROUNDS) -> int:
    return 5 + len(GAIN_SCENARIOS) * (1 + rounds)


def show(console, keep: bool) -> DemoReport:
    """The whole demo, printed on `console`."""
    from tcbypass.cli import status_table

    from .report import progress_display

    with progress_display(console, steps()) as step:
        report = on_a_node(keep, step)
        if not keep:
            report.gain = measure_gain(step)
    console.print(status_table(report.statuses, console.width))
    how = ("it compiled the program first: once per machine, then every attach loads it from the object cache"
           if report.compiled else "the program from the object cache, no compiler")
    console.print(f"attach {NAMESPACE}/{VMI}: {report.attach_ms:.0f} ms ({how}); OVS on its {report.datapath} "
                  "datapath", highlight=False)
    console.print(f"ping through the bypass: {report.ping_received}/{report.ping_sent} replies; "
                  f"TCP transfer: {report.tcp_bytes} bytes arrived", highlight=False)
    if report.statuses:
        row = report.statuses[0].counters
        console.print(f"fast path carried {row.redirect_packets['from_vm']} packets from the VM and "
                      f"{row.redirect_packets['to_vm']} to it", highlight=False)
    if report.gain is not None:
        console.print(report.gain.line(), highlight=False)
    if report.kept:
        console.print(f"sandbox kept: OVSDB {report.ovsdb_url}, node netns {report.node_netns}. "
                      f"Try: tcbypass status. Remove it with: tcbypass-lab demo --cleanup {report.sandbox_tag}",
                      highlight=False)
    return report
