"""`tcbypass-lab bench`: what the in-pod bridge costs a VM's traffic, and how much
of that cost the product and the minimal reference program win back.

This module is the run: what is measured, in which order, and the JSON it
leaves. The parts live next to it:

    scenarios.py   building direct, bridge, the product's and the reference's variants
    minimal.c/.py  the reference program and hooking programs for a scenario's life
    traffic.py     qperf and iperf3 servers and clients, parsing their output
    costs.py       ns/packet by BPF_PROG_TEST_RUN and in live traffic
    results.py     medians, recovered fractions, issue 10's targets (pure)
    report.py      tables, Markdown and the plot

The method, kept from the first version because it is what makes two-core
figures repeatable:
- every scenario stands built side by side; within each repetition every
  measurement runs on every scenario in turn, and the order rotates from one
  repetition to the next, so that noise from other work on the machine hits
  all scenarios alike;
- qperf client and server share CPU 0 (a wake-up on the other CPU costs
  more than the whole bridge here); iperf3 sends 64-byte UDP as fast as it
  can, the packet rate being the sensitive throughput figure;
- each figure is the median over repetitions, with p10 and p90.

Before any figure is taken, a burst of pings through every scenario proves
it takes the path it is named for (the product's counters move, the
reference's programs run). Everything built is removed at the end, also
after an error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Sequence

from tcbypass import attachments, bpfsys, features, loader, netns, tcx
from tcbypass.errors import TcbError
from . import costs, cpu, scenarios
from .results import AttachTime, PathCheck, Report, Sample, Summary, recovered, summarize, targets
from .sandbox import wait_for_ping
from .scenarios import BRIDGE, BYPASS, KIND_PRODUCT, KIND_REFERENCE, Scenario
from .traffic import (BW_JOBS, PEER_IP, REQUIRED_TOOLS, SERVER_TOOLS, Servers, ToolError, iperf3_run, lat_jobs,
                      netns_name, ping_burst, qperf_latency, size_label)

log = logging.getLogger(__name__)

KIB = 1024
FULL_SIZES = (64, 128, 256, 512, KIB, 2 * KIB, 4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB)
QUICK_SIZES = (64, KIB, 16 * KIB, 32 * KIB)
PATH_PINGS = 50

Progress = Callable[[str], None]  # called once per step with what comes next


class BenchError(TcbError):
    """The benchmark could not run (a tool missing, a scenario that does not carry traffic)."""


# --- what to run ------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What one run measures, and for how long."""

    sizes: tuple[int, ...] = FULL_SIZES
    reps: int = 6
    lat_seconds: int = 1  # per qperf test (qperf takes whole seconds)
    bw_seconds: int = 2  # per iperf3 run (whole seconds too)
    scenarios: tuple[str, ...] = scenarios.DEFAULT
    test_run_repeat: int = 1_000_000  # BPF_PROG_TEST_RUN repeat count per sample
    test_run_samples: int = 5
    live_reps: int = 3  # rounds of live-cost windows
    cold_attaches: int = 3  # extra detach + attach cycles of `bypass` for the first-attach time
    warm_attaches: int = 10  # attach again with nothing changed
    warm_up: bool = True  # one unrecorded qperf run per scenario before the first repetition
    lat_cpu: int = 0  # qperf client and server
    bw_client_cpu: int = 0  # iperf3 client
    bw_server_cpu: int = 0  # iperf3 server
    cpu_reps: int = 6  # repetitions of the CPU figures (0: none)
    load: cpu.Load = cpu.Load()  # the fixed loads, and the TCP runs at each MTU (client on bw_client_cpu)
    mtus: tuple[int, ...] = (1500, 1400, 9000)  # throughput per core at each (Kube-OVN's MTUs)
    datapath: str = ""  # system | netdev: the peer is a pod behind the node's own OVS on it; "": no OVS
    paths_only: bool = False  # build, prove each scenario's path, tear down: no figures
    quick: bool = False

    def steps(self) -> int:
        """Progress steps, as run() reports them."""
        n = len(self.scenarios)
        if self.paths_only:
            return n + 2
        kinds = [scenarios.VARIANTS[s].kind for s in self.scenarios if s in scenarios.VARIANTS]
        with_programs = sum(1 for k in kinds if k in (KIND_PRODUCT, KIND_REFERENCE))
        floors = 1 + any(scenarios.VARIANTS[s].hook == features.HOOK_CLSACT
                         for s in self.scenarios if s in scenarios.VARIANTS)
        big = sum(1 for s in self.sizes if s > 65507)
        traffic = self.reps * n * (len(self.sizes) + big + len(BW_JOBS))
        floor = floors if BRIDGE in self.scenarios else 0
        live = self.live_reps * len(costs.LIVE_WINDOWS) * (with_programs + floor)
        cpu_steps = self.cpu_reps * (1 + 2 * n) + len(self.mtus) * (1 + self.cpu_reps * n)
        return n + 2 + traffic + 1 + live + 1 + cpu_steps

    def to_json(self) -> dict:
        return asdict(self)


