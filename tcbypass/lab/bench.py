"""`tcbypass bench`: what the in-pod bridge costs a VM's traffic, and how
much of that cost the bypass wins back.

Scenarios, built side by side on this machine with identical addressing
(VM 10.16.0.5/24, peer 10.16.0.2/24), MTU and offloads, each in namespaces
of its own (one `Sandbox` per scenario, so nothing collides):

    direct       vm: eth0 <-veth-> peer                  (the VM's NIC wired straight to the peer)
    bridge       vm: eth0 <-veth-> tap0 --[k6t-eth0]-- eth0-nic <-veth-> peer   (KubeVirt bridge binding)
    bypass       bridge + tcbypass, attached by attachments.attach()
    bypass_peer  bridge + tcbypass built with bpf_redirect_peer() from the VM
                 (attachments.attach(spec, peer=True)): measured, not the default

The peer is the node end of the pod's veth with the peer's address on it
(`Sandbox.serve_on_host_port`). The VM side is a veth, not a tap: a tap
carries traffic only with a process behind it (qemu, or a user-space
relay), and here that process would cost more than the whole bridge (qemu
runs under TCG on these machines). The program, the bridge and the
devices between them are the same either way; the docs say so.

What is measured, interleaving the scenarios within every repetition (the
order rotates from one repetition to the next) so that noise from other
work on the machine hits all of them alike:

- qperf tcp_lat and udp_lat per message size, client and server on one CPU
  (qperf reports latency as half the round trip);
- iperf3 TCP throughput with 1 and 4 streams, and 64-byte UDP packets per
  second received;
- the program's own cost in ns/packet (BPF_PROG_TEST_RUN with a repeat
  count, on the attached instance, in the pod's namespace), next to an
  empty program, and its cost in live traffic (kernel.bpf_stats_enabled);
- attach time per VMI: first (compiles) and repeated (nothing to change).

Each figure is the median over repetitions, with p10 and p90. `recovered`
is (bridge - bypass) / (bridge - direct): 1.0 when the bypass is as fast as
the direct wire, 0 when it wins nothing.

Everything runs bounded in time, and everything built here (namespaces,
attachments, server processes) is removed at the end, also after an error,
Ctrl-C or SIGTERM. rich is imported only by `render()` and
`progress_display()`, matplotlib only by `plot()`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, Sequence

from .. import attachments, bpfsys, loader, netdev, netns, tc
from ..errors import TcbError
from ..maps import TC_ACT_REDIRECT, Direction
from ..model import AttachSpec
from .sandbox import Sandbox, mac_for, mac_of, sh, wait_for_ping

log = logging.getLogger(__name__)

DIRECT, BRIDGE, BYPASS, BYPASS_PEER = "direct", "bridge", "bypass", "bypass_peer"
SCENARIOS = (DIRECT, BRIDGE, BYPASS, BYPASS_PEER)
LAT_TESTS = ("tcp_lat", "udp_lat")
TCP_BW, UDP_PPS = "tcp_bw", "udp_pps"
UNITS = {"tcp_lat": "us", "udp_lat": "us", TCP_BW: "Gbit/s", UDP_PPS: "kpps"}

VM_IP, PEER_IP, PREFIX = "10.16.0.5", "10.16.0.2", 24
VMI = "bench"
QPERF_PORT, IPERF3_PORT = 19765, 5201
UDP_MAX_PAYLOAD = 65507  # the largest UDP datagram: qperf's "64K" UDP message is sent at this size
IPERF3_TCP_LEN = 128 * 1024  # iperf3's default TCP write size
PPS_PAYLOAD = 64

KIB = 1024
FULL_SIZES = (64, 128, 256, 512, KIB, 2 * KIB, 4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB)
QUICK_SIZES = (64, KIB, 16 * KIB, 32 * KIB)
GOAL = 0.90  # the goal: at least 90 % recovered at every size

# The reference table of the issue (qperf, µs): size -> (direct, bridge, bypass).
REFERENCE: dict[str, dict[int, tuple]] = {
    "tcp_lat": {64: (48.5, 55.7, 49.9), KIB: (48.9, 55.1, 51.3), 16 * KIB: (71.2, 74.6, 74.7),
                32 * KIB: (87.4, 92.1, 94.6), 64 * KIB: (135.0, 133.0, 134.0)},
    "udp_lat": {64: (43.2, 48.5, 44.5), KIB: (44.9, 49.1, 46.6), 16 * KIB: (138.0, 157.0, 151.0),
                32 * KIB: (250.0, 291.0, 268.0), 64 * KIB: (None, 458.0, None)},
}

Progress = Callable[[str], None]  # called once per step with what comes next


class BenchError(TcbError):
    """The benchmark could not run (a tool missing, a scenario that does not carry traffic)."""


# --- what to run ------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What one run measures, and for how long."""

    sizes: tuple[int, ...] = FULL_SIZES
    reps: int = 6
    lat_seconds: int = 1  # per qperf test (qperf takes whole seconds)
    bw_seconds: int = 2  # per iperf3 run (whole seconds too)
    scenarios: tuple[str, ...] = SCENARIOS
    test_run_repeat: int = 1_000_000  # BPF_PROG_TEST_RUN repeat count per sample
    cold_attaches: int = 3  # extra detach + attach cycles for the first-attach time
    warm_attaches: int = 10  # attach again with nothing changed
    warm_up: bool = True  # one unrecorded qperf run per scenario before the first repetition
    lat_cpu: int = 0  # qperf client and server
    bw_client_cpu: int = 0  # iperf3 client
    bw_server_cpu: int = 0  # iperf3 server
    quick: bool = False

    def steps(self) -> int:
        """Progress steps: builds, warm-up, every client run, then the three in-kernel parts."""
        big = sum(1 for s in self.sizes if s > UDP_MAX_PAYLOAD)
        lat = self.reps * len(self.scenarios) * (len(self.sizes) + big)
        bw = self.reps * len(self.scenarios) * 3
        return len(self.scenarios) + 1 + lat + bw + 3

    def to_json(self) -> dict:
        return asdict(self)


