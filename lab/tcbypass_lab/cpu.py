"""What the bridge costs a node in CPU, and what the fast path gives back.

Latency shows one packet's cost; an operator who packs many VMs on a node
pays in CPU. Three figures, each taken for every scenario in turn within a
repetition (the order rotates), like the rest of the bench:

- CPU per packet at a fixed load: iperf3 sends 64-byte UDP datagrams both
  ways at once (--bidir) at a fixed rate, well below what any scenario can
  carry, so every scenario moves the same packets and only the CPU they
  take differs. The CPU is the whole machine's busy time (user, system,
  softirq...: everything but idle), minus what an idle window of the same
  length took just before; divided by the packets that arrived, both
  directions together.
- CPU per KiB of a TCP stream capped at a fixed rate (iperf3 -b), from the
  VM to its peer, the same way.
- Throughput per core: one TCP stream as fast as it goes (client on one CPU,
  server on the other), in Gbit/s and in Gbit/s per busy core, at the MTUs
  Kube-OVN runs (1500, 1400 on its Geneve overlay, 9000 on jumbo underlays).

Busy time comes from cpuidle's residency counters where the kernel keeps
them (microseconds per CPU and idle state: busy = wall time x CPUs - idle),
else from /proc/stat, which counts in USER_HZ ticks (10 ms) and makes a
single figure rough. Either way the median over repetitions is what counts.

No split into system and softirq time: /proc/stat makes it by sampling
what runs at each tick, and iperf3's paced sends are timed off the same
clock, so here the ticks nearly always found iperf3 in user space (5 ticks
of system time in a window of 100 busy ones, whatever the path). perf,
which would count precisely, has no build for this machine's kernel.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

from .results import Sample
from .traffic import IPERF3_PORT, PEER_IP, TCP_CPU, TCP_MTU, TCP_PER_CORE, UDP_CPU, in_netns, run_client

log = logging.getLogger(__name__)

PAYLOAD = 64


# --- CPU time --------------------------------------------------------------------------------

def parse_stat(text: str, hz: int) -> float:
    """Busy seconds (everything but idle and iowait) from the aggregate `cpu` line of /proc/stat."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / hz
    raise ValueError("no aggregate cpu line in /proc/stat")


def _idle_microseconds() -> int | None:
    """Time all CPUs spent in cpuidle states (µs, exact), or None without cpuidle."""
    total, cpus = 0, os.cpu_count() or 1
    for cpu in range(cpus):
        states = glob.glob(f"/sys/devices/system/cpu/cpu{cpu}/cpuidle/state*/time")
        if not states:
            return None
        for path in states:
            with open(path) as f:
                total += int(f.read())
    return total


@dataclass(frozen=True)
class Snapshot:
    at: float  # time.monotonic()
    stat_busy: float  # busy seconds from /proc/stat, in ticks of USER_HZ (10 ms)
    idle_us: int | None  # cpuidle residency, when the kernel keeps it


def cpu_now() -> Snapshot:
    with open("/proc/stat") as f:
        busy = parse_stat(f.read(), os.sysconf("SC_CLK_TCK"))
    return Snapshot(time.monotonic(), busy, _idle_microseconds())


def busy_between(start: Snapshot, end: Snapshot) -> float:
    """Busy CPU seconds between two snapshots: from cpuidle's residency where there
    is one (microseconds: the wall time of every CPU less its idle time), else from
    /proc/stat's ticks."""
    if start.idle_us is None or end.idle_us is None:
        return end.stat_busy - start.stat_busy
    return (end.at - start.at) * (os.cpu_count() or 1) - (end.idle_us - start.idle_us) / 1e6


def measured(work: Callable[[], object]) -> tuple[object, float, float]:
    """Run `work`; what it returned, the busy CPU seconds of the machine meanwhile, and the wall time."""
    start = cpu_now()
    out = work()
    end = cpu_now()
    return out, busy_between(start, end), end.at - start.at


def idle_rate(seconds: float) -> float:
    """Busy CPU seconds a second while nothing of ours runs (the machine's own background)."""
    _, busy, wall = measured(lambda: time.sleep(seconds))
    return busy / wall


# --- iperf3 ------------------------------------------------------------------------------------

def _iperf3(vm_ns: str, cpu: int, seconds: int, *args: str) -> dict | None:
    cmd = in_netns(vm_ns, cpu, "iperf3", "-c", PEER_IP, "-p", str(IPERF3_PORT), "-t", str(seconds), "-J", *args)
    out = run_client(cmd, timeout=seconds + 20)
    if not out:
        return None
    try:
        data = json.loads(out)
    except ValueError:
        return None
    if data.get("error"):
        log.warning("iperf3 in %s: %s", vm_ns, data["error"])
        return None
    return data


def udp_packets(data: dict) -> int:
    """Datagrams that arrived, both directions of an iperf3 --bidir UDP run."""
    end = data["end"]
    return sum(end[k]["packets"] - end[k]["lost_packets"] for k in ("sum_received", "sum_received_bidir_reverse"))


def tcp_received(data: dict) -> tuple[float, float]:
    """(bytes, seconds) the server received in an iperf3 TCP run."""
    r = data["end"]["sum_received"]
    return r["bytes"], r["seconds"]


@dataclass(frozen=True)
class Load:
    """The fixed loads and the throughput runs."""

    pps: int = 40_000  # 64-byte datagrams per second, each way
    tcp_mbit: int = 1000  # the capped TCP stream
    seconds: int = 4
    client_cpu: int = 0  # where the iperf3 client runs (its server runs where the bench's servers run)


def udp_cpu(scenario: str, vm_ns: str, load: Load, idle: float) -> list[Sample]:
    """ns of CPU per packet at `load.pps` each way."""
    rate = load.pps * PAYLOAD * 8
    data, used, wall = measured(lambda: _iperf3(vm_ns, load.client_cpu, load.seconds, "-u", "-l", str(PAYLOAD),
                                                 "-b", str(rate), "--bidir"))
    if data is None:
        return []
    packets = udp_packets(data)
    expected = 2 * load.pps * load.seconds
    if packets < 0.95 * expected:  # the scenario could not carry the load: its CPU is not comparable
        log.warning("%s: %d of %d datagrams arrived at the fixed load", scenario, packets, expected)
        return []
    return [Sample(scenario, UDP_CPU, PAYLOAD, (used - idle * wall) / packets * 1e9)]


def tcp_cpu(scenario: str, vm_ns: str, load: Load, idle: float) -> list[Sample]:
    """ns of CPU per KiB of a TCP stream capped at `load.tcp_mbit`."""
    data, used, wall = measured(lambda: _iperf3(vm_ns, load.client_cpu, load.seconds, "-b",
                                                 f"{load.tcp_mbit}M"))
    if data is None:
        return []
    octets, _ = tcp_received(data)
    if not octets:
        return []
    return [Sample(scenario, TCP_CPU, load.tcp_mbit, (used - idle * wall) / (octets / 1024) * 1e9)]


def tcp_per_core(scenario: str, vm_ns: str, load: Load, mtu: int) -> list[Sample]:
    """One TCP stream as fast as it goes at `mtu`: Gbit/s, and Gbit/s per busy core."""
    data, used, wall = measured(lambda: _iperf3(vm_ns, load.client_cpu, load.seconds))
    if data is None:
        return []
    octets, seconds = tcp_received(data)
    gbit = octets * 8 / seconds / 1e9
    cores = used / wall
    return [Sample(scenario, TCP_MTU, mtu, gbit), Sample(scenario, TCP_PER_CORE, mtu, gbit / cores)]