def plan_for(quick: bool = False, reps: int | None = None, names: Sequence[str] | None = None,
             datapath: str = "", paths_only: bool = False) -> Plan:
    """The full plan (about 22 minutes here with the four default scenarios) or
    the quick one (about 2.5 minutes: qperf runs last whole seconds, and 4 sizes
    x 2 tests x 4 scenarios x 2 repetitions is 64 s of qperf alone)."""
    plan = Plan()
    if quick:
        plan = replace(plan, sizes=QUICK_SIZES, reps=2, bw_seconds=1, test_run_repeat=100_000, test_run_samples=3,
                       live_reps=1, cold_attaches=0, warm_attaches=3, warm_up=False, cpu_reps=1,
                       load=replace(plan.load, seconds=2), mtus=(1400,), quick=True)
    if reps:
        plan = replace(plan, reps=reps)
    if names:
        plan = replace(plan, scenarios=tuple(names))
    if paths_only:
        plan = replace(plan, warm_up=False)
    return replace(plan, datapath=datapath, paths_only=paths_only)


# --- steps of the run ----------------------------------------------------------------------

def _ifindex_in(ns_path: str, dev: str) -> int:
    return netns.run_in(ns_path, lambda: socket.if_nametoindex(dev))


def check_path(scen: Scenario, pings: int = PATH_PINGS) -> PathCheck:
    """A burst of pings, and what the scenario's programs counted meanwhile.
    Run-time statistics must be on (the reference programs have no counters)."""
    if scen.kind == KIND_PRODUCT:
        before = scen.counters()
        replies = ping_burst(scen.vm_ns, pings)
        after = scen.counters()
        sent, back = (after.redirect_packets[d] - before.redirect_packets[d] for d in ("from_vm", "to_vm"))
        return PathCheck(scen.name, scen.hook, scen.mode, pings, replies, "tcbypass counters: frames redirected",
                         sent, back, ok=replies > 0 and sent >= replies and back >= replies)
    if scen.kind == KIND_REFERENCE:
        with scen.programs() as programs:
            before = [bpfsys.prog_info(fd).run_cnt for _, fd in programs]
            replies = ping_burst(scen.vm_ns, pings)
            after = [bpfsys.prog_info(fd).run_cnt for _, fd in programs]
        sent, back = after[0] - before[0], after[1] - before[1]
        return PathCheck(scen.name, scen.hook, scen.mode, pings, replies, "program runs (bpf_stats)", sent, back,
                         ok=replies > 0 and sent >= replies and back >= replies)
    replies = ping_burst(scen.vm_ns, pings)
    if scen.kind == scenarios.KIND_BRIDGE:
        hooked = [p for dev in (scen.tap, scen.nic)
                  for p in tcx.programs_on(scen.pod_ns, _ifindex_in(scen.pod_ns, dev))]
        return PathCheck(scen.name, "", "", pings, replies, "no tcx program on the tap or the NIC",
                         ok=replies > 0 and not hooked)
    return PathCheck(scen.name, "", "", pings, replies, "one veth pair", ok=replies > 0)


def measure_traffic(scens: Sequence[Scenario], plan: Plan, step: Progress, failures: list[str]) -> list[Sample]:
    """Every client run, scenarios interleaved within each repetition (rotating their order)."""
    samples: list[Sample] = []
    for rep in range(plan.reps):
        order = list(scens[rep % len(scens):]) + list(scens[:rep % len(scens)])
        for nominal, sent, tests in lat_jobs(plan.sizes):
            for scen in order:
                step(f"rep {rep + 1}/{plan.reps}: qperf {' '.join(tests)} {size_label(sent)} {scen.name}")
                got = qperf_latency(scen.vm_ns, sent, tests, plan.lat_seconds, plan.lat_cpu)
                for test in tests:
                    if test in got:
                        samples.append(Sample(scen.name, test, nominal, got[test]))
                    else:
                        failures.append(f"{scen.name} {test} {sent} B (rep {rep + 1}): no result")
        for test, streams, size in BW_JOBS:
            for scen in order:
                step(f"rep {rep + 1}/{plan.reps}: iperf3 {test} x{streams} {scen.name}")
                value = iperf3_run(scen.vm_ns, test, streams, plan.bw_seconds, plan.bw_client_cpu)
                if value is None:
                    failures.append(f"{scen.name} {test} x{streams} (rep {rep + 1}): no result")
                else:
                    samples.append(Sample(scen.name, test, size, value, streams))
    return samples