def plan_for(quick: bool = False, reps: int | None = None, peer: bool = True) -> Plan:
    """The full plan (about 12 minutes here) or the quick one (about 1.5 minutes: qperf
    runs last whole seconds, and 4 sizes x 2 tests x 4 scenarios x 2 repetitions is
    64 s of qperf alone)."""
    plan = Plan()
    if quick:
        plan = replace(plan, sizes=QUICK_SIZES, reps=2, bw_seconds=1, test_run_repeat=100_000,
                       cold_attaches=0, warm_attaches=3, warm_up=False, quick=True)
    if reps:
        plan = replace(plan, reps=reps)
    if not peer:
        plan = replace(plan, scenarios=tuple(s for s in plan.scenarios if s != BYPASS_PEER))
    return plan


# --- results (pure) ---------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    scenario: str
    test: str
    size: int
    value: float
    streams: int = 1


@dataclass(frozen=True)
class Summary:
    """Median and spread of one figure over repetitions."""

    median: float
    p10: float
    p90: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Summary | None":
        vals = sorted(values)
        if not vals:
            return None
        return cls(statistics.median(vals), percentile(vals, 10), percentile(vals, 90), len(vals))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    vals = sorted(values)
    if not vals:
        raise ValueError("no values")
    pos = (len(vals) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


@dataclass(frozen=True)
class Result:
    scenario: str
    test: str
    size: int
    streams: int
    unit: str
    summary: Summary
    samples: tuple[float, ...]

    def to_json(self) -> dict:
        s = self.summary
        return {"scenario": self.scenario, "test": self.test, "size": self.size, "streams": self.streams,
                "median": _round(s.median), "p10": _round(s.p10), "p90": _round(s.p90), "n": s.n,
                "unit": self.unit, "samples": [_round(v) for v in self.samples]}


def _round(v: float | None, digits: int = 4) -> float | None:
    if v is None:
        return None
    return float(f"{v:.{digits}g}")


def summarize(samples: Sequence[Sample]) -> list[Result]:
    """One Result per (scenario, test, size, streams), in a stable order."""
    groups: dict[tuple, list[float]] = {}
    for s in samples:
        groups.setdefault((s.scenario, s.test, s.size, s.streams), []).append(s.value)
    order = {name: i for i, name in enumerate(SCENARIOS)}
    tests = {name: i for i, name in enumerate(LAT_TESTS + (TCP_BW, UDP_PPS))}
    results = []
    for key in sorted(groups, key=lambda k: (tests.get(k[1], 9), k[2], k[3], order.get(k[0], 9))):
        scenario, test, size, streams = key
        summary = Summary.of(groups[key])
        results.append(Result(scenario, test, size, streams, UNITS[test], summary, tuple(groups[key])))
    return results


@dataclass(frozen=True)
class Recovered:
    """Share of the bridge's cost a bypass variant wins back at one size."""

    test: str
    size: int
    streams: int
    scenario: str  # bypass or bypass_peer
    value: float
    clear: bool  # is bridge - direct larger than the noise? If not, `value` means little

    def to_json(self) -> dict:
        return {"test": self.test, "size": self.size, "streams": self.streams, "scenario": self.scenario,
                "value": _round(self.value, 3), "clear": self.clear}


def recovered_share(direct: float, bridge: float, bypass: float) -> float | None:
    """(bridge - bypass) / (bridge - direct); None when the bridge costs nothing.

    The same formula holds for latency (lower is better) and throughput
    (higher is better): both differences change sign together."""
    gap = bridge - direct
    if gap == 0:
        return None
    return (bridge - bypass) / gap


def recovered(results: Sequence[Result]) -> list[Recovered]:
    by_key = {(r.scenario, r.test, r.size, r.streams): r for r in results}
    out = []
    for r in results:
        if r.scenario not in (BYPASS, BYPASS_PEER):
            continue
        direct = by_key.get((DIRECT, r.test, r.size, r.streams))
        bridge = by_key.get((BRIDGE, r.test, r.size, r.streams))
        if not direct or not bridge:
            continue
        value = recovered_share(direct.summary.median, bridge.summary.median, r.summary.median)
        if value is None:
            continue
        noise = max(_half_spread(direct.summary), _half_spread(bridge.summary))
        clear = abs(bridge.summary.median - direct.summary.median) > noise
        out.append(Recovered(r.test, r.size, r.streams, r.scenario, value, clear))
    return out


def _half_spread(s: Summary) -> float:
    return (s.p90 - s.p10) / 2


@dataclass(frozen=True)
class ProgramCost:
    """ns per packet of one program on one frame, inside the kernel."""

    scenario: str  # whose instance: bypass, bypass_peer, or "baseline" for the empty program
    program: str  # tcb_from_vm | tcb_to_vm | empty
    case: str  # what the frame is and what the program does with it
    retval: int
    repeat: int
    summary: Summary
    method: str = "BPF_PROG_TEST_RUN"  # or bpf_stats (live traffic)

    def to_json(self) -> dict:
        s = self.summary
        return {"scenario": self.scenario, "program": self.program, "case": self.case, "method": self.method,
                "retval": self.retval, "repeat": self.repeat, "median_ns": _round(s.median),
                "p10_ns": _round(s.p10), "p90_ns": _round(s.p90), "n": s.n}


@dataclass(frozen=True)
class AttachTime:
    kind: str  # first (cold: compiles and pins) | repeated (nothing changed)
    summary: Summary
    actions: tuple[str, ...]

    def to_json(self) -> dict:
        s = self.summary
        return {"kind": self.kind, "median_ms": _round(s.median * 1000), "p10_ms": _round(s.p10 * 1000),
                "p90_ms": _round(s.p90 * 1000), "n": s.n, "actions": sorted(set(self.actions))}


@dataclass
class Report:
    machine: dict
    plan: Plan
    results: list[Result] = field(default_factory=list)
    recovered: list[Recovered] = field(default_factory=list)
    program: list[ProgramCost] = field(default_factory=list)
    attach: list[AttachTime] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "machine": self.machine,
            "plan": self.plan.to_json(),
            "results": [r.to_json() for r in self.results],
            "recovered": [r.to_json() for r in self.recovered],
            "program": [p.to_json() for p in self.program],
            "attach": [a.to_json() for a in self.attach],
            "failures": self.failures,
        }


