"""What the programs themselves cost per packet, two ways.

- BPF_PROG_TEST_RUN: the kernel runs a program on a crafted frame a million
  times in a loop and reports the mean. Caches are hot and nothing else
  runs, so this is the least a program can cost.
- Live: the kernel's own run-time statistics (run_time_ns and run_cnt of
  each program, counted while a BPF_ENABLE_STATS fd is open) over a window
  of real traffic: qperf tcp_lat and udp_lat at 64 B (one frame each way
  per round trip, caches cooled by everything else that runs in between),
  and iperf3's 64-byte UDP stream (frames from the VM back to back, caches
  warm). Statistics are on only during these windows, never while the
  traffic figures are taken: they add two clock reads to every run.

For scale, an empty program (it returns "continue" and nothing else) is
hooked the same way on the bridge pod and measured under the same traffic:
the floor of any tc program on that hook.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from typing import Callable, Iterator, Sequence

from tcbypass import bpfsys, netns
from tcbypass.features import HOOK_CLSACT, HOOK_TCX
from . import minimal
from .results import ProgramCost, Summary
from .scenarios import BRIDGE, Scenario
from .traffic import PEER_IP, PPS_PAYLOAD, UDP_PPS, VM_IP, iperf3_run, qperf_latency

METHOD_TEST_RUN, METHOD_LIVE = "BPF_PROG_TEST_RUN", "bpf_stats"
LIVE_WINDOWS = ("qperf tcp_lat 64 B", "qperf udp_lat 64 B", "iperf3 udp_pps 64 B")
MIN_RUNS = 1000  # fewer runs in a window (a few ARP or ACK frames) make no figure
FLOOR = "floor"  # the scenario name under which the empty program's costs are reported


# --- frames (pure) ---------------------------------------------------------------------

def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def ipv4_checksum(header: bytes) -> int:
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
    ip = ip[:10] + struct.pack("!H", ipv4_checksum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + b"\x00" * payload
    return _mac_bytes(dst_mac) + _mac_bytes(src_mac) + b"\x08\x00" + ip + udp


def arp_request(src_mac: str, src_ip: str, dst_ip: str) -> bytes:
    """A broadcast ARP request: left to the bridge by every program here."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, _mac_bytes(src_mac), socket.inet_aton(src_ip),
                      bytes(6), socket.inet_aton(dst_ip))
    return b"\xff" * 6 + _mac_bytes(src_mac) + b"\x08\x06" + arp + bytes(18)


# --- BPF_PROG_TEST_RUN ---------------------------------------------------------------------

def _test_run(ns_path: str, prog_fd: int, frame: bytes, dev: str, repeat: int, cpu: int) -> bpfsys.TestRun:
    """One test run on a thread inside the pod's netns (the frame's ifindex
    resolves there), pinned to `cpu`."""

    def body() -> bpfsys.TestRun:
        os.sched_setaffinity(0, {cpu})  # this thread only
        return bpfsys.prog_test_run(prog_fd, frame, ifindex=socket.if_nametoindex(dev), repeat=repeat)

    return netns.run_in(ns_path, body)


def _timed(scenario: str, program: str, case: str, runs: Sequence[bpfsys.TestRun], repeat: int) -> ProgramCost:
    return ProgramCost(scenario, program, case, runs[0].retval, repeat,
                       Summary.of([r.duration_ns for r in runs]), METHOD_TEST_RUN)


def test_run_costs(scens: Sequence[Scenario], repeat: int, samples: int, cpu: int) -> list[ProgramCost]:
    """ns/packet of every scenario's programs on frames like the benchmark's, and of the empty program."""
    costs = []
    for scen in scens:
        if not scen.has_programs:
            continue
        to_peer = udp_frame(scen.vm_mac, scen.peer_mac, VM_IP, PEER_IP)
        to_vm = udp_frame(scen.peer_mac, scen.vm_mac, PEER_IP, VM_IP, sport=5201, dport=40000)
        arp = arp_request(scen.vm_mac, VM_IP, PEER_IP)
        with scen.programs() as ((from_name, from_fd), (to_name, to_fd)):
            for program, fd, case, frame, dev in (
                    (from_name, from_fd, "redirect: 64-byte UDP from the VM", to_peer, scen.tap),
                    (to_name, to_fd, "redirect: 64-byte UDP to the VM", to_vm, scen.nic),
                    (from_name, from_fd, "pass: broadcast ARP request from the VM", arp, scen.tap)):
                runs = [_test_run(scen.pod_ns, fd, frame, dev, repeat, cpu) for _ in range(samples)]
                costs.append(_timed(scen.name, program, case, runs, repeat))
    pod = next((s for s in scens if s.pod_ns), None)
    if pod is not None:
        fd = minimal.empty_program()
        try:
            frame = udp_frame(pod.vm_mac, pod.peer_mac, VM_IP, PEER_IP)
            runs = [_test_run(pod.pod_ns, fd, frame, pod.tap, repeat, cpu) for _ in range(samples)]
            costs.append(_timed(FLOOR, minimal.EMPTY, "empty program (returns TC_ACT_UNSPEC)", runs, repeat))
        finally:
            os.close(fd)
    return costs