def measure_cpu(scens: Sequence[Scenario], plan: Plan, step: Progress, failures: list[str]) -> list[Sample]:
    """CPU per packet at the fixed UDP load and per KiB of the capped TCP stream
    (cpu.py), scenarios interleaved within each repetition (rotating their order)."""
    samples: list[Sample] = []
    for rep in range(plan.cpu_reps):
        step(f"rep {rep + 1}/{plan.cpu_reps}: the machine idle, for the CPU baseline")
        idle = cpu.idle_rate(plan.load.seconds)
        order = list(scens[rep % len(scens):]) + list(scens[:rep % len(scens)])
        for what, measure in (("UDP", cpu.udp_cpu), ("TCP", cpu.tcp_cpu)):
            for scen in order:
                step(f"rep {rep + 1}/{plan.cpu_reps}: CPU at a fixed {what} load, {scen.name}")
                got = measure(scen.name, scen.vm_ns, plan.load, idle)
                if not got:
                    failures.append(f"{scen.name} CPU at a fixed {what} load (rep {rep + 1}): no result")
                samples += got
    return samples


def measure_per_core(scens: Sequence[Scenario], plan: Plan, step: Progress, failures: list[str]) -> list[Sample]:
    """A TCP stream's Gbit/s and Gbit/s per busy core at each MTU: every scenario
    gets the MTU (the product attaches again), then the repetitions run."""
    samples: list[Sample] = []
    for mtu in plan.mtus:
        step(f"MTU {mtu} on every scenario")
        for scen in scens:
            scenarios.set_mtu(scen, mtu)
        for rep in range(plan.cpu_reps):
            order = list(scens[rep % len(scens):]) + list(scens[:rep % len(scens)])
            for scen in order:
                step(f"rep {rep + 1}/{plan.cpu_reps}: TCP at MTU {mtu}, {scen.name}")
                got = cpu.tcp_per_core(scen.name, scen.vm_ns, plan.load, mtu)
                if not got:
                    failures.append(f"{scen.name} TCP at MTU {mtu} (rep {rep + 1}): no result")
                samples += got
    return samples


def attach_times(scens: Sequence[Scenario], plan: Plan) -> list[AttachTime]:
    """The product's attach time: first (a new instance, loaded from the object
    cache; it compiles only when the cache is cold) and repeated (nothing to change).
    `cold_attaches` more first attaches come from detaching `bypass` and attaching it again."""
    out = []
    for scen in (s for s in scens if s.kind == KIND_PRODUCT):
        first = [scen.first_attach]
        if scen.name == BYPASS:
            for _ in range(plan.cold_attaches):
                attachments.detach(scen.spec.name)
                first.append(attachments.attach(scen.spec))
        warm = [attachments.attach(scen.spec) for _ in range(plan.warm_attaches)]
        for kind, runs in (("first", first), ("repeated", warm)):
            if runs:
                out.append(AttachTime(scen.name, kind, Summary.of([r.seconds for r in runs]),
                                      tuple(r.action for r in runs)))
    return out


# --- the machine ---------------------------------------------------------------------------