# --- tool output (pure) -------------------------------------------------------

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


# --- scenarios ----------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """One built scenario: where the client (the VM) and the server (its peer) run."""

    name: str
    vm_ns: str  # netns path of the VM side
    peer_ns: str  # netns path of the peer
    vm_mac: str
    peer_mac: str
    pod_ns: str = ""  # the virt-launcher pod (not for direct)
    tap: str = ""
    nic: str = ""
    spec: AttachSpec | None = None  # the attachment (bypass variants)
    peer: bool = False  # built with bpf_redirect_peer


def _build_direct(sb: Sandbox) -> Scenario:
    """The VM's NIC wired straight to the peer: one veth pair, same addresses and MAC as the pod layouts."""
    vm = sb.add_netns(f"vm-{VMI}")
    host = f"{sb.tag}dir_h"  # named like Kube-OVN's host ports (<id>_h)
    sh("ip", "link", "add", "eth0", "netns", vm, "type", "veth", "peer", "name", host, "netns", sb.node)
    sh("ip", "link", "set", "eth0", "address", mac_for(f"{sb.tag}{VMI}0"), netns=vm)
    sh("ip", "addr", "add", f"{VM_IP}/{PREFIX}", "dev", "eth0", netns=vm)
    sh("ip", "link", "set", "eth0", "up", netns=vm)
    sh("ip", "addr", "add", f"{PEER_IP}/{PREFIX}", "dev", host, netns=sb.node)
    sh("ip", "link", "set", host, "up", netns=sb.node)
    return Scenario(DIRECT, sb.netns_path(vm), sb.netns_path(sb.node), mac_of(vm, "eth0"), mac_of(sb.node, host))


def _build_pod(sb: Sandbox, name: str) -> Scenario:
    """KubeVirt's bridge-binding pod, the peer on the node end of its veth."""
    [nic] = sb.add_vm(VMI, [VM_IP], vm_link="veth")
    sb.serve_on_host_port(nic, PEER_IP)
    spec = None
    if name in (BYPASS, BYPASS_PEER):
        spec = AttachSpec(name=f"bench-{sb.tag}", netns=sb.netns_path(nic.pod_ns), tap=nic.tap, nic=nic.nic,
                          mac=nic.mac, vmi=VMI, namespace="bench", managed_by="bench")
    return Scenario(name, sb.netns_path(nic.vm_ns), sb.netns_path(sb.node), nic.mac,
                    mac_of(sb.node, nic.host_port), pod_ns=sb.netns_path(nic.pod_ns), tap=nic.tap, nic=nic.nic,
                    spec=spec, peer=name == BYPASS_PEER)


def _netns_name(path: str) -> str:
    return os.path.basename(path)


# --- processes ------------------------------------------------------------------

def _in_netns(path: str, cpu: int, *cmd: str) -> list[str]:
    """A command line run inside a netns, pinned to one CPU. nsenter and taskset
    exec, so a Popen's pid is the tool's own pid."""
    return ["nsenter", f"--net={path}", "--", "taskset", "-c", str(cpu), *cmd]


class Servers:
    """qperf and iperf3 servers in every scenario's peer namespace, killed by pid at the end.

    Each is started through `setpriv --pdeathsig KILL`, so it dies with us
    even if we are killed with SIGKILL."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, scen: Scenario, plan: Plan) -> None:
        pdeath = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        for cpu, cmd in ((plan.lat_cpu, ("qperf", "--listen_port", str(QPERF_PORT))),
                         (plan.bw_server_cpu, ("iperf3", "-s", "-p", str(IPERF3_PORT)))):
            self.procs.append(subprocess.Popen(pdeath + _in_netns(scen.peer_ns, cpu, *cmd),
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, start_new_session=True))

    def wait_listening(self, scen: Scenario, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = sh("ss", "-Hltn", netns=_netns_name(scen.peer_ns), check=False).stdout
            if f":{QPERF_PORT} " in out and f":{IPERF3_PORT} " in out:
                return
            time.sleep(0.05)
        raise BenchError(f"qperf/iperf3 servers did not start in {scen.peer_ns}",
                         hint="check that qperf and iperf3 run: qperf --version; iperf3 --version")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def _client(cmd: list[str], timeout: float) -> str | None:
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


# --- measurements ---------------------------------------------------------------

def qperf_latency(scen: Scenario, size: int, tests: Sequence[str], plan: Plan) -> dict[str, float]:
    """Mean round-trip latency (µs) of each qperf test at message size `size`."""
    cmd = _in_netns(scen.vm_ns, plan.lat_cpu, "qperf", "--listen_port", str(QPERF_PORT), "-vu",
                    "-t", str(plan.lat_seconds), "-m", str(size), PEER_IP, *tests)
    out = _client(cmd, timeout=len(tests) * (2 * plan.lat_seconds + 5) + 10)
    return parse_qperf(out) if out else {}


def iperf3_run(scen: Scenario, test: str, streams: int, plan: Plan) -> float | None:
    args = ["iperf3", "-c", PEER_IP, "-p", str(IPERF3_PORT), "-t", str(plan.bw_seconds), "-J"]
    udp = test == UDP_PPS
    if udp:
        args += ["-u", "-l", str(PPS_PAYLOAD), "-b", "0"]
    if streams > 1:
        args += ["-P", str(streams)]
    out = _client(_in_netns(scen.vm_ns, plan.bw_client_cpu, *args), timeout=plan.bw_seconds + 20)
    if not out:
        return None
    try:
        return parse_iperf3(out, udp)
    except (ValueError, KeyError, ZeroDivisionError) as exc:
        log.warning("iperf3 %s in %s: %s", test, scen.name, exc)
        return None


def _lat_jobs(sizes: Sequence[int]) -> list[tuple[int, int, tuple[str, ...]]]:
    """(nominal size, size sent, tests) per qperf call. UDP's "64K" is its largest datagram."""
    jobs = []
    for size in sizes:
        if size > UDP_MAX_PAYLOAD:
            jobs += [(size, size, ("tcp_lat",)), (size, UDP_MAX_PAYLOAD, ("udp_lat",))]
        else:
            jobs.append((size, size, LAT_TESTS))
    return jobs