# --- live traffic ----------------------------------------------------------------------------

@contextlib.contextmanager
def run_time_stats() -> Iterator[None]:
    """Per-program run-time statistics on for the duration (BPF_ENABLE_STATS;
    the kernel turns them off when the fd closes, also if we die)."""
    fd = bpfsys.enable_run_time_stats()
    try:
        yield
    finally:
        os.close(fd)


def window(scen: Scenario, name: str, lat_seconds: int, bw_seconds: int, cpu: int, bw_cpu: int) -> None:
    """Drive one window of traffic through `scen`."""
    if "udp_pps" in name:
        iperf3_run(scen.vm_ns, UDP_PPS, 1, bw_seconds, bw_cpu)
    else:
        qperf_latency(scen.vm_ns, 64, ("udp_lat",) if "udp_lat" in name else ("tcp_lat",), lat_seconds, cpu)


def floor_hooks(scens: Sequence[Scenario]) -> list[str]:
    """The hooks the floor is measured on: tcx if the kernel has it, and clsact
    too when a scenario runs there."""
    hooks = {s.hook for s in scens if s.has_programs}
    return [h for h in (HOOK_TCX, HOOK_CLSACT) if h in hooks]


def live_costs(scens: Sequence[Scenario], reps: int, drive: Callable[[Scenario, str], None],
               step: Callable[[str], None] = lambda what: None) -> list[ProgramCost]:
    """ns/packet of every program that carries traffic, in each live window,
    over `reps` rounds (scenarios rotated from round to round); and of the
    empty program, hooked on the bridge pod (on each hook in use) in turn.

    `drive(scen, window)` sends the window's traffic."""
    bridge = next((s for s in scens if s.name == BRIDGE), None)
    subjects = [s for s in scens if s.has_programs]
    per: dict[tuple[str, str, str], list[tuple[int, int]]] = {}  # (scenario, program, window) -> (ns, runs)

    def measure(label: str, scen: Scenario, programs: Sequence[tuple[str, int]], name: str) -> None:
        before = {p: bpfsys.prog_info(fd) for p, fd in programs}
        drive(scen, name)
        for p, fd in programs:
            after = bpfsys.prog_info(fd)
            runs = after.run_cnt - before[p].run_cnt
            if runs >= MIN_RUNS:
                per.setdefault((label, p, name), []).append((after.run_time_ns - before[p].run_time_ns, runs))

    with run_time_stats():
        for rep in range(reps):
            order = subjects[rep % len(subjects):] + subjects[:rep % len(subjects)] if subjects else []
            for name in LIVE_WINDOWS:
                for scen in order:
                    step(f"live cost {rep + 1}/{reps}: {name}, {scen.name}")
                    with scen.programs() as programs:
                        measure(scen.name, scen, programs, name)
        if bridge is not None:
            for hook in floor_hooks(scens):
                fd = minimal.empty_program()
                hooks = None
                try:
                    hooks = minimal.hook_pair(bridge.pod_ns, hook, bridge.tap, fd, bridge.nic, fd)
                    for rep in range(reps):
                        for name in LIVE_WINDOWS:
                            step(f"live cost {rep + 1}/{reps}: {name}, empty program on {hook}")
                            measure(f"{FLOOR} ({hook})", bridge, ((minimal.EMPTY, fd),), name)
                finally:
                    if hooks is not None:
                        hooks.close()
                    os.close(fd)
    costs = []
    for (label, program, name), runs in per.items():
        ns = [t / n for t, n in runs]
        costs.append(ProgramCost(label, program, f"live: {name}", None, sum(n for _, n in runs), Summary.of(ns),
                                 METHOD_LIVE))
    return costs