def _first_line(cmd: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return ((proc.stdout or proc.stderr).strip().splitlines() or [""])[0]


def describe_machine(plan: Plan | None = None) -> dict:
    """The machine a run was made on, for the record (and `placement` for a bench Plan)."""
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
    from tcbypass.build import bcc_version

    uname = platform.uname()
    machine = {
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
        "bcc": bcc_version() or "",
        "features": features.probe().to_json(),
        "qperf": _first_line(["qperf", "--version"]),
        "iperf3": _first_line(["iperf3", "--version"]),
        "loadavg_start": os.getloadavg()[0],
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if plan is not None:
        machine["datapath"] = (f"OVS {plan.datapath} datapath: the peer is a pod on br-int" if plan.datapath else
                               "no OVS: the peer is the node end of the VM's veth")
        machine["vm_side"] = "veth (a tap needs qemu or a relay behind it, which would cost more than the bridge)"
        machine["placement"] = {
            "latency": f"qperf client and server on CPU {plan.lat_cpu} (taskset)",
            "throughput": f"iperf3 client on CPU {plan.bw_client_cpu}, server on CPU {plan.bw_server_cpu}",
            "cpu": "the whole machine's, from /proc/stat, less an idle window's (lab/tcbypass_lab/cpu.py)",
        }
    return machine


def check_tools(plan: Plan) -> None:
    # --paths-only proves each path with pings: it needs no traffic generator.
    needed = [t for t in REQUIRED_TOOLS if not (plan.paths_only and t in SERVER_TOOLS)]
    missing = [t for t in needed if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)}",
                         hint="install them (Debian: apt-get install qperf iperf3 util-linux iproute2 iputils-ping)")
    if os.cpu_count() is not None and max(plan.lat_cpu, plan.bw_client_cpu, plan.bw_server_cpu) >= os.cpu_count():
        raise BenchError("not enough CPUs for the placement", hint="run on a machine with at least 2 CPUs")
    unknown = [s for s in plan.scenarios if s not in scenarios.VARIANTS]
    if unknown:
        raise BenchError(f"unknown scenario(s): {', '.join(unknown)}",
                         hint=f"choose from: {', '.join(scenarios.VARIANTS)}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
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


# --- the run ---------------------------------------------------------------------------------

def run(plan: Plan, progress: Progress | None = None) -> Report:
    """Build the scenarios, prove their paths, measure, tear everything down; the report.

    `progress` is called once per step (about plan.steps() in all) with a
    short description of what runs next."""
    step = progress or (lambda what: None)
    check_tools(plan)
    loader.bpffs_ready()
    started = time.monotonic()
    report = Report(describe_machine(plan), plan.to_json())
    with sigterm_as_interrupt(), contextlib.ExitStack() as stack:
        scens: list[Scenario] = []
        for name in plan.scenarios:
            step(f"building {name}")
            scens.append(scenarios.build(name, stack, plan.datapath))
            if name == BRIDGE:
                report.machine["bridge_nf_call_iptables"] = scenarios.sysctl_in(
                    scens[-1].pod_ns, "net.bridge.bridge-nf-call-iptables")
        servers = Servers()
        stack.callback(servers.close)
        step("starting servers, warming up")
        for scen in scens:
            if not plan.paths_only:
                servers.start(scen.peer_ns, plan.lat_cpu, plan.bw_server_cpu)
        for scen in scens:
            try:
                if not plan.paths_only:
                    servers.wait_listening(scen.peer_ns)
            except ToolError as exc:
                raise BenchError(str(exc), hint="check that qperf and iperf3 run: qperf --version; iperf3 --version")
            if not wait_for_ping(netns_name(scen.vm_ns), PEER_IP, timeout=10):
                raise BenchError(f"the {scen.name} scenario does not carry traffic (no ping reply)",
                                 hint="run with --debug; is something else changing these namespaces?")
            if plan.warm_up:
                qperf_latency(scen.vm_ns, 64, ("tcp_lat",), plan.lat_seconds, plan.lat_cpu)  # not recorded

        plan = replace(plan, load=replace(plan.load, client_cpu=plan.bw_client_cpu))
        step("checking that each scenario takes its path")
        with costs.run_time_stats():
            report.paths = [check_path(scen) for scen in scens]
        wrong = [p for p in report.paths if not p.ok]
        if wrong and plan.paths_only:
            report.failures += [f"{p.scenario}: traffic does not take its path" for p in wrong]
        elif wrong:
            raise BenchError("traffic does not take the expected path in: " + "; ".join(
                f"{p.scenario} ({p.replies}/{p.pings} replies, {p.evidence}: {p.from_vm} from the VM, "
                f"{p.to_vm} to it)" for p in wrong),
                hint="run 'tcbypass-lab bench --debug --quick'; for the product, 'tcbypass status' while it runs")

        if plan.paths_only:
            report.machine["seconds"] = round(time.monotonic() - started, 1)
            return report
        samples = measure_traffic(scens, plan, step, report.failures)
        samples += measure_cpu(scens, plan, step, report.failures)

        step("program cost (BPF_PROG_TEST_RUN)")
        report.program = costs.test_run_costs(scens, plan.test_run_repeat, plan.test_run_samples, plan.lat_cpu)

        def drive(scen: Scenario, window: str) -> None:
            costs.window(scen, window, plan.lat_seconds, plan.bw_seconds, plan.lat_cpu, plan.bw_client_cpu)

        try:
            report.program += costs.live_costs(scens, plan.live_reps, drive, step)
        except OSError as exc:  # no BPF_ENABLE_STATS: the test-run figures stand alone
            report.failures.append(f"live program cost: {exc}")
        step("attach time")
        report.attach = attach_times(scens, plan)
        samples += measure_per_core(scens, plan, step, report.failures)  # last: it changes the MTUs
        report.results = summarize(samples)
        report.recovered = recovered(report.results)
    report.targets = targets(report.recovered, report.program, quick=plan.quick)
    report.machine["loadavg_end"] = os.getloadavg()[0]
    report.machine["seconds"] = round(time.monotonic() - started, 1)
    return report


# --- JSON ----------------------------------------------------------------------------------

def write_json(report: Report | dict, path: str) -> None:
    data = report.to_json() if isinstance(report, Report) else report
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