BW_JOBS = ((TCP_BW, 1, IPERF3_TCP_LEN), (TCP_BW, 4, IPERF3_TCP_LEN), (UDP_PPS, 1, PPS_PAYLOAD))


def measure_traffic(scens: Sequence[Scenario], plan: Plan, step: Progress, failures: list[str]) -> list[Sample]:
    """Every client run, scenarios interleaved within each repetition (rotating their order)."""
    samples: list[Sample] = []
    for rep in range(plan.reps):
        order = list(scens[rep % len(scens):]) + list(scens[:rep % len(scens)])
        for nominal, sent, tests in _lat_jobs(plan.sizes):
            for scen in order:
                step(f"rep {rep + 1}/{plan.reps}: qperf {' '.join(tests)} {_size_label(sent)} {scen.name}")
                got = qperf_latency(scen, sent, tests, plan)
                for test in tests:
                    if test in got:
                        samples.append(Sample(scen.name, test, nominal, got[test]))
                    else:
                        failures.append(f"{scen.name} {test} {sent} B (rep {rep + 1}): no result")
        for test, streams, size in BW_JOBS:
            for scen in order:
                step(f"rep {rep + 1}/{plan.reps}: iperf3 {test} x{streams} {scen.name}")
                value = iperf3_run(scen, test, streams, plan)
                if value is None:
                    failures.append(f"{scen.name} {test} x{streams} (rep {rep + 1}): no result")
                else:
                    samples.append(Sample(scen.name, test, size, value, streams))
    return samples


# --- the program's own cost -------------------------------------------------------

def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _ipv4_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, payload: int = PPS_PAYLOAD,
              sport: int = 40000, dport: int = 5201) -> bytes:
    """An Ethernet/IPv4/UDP frame as the VM sends in the packet-rate test."""
    udp_len = 8 + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0x4000, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", _ipv4_checksum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + b"\x00" * payload
    return _mac_bytes(dst_mac) + _mac_bytes(src_mac) + b"\x08\x00" + ip + udp


def arp_request(src_mac: str, src_ip: str, dst_ip: str) -> bytes:
    """A broadcast ARP request: left to the bridge (the program's pass path)."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, _mac_bytes(src_mac), socket.inet_aton(src_ip),
                      bytes(6), socket.inet_aton(dst_ip))
    return b"\xff" * 6 + _mac_bytes(src_mac) + b"\x08\x06" + arp + bytes(18)


def _test_run(ns_path: str, prog_fd: int, frame: bytes, dev: str, repeat: int, cpu: int) -> bpfsys.TestRun:
    """BPF_PROG_TEST_RUN on a thread inside the pod's netns (the ctx ifindex
    resolves there), pinned to `cpu`."""

    def body() -> bpfsys.TestRun:
        os.sched_setaffinity(0, {cpu})  # this thread only
        return bpfsys.prog_test_run(prog_fd, frame, ifindex=socket.if_nametoindex(dev), repeat=repeat)

    return netns.run_in(ns_path, body)


@contextlib.contextmanager
def _empty_program() -> Iterator[int | None]:
    """An empty SCHED_CLS program (returns TC_ACT_OK): the floor of what any tc program costs."""
    try:
        from bcc import BPF
    except ImportError:
        yield None
        return
    bpf = BPF(text=b"int tcb_empty(struct __sk_buff *skb) { return 0; }")
    try:
        yield bpf.load_func(b"tcb_empty", BPF.SCHED_CLS).fd
    finally:
        bpf.cleanup()


def program_costs(scens: Sequence[Scenario], plan: Plan) -> list[ProgramCost]:
    """ns/packet of the attached instances on frames like the benchmark's, and of an empty program."""
    costs = []
    reps = max(plan.reps, 3)
    for scen in scens:
        if scen.spec is None:
            continue
        to_peer = udp_frame(scen.vm_mac, scen.peer_mac, VM_IP, PEER_IP)
        to_vm = udp_frame(scen.peer_mac, scen.vm_mac, PEER_IP, VM_IP, sport=5201, dport=40000)
        arp = arp_request(scen.vm_mac, VM_IP, PEER_IP)
        cases = [("tcb_from_vm", "redirect: 64-byte UDP from the VM", to_peer, scen.tap, Direction.FROM_VM),
                 ("tcb_to_vm", "redirect: 64-byte UDP to the VM", to_vm, scen.nic, Direction.TO_VM),
                 ("tcb_from_vm", "pass: broadcast ARP request from the VM", arp, scen.tap, Direction.FROM_VM)]
        with loader.open_programs(attachments.pin_dir_of(scen.spec.name)) as progs:
            for program, case, frame, dev, direction in cases:
                fd = progs.from_vm if direction is Direction.FROM_VM else progs.to_vm
                runs = [_test_run(scen.pod_ns, fd, frame, dev, plan.test_run_repeat, plan.lat_cpu)
                        for _ in range(reps)]
                costs.append(ProgramCost(scen.name, program, case, runs[0].retval, plan.test_run_repeat,
                                         Summary.of([r.duration_ns for r in runs])))
    pod = next((s for s in scens if s.spec is not None), None)
    if pod is not None:
        with _empty_program() as fd:
            if fd is not None:
                frame = udp_frame(pod.vm_mac, pod.peer_mac, VM_IP, PEER_IP)
                runs = [_test_run(pod.pod_ns, fd, frame, pod.tap, plan.test_run_repeat, plan.lat_cpu)
                        for _ in range(reps)]
                costs.append(ProgramCost("baseline", "empty", "empty program (return TC_ACT_OK)",
                                         runs[0].retval, plan.test_run_repeat,
                                         Summary.of([r.duration_ns for r in runs])))
    return costs


BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled=1 for the duration, then back to what it was."""
    with open(BPF_STATS) as f:
        before = f.read().strip()
    with open(BPF_STATS, "w") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(BPF_STATS, "w") as f:
            f.write(before)


LIVE_CASES = ("live: qperf tcp_lat 64 B", "live: qperf udp_lat 64 B", "live: iperf3 udp_pps 64 B")


def _live_window(scen: Scenario, case: str, plan: Plan) -> None:
    if "udp_pps" in case:
        iperf3_run(scen, UDP_PPS, 1, plan)
    else:
        qperf_latency(scen, 64, ("udp_lat",) if "udp_lat" in case else ("tcp_lat",), plan)


def _live_runs(scen: Scenario, programs: Sequence[tuple[str, int]], plan: Plan) -> list[ProgramCost]:
    """Run each live window on `scen`; ns per run of every program that ran often enough."""
    costs = []
    for case in LIVE_CASES:
        before = {name: bpfsys.prog_info(fd) for name, fd in programs}
        _live_window(scen, case, plan)
        for name, fd in programs:
            after = bpfsys.prog_info(fd)
            runs = after.run_cnt - before[name].run_cnt
            if runs < 1000:  # a handful of ARP or ACK frames: not a figure
                continue
            ns = (after.run_time_ns - before[name].run_time_ns) / runs
            costs.append(ProgramCost(scen.name, name, case, TC_ACT_REDIRECT if name != "empty" else 0, runs,
                                     Summary(ns, ns, ns, 1), method="bpf_stats"))
    return costs


@contextlib.contextmanager
def _hooked(scen: Scenario, prog_fd: int) -> Iterator[None]:
    """`prog_fd` as a tc ingress filter on the tap and the NIC of a bridge pod, for the
    duration (the pod is thrown away afterwards; the filters are removed anyway)."""
    indexes = []
    with netdev.open_netns(scen.pod_ns) as ipr:
        try:
            for dev in (scen.tap, scen.nic):
                index = ipr.link_lookup(ifname=dev)[0]
                ipr.tc("add", kind="clsact", index=index)
                indexes.append(index)
                ipr.tc("add-filter", kind="bpf", index=index, parent=tc.INGRESS, prio=1, handle=1,
                       protocol=tc.ETH_P_ALL, fd=prog_fd, name="tcbypass-bench-empty", direct_action=True)
            yield
        finally:
            for index in indexes:
                with contextlib.suppress(Exception):
                    ipr.tc("del", kind="clsact", index=index)


def live_costs(scens: Sequence[Scenario], plan: Plan) -> list[ProgramCost]:
    """ns/packet of the attached programs in real traffic, from the kernel's own
    run-time statistics, in three windows: qperf tcp_lat and udp_lat at 64 B
    (one frame each way per round trip, caches cooled by everything else that
    runs between two frames) and udp_pps (a stream of frames from the VM,
    caches warm).

    For scale, an empty program hooked at the same two places of the bridge
    pod, under the same traffic; and a test run of our program with the
    statistics on, which shows what the statistics' own clock reads add."""
    costs = []
    with bpf_stats():
        for scen in scens:
            if scen.spec is None:
                continue
            with loader.open_programs(attachments.pin_dir_of(scen.spec.name)) as progs:
                costs += _live_runs(scen, (("tcb_from_vm", progs.from_vm), ("tcb_to_vm", progs.to_vm)), plan)
                frame = udp_frame(scen.vm_mac, scen.peer_mac, VM_IP, PEER_IP)
                runs = [_test_run(scen.pod_ns, progs.from_vm, frame, scen.tap, plan.test_run_repeat, plan.lat_cpu)
                        for _ in range(3)]
                costs.append(ProgramCost(scen.name, "tcb_from_vm", "redirect: 64-byte UDP from the VM, "
                                         "bpf_stats on", runs[0].retval, plan.test_run_repeat,
                                         Summary.of([r.duration_ns for r in runs])))
        bridge = next((s for s in scens if s.name == BRIDGE), None)
        if bridge is not None:
            with _empty_program() as fd:
                if fd is not None:
                    with _hooked(bridge, fd):
                        for cost in _live_runs(bridge, (("empty", fd),), plan):
                            costs.append(replace(cost, scenario="baseline",
                                                 case=cost.case + " (on the bridge pod's tap and NIC)"))
    return costs


# --- attach time ------------------------------------------------------------------

def attach_times(scens: Sequence[Scenario], first: Sequence[tuple[float, str]], plan: Plan) -> list[AttachTime]:
    """First attach (cold: compile, pin, fill, hook) and repeated attach (nothing to change).

    `first` holds the attaches that built the bypass scenarios; `cold_attaches`
    more come from detaching and attaching the plain bypass again."""
    cold = list(first)
    warm: list[tuple[float, str]] = []
    pods = [s for s in scens if s.spec is not None]
    for scen in pods:
        for _ in range(plan.warm_attaches):
            res = attachments.attach(scen.spec, peer=scen.peer)
            warm.append((res.seconds, res.action))
    main_pod = next((s for s in pods if s.name == BYPASS), None)
    if main_pod is not None:
        for _ in range(plan.cold_attaches):
            attachments.detach(main_pod.spec.name)
            res = attachments.attach(main_pod.spec)
            cold.append((res.seconds, res.action))
    out = []
    for kind, runs in (("first", cold), ("repeated", warm)):
        if runs:
            out.append(AttachTime(kind, Summary.of([s for s, _ in runs]), tuple(a for _, a in runs)))
    return out


# --- the machine ------------------------------------------------------------------

def _first_line(cmd: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return ((proc.stdout or proc.stderr).strip().splitlines() or [""])[0]


def describe_machine(plan: Plan) -> dict:
    cpu_model, mhz, flags = "", "", ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and not cpu_model:
                    cpu_model = value
                elif key == "cpu MHz" and not mhz:
                    mhz = value
                elif key == "flags" and not flags:
                    flags = value
    os_name = ""
    with contextlib.suppress(OSError):
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    os_name = line.split("=", 1)[1].strip().strip('"')
    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    bcc_version = ""
    with contextlib.suppress(Exception):
        import bcc  # noqa: PLC0415 - optional, for the record only

        bcc_version = getattr(bcc, "__version__", "")
    uname = platform.uname()
    return {
        "cpu_model": cpu_model,
        "cpu_mhz": float(mhz) if mhz else None,
        "cpus": os.cpu_count(),
        "virtualized": " hypervisor " in f" {flags} ",
        "memory_gib": mem_gib,
        "kernel": uname.release,
        "kernel_build": uname.version,
        "arch": uname.machine,
        "os": os_name,
        "python": platform.python_version(),
        "bcc": bcc_version,
        "qperf": _first_line(["qperf", "--version"]),
        "iperf3": _first_line(["iperf3", "--version"]),
        "vm_side": "veth (a tap needs qemu or a relay behind it, which would cost more than the bridge)",
        "placement": {
            "latency": f"qperf client and server on CPU {plan.lat_cpu} (taskset)",
            "throughput": f"iperf3 client on CPU {plan.bw_client_cpu}, server on CPU {plan.bw_server_cpu}",
        },
        "loadavg_start": os.getloadavg()[0],
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _sysctl_in(ns_path: str, key: str) -> str:
    return sh("sysctl", "-n", key, netns=_netns_name(ns_path), check=False).stdout.strip()


# --- the run ----------------------------------------------------------------------

REQUIRED_TOOLS = ("qperf", "iperf3", "nsenter", "taskset", "ss", "ip", "ping")


def check_tools(plan: Plan) -> None:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)}",
                         hint="install them (Debian: apt-get install qperf iperf3 util-linux iproute2 iputils-ping)")
    if os.cpu_count() is not None and max(plan.lat_cpu, plan.bw_client_cpu, plan.bw_server_cpu) >= os.cpu_count():
        raise BenchError("not enough CPUs for the placement", hint="run on a machine with at least 2 CPUs")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the cleanup in run() runs for both.

    Only in this process: pyroute2 forks helpers (to open sockets in a
    netns) that inherit the handler and are ended with SIGTERM; a helper
    must die at once, not unwind a copy of our stack and tear down the
    scenarios under us."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum, frame):  # noqa: ARG001
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt("SIGTERM")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(plan: Plan, progress: Progress | None = None) -> Report:
    """Build the scenarios, measure, tear everything down; the report.

    `progress` is called once per step (plan.steps() in all) with a short
    description of what runs next."""
    step = progress or (lambda what: None)
    check_tools(plan)
    loader.bpffs_ready()
    started = time.monotonic()
    report = Report(describe_machine(plan), plan)
    with _sigterm_as_interrupt(), contextlib.ExitStack() as stack:
        servers = Servers()
        scens: list[Scenario] = []
        first_attaches: list[tuple[float, str]] = []
        for name in plan.scenarios:
            step(f"building {name}")
            sb = stack.enter_context(Sandbox(ovs=False))
            if name == DIRECT:
                scens.append(_build_direct(sb))
                continue
            scen = _build_pod(sb, name)
            if name == BRIDGE:
                report.machine["bridge_nf_call_iptables"] = _sysctl_in(scen.pod_ns,
                                                                       "net.bridge.bridge-nf-call-iptables")
            if scen.spec is not None:
                stack.callback(attachments.detach, scen.spec.name)  # runs before the sandbox goes
                res = attachments.attach(scen.spec, peer=scen.peer)
                first_attaches.append((res.seconds, res.action))
            scens.append(scen)
        stack.callback(servers.close)
        step("starting servers, warming up")
        for scen in scens:
            servers.start(scen, plan)
        for scen in scens:
            servers.wait_listening(scen)
            if not wait_for_ping(_netns_name(scen.vm_ns), PEER_IP, timeout=10):
                raise BenchError(f"the {scen.name} scenario does not carry traffic (no ping reply)",
                                 hint="run with --debug; is something else changing these namespaces?")
            if plan.warm_up:
                qperf_latency(scen, 64, ("tcp_lat",), plan)  # not recorded

        samples = measure_traffic(scens, plan, step, report.failures)
        report.results = summarize(samples)
        report.recovered = recovered(report.results)

        step("program cost (BPF_PROG_TEST_RUN)")
        report.program = program_costs(scens, plan)
        step("program cost in live traffic (bpf_stats)")
        try:
            report.program += live_costs(scens, plan)
        except OSError as exc:  # bpf_stats_enabled not writable: the test-run figures stand alone
            report.failures.append(f"live program cost: {exc}")
        step("attach time")
        report.attach = attach_times(scens, first_attaches, plan)
    report.machine["loadavg_end"] = os.getloadavg()[0]
    report.machine["seconds"] = round(time.monotonic() - started, 1)
    return report


# --- output ---------------------------------------------------------------------

def write_json(report: Report | dict, path: str) -> None:
    data = report.to_json() if isinstance(report, Report) else report
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _size_label(size: int) -> str:
    if size == UDP_MAX_PAYLOAD:
        return "65507"
    return f"{size // KIB}K" if size >= KIB and size % KIB == 0 else str(size)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def latency_rows(data: dict, test: str) -> tuple[list[str], list[list[str]]]:
    """The per-size table of one latency test from a report's JSON: header and rows
    (medians ± half the p10–p90 spread, ratios to direct, recovered)."""
    results = {(r["scenario"], r["size"]): r for r in data["results"] if r["test"] == test}
    rec = {(r["scenario"], r["size"]): r for r in data["recovered"] if r["test"] == test}
    scenarios = [s for s in SCENARIOS if any(k[0] == s for k in results)]
    header = ["size"] + [f"{s} µs" for s in scenarios] + ["bridge/direct"]
    header += [f"{s}/direct" for s in scenarios if s in (BYPASS, BYPASS_PEER)]
    header += [f"recovered ({s})" if s != BYPASS else "recovered" for s in scenarios if s in (BYPASS, BYPASS_PEER)]
    rows = []
    for size in sorted({k[1] for k in results}):
        row = [_size_label(size)]
        for s in scenarios:
            r = results.get((s, size))
            row.append(f"{_fmt(r['median'])} ±{_fmt((r['p90'] - r['p10']) / 2, 2)}" if r else "—")
        direct = results.get((DIRECT, size))
        for s in [BRIDGE] + [s for s in scenarios if s in (BYPASS, BYPASS_PEER)]:
            r = results.get((s, size))
            row.append(f"{r['median'] / direct['median']:.3f}" if r and direct else "—")
        for s in [s for s in scenarios if s in (BYPASS, BYPASS_PEER)]:
            r = rec.get((s, size))
            row.append("—" if not r else f"{r['value'] * 100:.0f} %" + ("" if r["clear"] else " ~"))
        rows.append(row)
    return header, rows


def throughput_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    results = {(r["scenario"], r["test"], r["streams"]): r for r in data["results"]
               if r["test"] in (TCP_BW, UDP_PPS)}
    rec = {(r["scenario"], r["test"], r["streams"]): r for r in data["recovered"] if r["test"] in (TCP_BW, UDP_PPS)}
    scenarios = [s for s in SCENARIOS if any(k[0] == s for k in results)]
    bypasses = [s for s in scenarios if s in (BYPASS, BYPASS_PEER)]
    header = ["test"] + scenarios + [f"{s}/direct" for s in [BRIDGE] + bypasses]
    header += [f"recovered ({s})" if s != BYPASS else "recovered" for s in bypasses]
    rows = []
    for test, streams, label in ((TCP_BW, 1, "TCP Gbit/s, 1 stream"), (TCP_BW, 4, "TCP Gbit/s, 4 streams"),
                                 (UDP_PPS, 1, "UDP 64 B, kpps received")):
        if not any(k[1:] == (test, streams) for k in results):
            continue
        row = [label]
        for s in scenarios:
            r = results.get((s, test, streams))
            row.append(f"{_fmt(r['median'])} ±{_fmt((r['p90'] - r['p10']) / 2, 2)}" if r else "—")
        direct = results.get((DIRECT, test, streams))
        for s in [BRIDGE] + bypasses:
            r = results.get((s, test, streams))
            row.append(f"{r['median'] / direct['median']:.3f}" if r and direct else "—")
        for s in bypasses:
            r = rec.get((s, test, streams))
            row.append("—" if not r else f"{r['value'] * 100:.0f} %" + ("" if r["clear"] else " ~"))
        rows.append(row)
    return header, rows


def program_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    header = ["instance", "program", "frame / verdict", "method", "ns/packet (median)", "p10–p90"]
    rows = [[p["scenario"], p["program"], p["case"], p["method"], _fmt(p["median_ns"]),
             f"{_fmt(p['p10_ns'])}–{_fmt(p['p90_ns'])}" if p["n"] > 1 else f"{p['repeat']} runs"]
            for p in data["program"]]
    return header, rows


def attach_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    header = ["attach", "median ms", "p10–p90 ms", "n", "actions"]
    rows = [[a["kind"], _fmt(a["median_ms"]), f"{_fmt(a['p10_ms'])}–{_fmt(a['p90_ms'])}", str(a["n"]),
             ", ".join(a["actions"])] for a in data["attach"]]
    return header, rows


def reference_rows(test: str) -> tuple[list[str], list[list[str]]]:
    header = ["size", "direct µs", "bridge µs", "bypass µs", "recovered"]
    rows = []
    for size, (d, b, p) in sorted(REFERENCE[test].items()):
        share = recovered_share(d, b, p) if None not in (d, b, p) else None
        rows.append([_size_label(size), _fmt(d), _fmt(b), _fmt(p), "—" if share is None else f"{share * 100:.0f} %"])
    return header, rows


def comparison_rows(data: dict, test: str) -> tuple[list[str], list[list[str]]]:
    """This machine's medians and recovered shares next to the reference's, per size."""
    results = {(r["scenario"], r["size"]): r["median"] for r in data["results"] if r["test"] == test}
    rec = {(r["scenario"], r["size"]): r for r in data["recovered"] if r["test"] == test}
    peer = any(k[0] == BYPASS_PEER for k in results)
    header = ["size", "direct", "bridge", "bypass"] + (["bypass_peer"] if peer else [])
    header += ["recovered"] + (["recovered (peer)"] if peer else [])
    header += ["ref. direct", "ref. bridge", "ref. bypass", "ref. recovered"]
    rows = []
    for size in sorted({k[1] for k in results} | set(REFERENCE[test])):
        row = [_size_label(size)]
        for s in (DIRECT, BRIDGE, BYPASS) + ((BYPASS_PEER,) if peer else ()):
            row.append(_fmt(results.get((s, size))))
        for s in (BYPASS,) + ((BYPASS_PEER,) if peer else ()):
            r = rec.get((s, size))
            row.append("—" if not r else f"{r['value'] * 100:.0f} %" + ("" if r["clear"] else " ~"))
        d, b, p = REFERENCE[test].get(size, (None, None, None))
        share = recovered_share(d, b, p) if None not in (d, b, p) else None
        row += [_fmt(d), _fmt(b), _fmt(p), "—" if share is None else f"{share * 100:.0f} %"]
        rows.append(row)
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    right = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(right) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(data: dict) -> str:
    """All tables of a report (its JSON form) in Markdown, for docs/benchmarks.md."""
    parts = []
    for test in LAT_TESTS:
        parts += [f"#### {test}: medians (µs) here and in the reference",
                  markdown_table(*comparison_rows(data, test)),
                  f"#### {test}: spread (± half the p10–p90 range) and ratios",
                  markdown_table(*latency_rows(data, test))]
    parts += ["#### Throughput", markdown_table(*throughput_rows(data)),
              "#### Program cost", markdown_table(*program_rows(data)),
              "#### Attach time", markdown_table(*attach_rows(data))]
    return "\n\n".join(parts) + "\n"


def render(report: Report | dict, console) -> None:
    """Print the report's tables on a rich Console (the CLI's)."""
    from rich.table import Table

    data = report.to_json() if isinstance(report, Report) else report
    machine = data["machine"]
    reps = data["plan"]["reps"]

    def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
        t = Table(title=title, title_justify="left")
        for i, col in enumerate(header):
            t.add_column(col, justify="left" if i == 0 else "right")
        for row in rows:
            t.add_row(*row)
        return t

    for test in LAT_TESTS:
        console.print(table(f"{test}: median of {reps} (± half the p10–p90 spread), "
                            f"{machine['placement']['latency']}", *latency_rows(data, test)))
    console.print(table(f"throughput: median of {reps}, {machine['placement']['throughput']}",
                        *throughput_rows(data)))
    console.print(table("program cost", *program_rows(data)))
    console.print(table("attach time (per VMI, one NIC)", *attach_rows(data)))
    console.print(f"recovered = (bridge − bypass) / (bridge − direct); '~': bridge − direct is within the noise "
                  f"there. {machine['cpus']} CPUs, {machine['cpu_model']}, kernel {machine['kernel']}, "
                  f"VM side: veth. {machine.get('seconds', 0):.0f} s.", highlight=False)
    for failure in data["failures"]:
        console.print(f"[yellow]no result:[/] {failure}", highlight=False)


@contextlib.contextmanager
def progress_display(console, plan: Plan) -> Iterator[Progress]:
    """A rich progress bar on `console`; yields the `progress` callback for run()."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
             console=console, transient=True) as bar:
        task = bar.add_task("bench", total=plan.steps())
        first = [True]

        def step(what: str) -> None:
            if first[0]:
                first[0] = False
            else:
                bar.advance(task)
            bar.update(task, description=what)

        yield step


def check_plot() -> None:
    """Fail early (before a long run) when --plot cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError("--plot needs matplotlib", hint="pip install matplotlib (the 'bench' extra)") from None


def plot(report: Report | dict, path: str) -> None:
    """Latency against message size for every scenario, next to the reference;
    below, the share of the bridge's cost recovered at each size."""
    check_plot()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report.to_json() if isinstance(report, Report) else report
    colours = {DIRECT: "tab:green", BRIDGE: "tab:red", BYPASS: "tab:blue", BYPASS_PEER: "tab:purple"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for col, test in enumerate(LAT_TESTS):
        ax, rax = axes[0][col], axes[1][col]
        res = [r for r in data["results"] if r["test"] == test]
        for scen in SCENARIOS:
            rows = sorted((r for r in res if r["scenario"] == scen), key=lambda r: r["size"])
            if not rows:
                continue
            x = [r["size"] for r in rows]
            y = [r["median"] for r in rows]
            err = [[r["median"] - r["p10"] for r in rows], [r["p90"] - r["median"] for r in rows]]
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, color=colours[scen], label=f"{scen} (here)")
        for i, scen in enumerate((DIRECT, BRIDGE, BYPASS)):
            pts = [(size, v[i]) for size, v in sorted(REFERENCE[test].items()) if v[i] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", marker="s", ms=4, mfc="none",
                    color=colours[scen], alpha=0.6, label=f"{scen} (reference)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{test}: qperf latency (half the round trip)")
        ax.set_ylabel("µs (median, p10–p90)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        width = 0.12
        for j, scen in enumerate((BYPASS, BYPASS_PEER)):
            rec = sorted((r for r in data["recovered"] if r["test"] == test and r["scenario"] == scen),
                         key=lambda r: r["size"])
            if rec:
                xs = [r["size"] * 2 ** ((j - 1) * width) for r in rec]
                bars = rax.bar(xs, [r["value"] * 100 for r in rec], width=[x * 0.1 for x in xs],
                               color=colours[scen], label=f"{scen} (here)")
                for bar, r in zip(bars, rec):
                    bar.set_alpha(1.0 if r["clear"] else 0.35)
        ref = [(size, recovered_share(*v)) for size, v in sorted(REFERENCE[test].items()) if None not in v]
        xs = [size * 2 ** width for size, _ in ref]
        rax.bar(xs, [v * 100 for _, v in ref], width=[x * 0.1 for x in xs], color="grey", alpha=0.6,
                label="bypass (reference)")
        rax.axhline(GOAL * 100, color="black", ls=":", lw=1, label=f"goal {GOAL:.0%}")
        rax.axhline(0, color="black", lw=0.5)
        rax.set_ylim(-50, 150)
        rax.set_ylabel("recovered %")
        rax.set_xlabel("message size (bytes)")
        rax.grid(True, axis="y", alpha=0.3)
        rax.legend(fontsize=7, ncol=2)
        sizes = sorted({r["size"] for r in res})
        rax.set_xticks(sizes)
        rax.set_xticklabels([_size_label(s) for s in sizes], fontsize=7)
    m = data["machine"]
    fig.suptitle(f"tcbypass bench: {m['cpus']} × {m['cpu_model']}, kernel {m['kernel']}, "
                 f"{m['placement']['latency']}; pale bars: bridge − direct within the noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)

