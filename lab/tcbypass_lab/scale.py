"""`tcbypass-lab bench scale N`: a node full of VMs.

Builds N virt-launcher pods with bridge binding on one sandbox node with a
private OVS (Kube-OVN's port rows in its OVSDB). While the node fills up, at
a few pod counts (1, 10, 25, 50, 100, ... N), the newest VMI is attached and
detached a few times by the CLI and in process: one more VMI's attach time
against the number of pods on the node. Then it attaches all N the ways a
node does, one phase after the other, each ending with everything detached
and nothing left:

1. agent    `tcbypass agent` starts (a subprocess, as the DaemonSet runs it)
            on a node where the N pods are already plugged: the time until
            all N attachments are complete, its RSS (VmRSS, VmHWM), then
            `tcbypass status` with N rows and the kernel memory of each
            attachment (memlock of its 2 programs and 4 maps, from fdinfo);
2. cli      N sequential `tcbypass attach VMI` calls, as a node hook makes
            them: wall time of each, Python start-up included; then
            `tcbypass detach VMI` for each;
3. inproc   vmi.attach_vmi() in this process for each VMI: the attach's own
            time (attachments.attach) and with discovery; then detach.

After each phase: no pin directory, no lock file, and none of the programs
and maps the attachments had (by id) may remain. The program build is
compiled into the object cache before anything is timed: these are the
figures of a prepared node.

The VM side of each pod is a tap with no process behind it, as KubeVirt's
is before qemu opens it: enough for attach, status and the agent, and half
the namespaces of a veth "VM". `vm_link="veth"` gives every pod a VM
namespace instead, and the first and last VMs are then pinged through the
fast path (with the bridge's unicast forwarding blocked) after the agent
phase.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from tcbypass import attachments, build, health, loader, vmi
from tcbypass.discovery import Settings
from tcbypass.errors import TcbError
from tcbypass.model import STATE_ACTIVE
from .agentproc import AgentProcess, cli_command, cpu_seconds_of, memory_of
from .kobjects import Footprint, footprint, leftovers, tcb_objects
from .results import percentile, rnd
from .sandbox import Sandbox, ping

Progress = Callable[[str], None]
SERVER_IP = "10.16.0.2"

# Issue 11's targets (at N = 250, on 2 cores).
TARGETS = {
    "inproc_attach_p50_ms": 30.0,
    "cli_attach_p50_s": 0.3,
    "agent_all_active_s": 30.0,
    "status_s": 1.0,
    "agent_rss_mib": 150.0,
}
TARGET_N = 250


def vmi_name(i: int) -> str:
    return f"vm{i:04d}"


def vm_ip(i: int) -> str:
    n = i + 3  # .1 and .2 are the gateway's and the server's
    return f"10.16.{n // 254}.{n % 254 + 1}"


def spread(values: Sequence[float], scale: float = 1.0, digits: int = 4) -> dict:
    """p50, p90, max (and min, mean) of `values`, times `scale`."""
    if not values:
        return {"n": 0}
    vals = sorted(v * scale for v in values)
    return {"n": len(vals), "min": rnd(vals[0], digits), "p50": rnd(statistics.median(vals), digits),
            "p90": rnd(percentile(vals, 90), digits), "max": rnd(vals[-1], digits),
            "mean": rnd(statistics.fmean(vals), digits)}


@dataclass(frozen=True)
class ScalePlan:
    vms: int
    vm_link: str = "tap"  # tap (as on a node) or veth (a VM namespace per pod; traffic is checked)
    agent_timeout: float = 600.0  # seconds for the agent to have all N active: only a stuck agent takes this long
    status_runs: int = 3
    phases: tuple[str, ...] = ("agent", "cli", "inproc")
    checkpoint_samples: int = 3  # attaches of the newest pod at each checkpoint while the node fills (0: none)

    def checkpoints(self) -> list[int]:
        """Pod counts at which one more VMI's attach is timed while the node is built."""
        if not self.checkpoint_samples:
            return []
        marks = {n for n in (1, 10, 25, 50, 100, 150, 200, 250, 300, 400, 500, 750, 1000) if n <= self.vms}
        return sorted(marks | {self.vms})


# --- processes -------------------------------------------------------------------------------

def _timed_cli(*args: str, timeout: float = 120) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    proc = subprocess.run(cli_command() + list(args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return time.monotonic() - started, proc


# --- the run ---------------------------------------------------------------------------------------

class ScaleError(TcbError):
    """A phase could not complete (the agent died or stalled, status failed)."""


@dataclass
class Node:
    sb: Sandbox
    namespace: str
    names: list[str] = field(default_factory=list)  # attachment names (iface-ids), one per VMI
    nics: list = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return Settings(ovsdb_url=self.sb.ovsdb_url, ovs_netns=self.sb.netns_path(self.sb.node))


def checkpoint(node: Node, i: int, samples: int) -> dict:
    """One more VMI on a node with i + 1 pods: attach and detach the newest pod
    `samples` times by the CLI and in process."""
    name, cli, inproc, inproc_attach = vmi_name(i), [], [], []
    for _ in range(samples):
        seconds, proc = _timed_cli("attach", name, "-n", node.namespace, "--ovsdb", node.sb.ovsdb_url,
                                   "--ovs-netns", node.sb.netns_path(node.sb.node))
        if proc.returncode != 0:
            raise ScaleError(f"tcbypass attach {name} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        cli.append(seconds)
        _timed_cli("detach", name, "-n", node.namespace)
        t = time.monotonic()
        result = vmi.attach_vmi(name, node.namespace, node.settings, managed_by="bench")
        inproc.append(time.monotonic() - t)
        inproc_attach += [r.seconds for r in result.attached]
        vmi.detach_vmi(name, node.namespace)
    return {"pods": i + 1, "cli_s": spread(cli), "attach_vmi_ms": spread(inproc, 1000),
            "attach_ms": spread(inproc_attach, 1000)}


def build_node(sb: Sandbox, plan: ScalePlan, step: Progress) -> tuple[Node, dict]:
    """The N pods, one after the other; at each checkpoint, one more VMI's attach time."""
    node = Node(sb, f"scale-{sb.tag}")
    marks, checkpoints = set(plan.checkpoints()), []
    if plan.vm_link == "veth":
        sb.add_server_pod("web", SERVER_IP, namespace=node.namespace)
    per_vm = []
    started = time.monotonic()
    for i in range(plan.vms):
        if i % 10 == 0:
            step(f"building pods: {i}/{plan.vms}")
        t = time.monotonic()
        [nic] = sb.add_vm(vmi_name(i), [vm_ip(i)], namespace=node.namespace, vm_link=plan.vm_link)
        per_vm.append(time.monotonic() - t)
        node.nics.append(nic)
        node.names.append(nic.iface_id)
        if i + 1 in marks:
            step(f"one more VMI on a node with {i + 1} pods")
            t = time.monotonic()
            checkpoints.append(checkpoint(node, i, plan.checkpoint_samples))
            started += time.monotonic() - t  # not building
    seconds = time.monotonic() - started
    ports = sb.vsctl("list-ports", sb.bridge).split()
    step("measuring ovs-vswitchd at rest")
    before = cpu_seconds_of(sb.vswitchd_pid)
    time.sleep(3)
    idle_pct = round((cpu_seconds_of(sb.vswitchd_pid) - before) / 3 * 100, 1)
    return node, {"vms": plan.vms, "vm_link": plan.vm_link, "seconds": round(seconds, 1),
                  "per_vm_s": spread(per_vm), "first_10_s": spread(per_vm[:10]), "last_10_s": spread(per_vm[-10:]),
                  "netns": len(sb.netns_names), "ovs_ports": len(ports), "ovs_vswitchd_idle_cpu_pct": idle_pct,
                  "checkpoints": checkpoints}


def _detach_all(node: Node) -> list[float]:
    times = []
    for name in node.names:
        t = time.monotonic()
        attachments.detach(name)
        times.append(time.monotonic() - t)
    return times


def _status_times(node: Node, runs: int) -> dict:
    out = {}
    for label, extra in (("table", ()), ("json", ("--json",))):
        times, rows = [], None
        for _ in range(runs):
            seconds, proc = _timed_cli("status", "-n", node.namespace, *extra)
            if proc.returncode not in (0, 3):
                raise ScaleError(f"tcbypass status failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
            times.append(seconds)
            if extra:
                data = json.loads(proc.stdout)
                rows = len(data)
                out["active"] = sum(1 for r in data if r["state"] == STATE_ACTIVE)
        out[label] = spread(times)
        if rows is not None:
            out["rows"] = rows
    return out


def _check_traffic(node: Node) -> dict:
    """Ping the server from the first and last VM with the bridge unable to forward
    unicast: only the fast path can carry the echoes (veth VMs only)."""
    results = {}
    reachable = [n for n in node.nics if n.ip.startswith("10.16.0.")]  # the server's /24
    for nic in {n.iface_id: n for n in (reachable[0], reachable[-1])}.values():
        node.sb.block_bridge_unicast(nic)
        sent, received = ping(nic.vm_ns, SERVER_IP, count=5, interval=0.05)
        results[nic.iface_id] = f"{received}/{sent}"
    return results


def phase_agent(node: Node, plan: ScalePlan, step: Progress) -> tuple[dict, list[Footprint]]:
    step("agent: starting with every pod plugged")
    agent = AgentProcess.on(node.sb)
    done: dict[str, float] = {}
    out: dict = {}
    try:
        deadline = agent.started + plan.agent_timeout
        while len(done) < len(node.names):
            if not agent.alive():
                raise ScaleError(f"the agent exited ({agent.proc.returncode}); log: {agent.log.name}")
            if time.monotonic() > deadline:
                raise ScaleError(f"the agent had {len(done)}/{len(node.names)} attached after "
                                 f"{plan.agent_timeout:.0f} s; log: {agent.log.name}")
            for name in node.names:
                if name not in done:
                    record = attachments.read_record(attachments.pin_dir_of(name))
                    if record is not None and record.complete:
                        done[name] = time.monotonic() - agent.started
            step(f"agent: {len(done)}/{len(node.names)} attached")
            time.sleep(0.05)
        out["all_attached_s"] = round(max(done.values()), 2)
        out["first_attached_s"] = round(min(done.values()), 2)
        out["timeline_s"] = sorted(round(v, 3) for v in done.values())
        states = [health.status_of(name) for name in node.names]
        out["active"] = sum(1 for s in states if s is not None and s.state == STATE_ACTIVE)
        out["memory_at_all_attached"] = memory_of(agent.proc.pid)
        out["cpu_s_at_all_attached"] = cpu_seconds_of(agent.proc.pid)
        step("agent: idle a moment, then a metrics scrape")
        time.sleep(2)
        out["metrics_scrape_ok"] = agent.metrics_text() is not None
        out["memory"] = memory_of(agent.proc.pid)
        if plan.vm_link == "veth":
            out["traffic_through_fast_path"] = _check_traffic(node)
    finally:
        out["exit_code"] = agent.stop()
        with open(agent.log.name) as f:
            out["failed_attaches_logged"] = sum("attach failed" in line for line in f)
    step("status with every attachment")
    out["status"] = _status_times(node, plan.status_runs)
    step("kernel memory per attachment")
    prints = [footprint(name) for name in node.names]
    return out, prints


def memory_summary(prints: Sequence[Footprint]) -> dict:
    per = [p.prog_bytes + p.map_bytes for p in prints]
    return {"per_attachment_bytes": spread(per, digits=6),
            "programs_bytes": spread([p.prog_bytes for p in prints], digits=6),
            "maps_bytes": spread([p.map_bytes for p in prints], digits=6),
            "programs_per_attachment": len(prints[0].prog_ids) if prints else 0,
            "maps_per_attachment": len(prints[0].map_ids) if prints else 0,
            "total_bytes": sum(per), "source": "memlock in /proc/self/fdinfo of the pinned programs and maps"}


def phase_cli(node: Node, step: Progress) -> tuple[dict, list[Footprint]]:
    attach_times, detach_times, failures = [], [], []
    for i, name in enumerate(node.names):
        step(f"cli: tcbypass attach {i + 1}/{len(node.names)}")
        seconds, proc = _timed_cli("attach", vmi_name(i), "-n", node.namespace, "--ovsdb", node.sb.ovsdb_url,
                                   "--ovs-netns", node.sb.netns_path(node.sb.node))
        attach_times.append(seconds)
        if proc.returncode != 0:
            failures.append(f"attach {vmi_name(i)}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    prints = [footprint(name) for name in node.names if os.path.isdir(attachments.pin_dir_of(name))]
    for i in range(len(node.names)):
        step(f"cli: tcbypass detach {i + 1}/{len(node.names)}")
        seconds, proc = _timed_cli("detach", vmi_name(i), "-n", node.namespace)
        detach_times.append(seconds)
        if proc.returncode != 0:
            failures.append(f"detach {vmi_name(i)}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return {"attach_wall_s": spread(attach_times), "detach_wall_s": spread(detach_times),
            "attach_samples_s": [round(v, 4) for v in attach_times], "failures": failures}, prints


def phase_inproc(node: Node, step: Progress) -> tuple[dict, list[Footprint]]:
    attach_s, with_discovery_s = [], []
    for i in range(len(node.names)):
        if i % 10 == 0:
            step(f"in process: attach {i + 1}/{len(node.names)}")
        t = time.monotonic()
        result = vmi.attach_vmi(vmi_name(i), node.namespace, node.settings, managed_by="bench")
        with_discovery_s.append(time.monotonic() - t)
        attach_s += [r.seconds for r in result.attached]
    prints = [footprint(name) for name in node.names]
    step("in process: detach all")
    detach_s = _detach_all(node)
    return {"attach_ms": spread(attach_s, 1000), "attach_vmi_ms": spread(with_discovery_s, 1000),
            "detach_ms": spread(detach_s, 1000), "attach_samples_ms": [round(v * 1000, 3) for v in attach_s],
            "attach_vmi_samples_ms": [round(v * 1000, 3) for v in with_discovery_s]}, prints


def judge(report: dict) -> list[dict]:
    """Issue 11's targets against what this run measured (they are set for N = 250)."""
    checks = []

    def check(what: str, value, limit: float, unit: str) -> None:
        if value is not None:
            checks.append({"target": what, "value": rnd(value, 3), "limit": limit, "unit": unit,
                           "pass": value <= limit})

    n = report["plan"]["vms"]
    inproc, cli, agent = report.get("inproc", {}), report.get("cli", {}), report.get("agent", {})
    check("in-process attach p50", inproc.get("attach_ms", {}).get("p50"), TARGETS["inproc_attach_p50_ms"], "ms")
    check("tcbypass attach (CLI) wall time p50", cli.get("attach_wall_s", {}).get("p50"),
          TARGETS["cli_attach_p50_s"], "s")
    check(f"agent: all {n} attached after start", agent.get("all_attached_s"), TARGETS["agent_all_active_s"], "s")
    check(f"tcbypass status with {n} rows (p50)", agent.get("status", {}).get("table", {}).get("p50"),
          TARGETS["status_s"], "s")
    check("agent RSS (VmHWM)", agent.get("memory", {}).get("hwm_mib"), TARGETS["agent_rss_mib"], "MiB")
    clean = [phase["clean"] for phase in report.get("leftovers", {}).values()]
    if clean:
        checks.append({"target": "nothing left after detaching all", "value": sum(not c for c in clean),
                       "limit": 0, "unit": "phases with leftovers", "pass": all(clean)})
    return checks


def run(plan: ScalePlan, progress: Progress | None = None) -> dict:
    """Build the node, run the phases, tear everything down; the report (JSON-ready)."""
    from .bench import describe_machine, sigterm_as_interrupt

    step = progress or (lambda what: None)
    if plan.vm_link not in ("tap", "veth"):
        raise ValueError("vm_link is tap or veth")
    loader.bpffs_ready()
    report: dict = {"machine": describe_machine(), "plan": asdict(plan), "leftovers": {}}
    started = time.monotonic()
    step("preparing the program build (object cache)")
    t = time.monotonic()
    build.prepare()
    report["prepare_s"] = round(time.monotonic() - t, 3)
    report["tcb_objects_before"] = tcb_objects()
    with sigterm_as_interrupt(), Sandbox(ovs=True) as sb:
        node = None
        try:
            node, report["build"] = build_node(sb, plan, step)
            if "agent" in plan.phases:
                report["agent"], prints = phase_agent(node, plan, step)
                report["memory"] = memory_summary(prints)
                step("agent phase: detach all")
                report["agent"]["detach_ms"] = spread(_detach_all(node), 1000)
                report["leftovers"]["agent"] = leftovers(node.names, prints)
            if "cli" in plan.phases:
                report["cli"], prints = phase_cli(node, step)
                report["leftovers"]["cli"] = leftovers(node.names, prints)
            if "inproc" in plan.phases:
                report["inproc"], prints = phase_inproc(node, step)
                report["leftovers"]["inproc"] = leftovers(node.names, prints)
        finally:
            if node is not None:
                for name in node.names:  # whatever a failed phase left
                    with contextlib.suppress(Exception):
                        attachments.detach(name)
            step("removing the node")
    report["tcb_objects_after"] = tcb_objects()
    report["targets"] = judge(report)
    report["machine"]["loadavg_end"] = os.getloadavg()[0]
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


# --- output ------------------------------------------------------------------------------------

def rows(report: dict) -> list[tuple[str, str]]:
    """The figures as (what, value) rows for a table."""
    out = []
    b = report.get("build", {})
    if b:
        out.append((f"build {b['vms']} pods ({b['vm_link']} VMs, userspace OVS)",
                    f"{b['seconds']:.0f} s; per pod p50 {b['per_vm_s']['p50'] * 1000:.0f} ms, last ten "
                    f"p50 {b['last_10_s']['p50'] * 1000:.0f} ms; {b['netns']} netns, {b['ovs_ports']} OVS ports; "
                    f"ovs-vswitchd at rest {b['ovs_vswitchd_idle_cpu_pct']} % of a CPU"))
    for c in b.get("checkpoints", []):
        out.append((f"one more VMI with {c['pods']} pods on the node", f"CLI p50 {c['cli_s']['p50']:.3f} s; in process "
                    f"attach_vmi p50 {c['attach_vmi_ms']['p50']:.0f} ms, attach p50 {c['attach_ms']['p50']:.1f} ms"))
    a = report.get("agent")
    if a:
        out.append(("agent: all attached after start", f"{a['all_attached_s']:.2f} s "
                    f"(first {a['first_attached_s']:.2f} s); {a['active']}/{b['vms']} active"))
        out.append(("agent memory and CPU", f"VmRSS {a['memory']['rss_mib']} MiB, VmHWM {a['memory']['hwm_mib']} MiB; "
                    f"{a['cpu_s_at_all_attached']} s of CPU until all attached; "
                    f"{a['failed_attaches_logged']} failed attaches logged (retried)"))
        st = a["status"]
        out.append((f"tcbypass status ({st.get('rows')} rows)", f"p50 {st['table']['p50']:.2f} s, "
                    f"max {st['table']['max']:.2f} s; --json p50 {st['json']['p50']:.2f} s"))
        if "traffic_through_fast_path" in a:
            out.append(("pings through the fast path (bridge unicast blocked)",
                        ", ".join(f"{k} {v}" for k, v in a["traffic_through_fast_path"].items())))
        out.append(("agent phase: detach", f"p50 {a['detach_ms']['p50']:.1f} ms per attachment"))
    m = report.get("memory")
    if m:
        out.append(("kernel memory per attachment",
                    f"{m['per_attachment_bytes']['p50'] / 1024:.1f} KiB ({m['programs_per_attachment']} programs "
                    f"{m['programs_bytes']['p50'] / 1024:.1f} KiB + {m['maps_per_attachment']} maps "
                    f"{m['maps_bytes']['p50'] / 1024:.1f} KiB); all: {m['total_bytes'] / 1024 / 1024:.1f} MiB"))
    c = report.get("cli")
    if c:
        w = c["attach_wall_s"]
        out.append(("tcbypass attach VMI (CLI, sequential)",
                    f"p50 {w['p50']:.3f} s, p90 {w['p90']:.3f} s, max {w['max']:.3f} s"))
        w = c["detach_wall_s"]
        out.append(("tcbypass detach VMI (CLI)", f"p50 {w['p50']:.3f} s, p90 {w['p90']:.3f} s, max {w['max']:.3f} s"))
        for failure in c["failures"][:5]:
            out.append(("CLI failure", failure))
    i = report.get("inproc")
    if i:
        out.append(("in process: attachments.attach",
                    f"p50 {i['attach_ms']['p50']:.1f} ms, p90 {i['attach_ms']['p90']:.1f} ms, "
                    f"max {i['attach_ms']['max']:.1f} ms"))
        out.append(("in process: vmi.attach_vmi (with discovery)",
                    f"p50 {i['attach_vmi_ms']['p50']:.1f} ms, p90 {i['attach_vmi_ms']['p90']:.1f} ms"))
        out.append(("in process: detach", f"p50 {i['detach_ms']['p50']:.1f} ms"))
    for phase, left in report.get("leftovers", {}).items():
        out.append((f"left after detaching all ({phase})",
                    f"{left['pins']} pins, {left['locks']} lock files, {left['programs']} of "
                    f"{left['programs_checked']} programs, {left['maps']} of {left['maps_checked']} maps"))
    before, after = report.get("tcb_objects_before"), report.get("tcb_objects_after")
    if before and after:
        out.append(("tcb_* objects on the machine, before / after",
                    f"programs {before['programs']} / {after['programs']}, maps {before['maps']} / {after['maps']}"
                    " (other tcbypass users on the machine count too)"))
    return out


def render(report: dict, console) -> None:
    from rich.table import Table

    n = report["plan"]["vms"]
    m = report["machine"]
    t = Table(title=f"tcbypass-lab bench scale: {n} VM pods on one node", title_justify="left")
    t.add_column("what")
    t.add_column("measured")
    for what, value in rows(report):
        t.add_row(what, value)
    console.print(t)
    checks = Table(title=f"issue 11's targets (set for N = {TARGET_N}; this run: N = {n})", title_justify="left")
    for col in ("target", "measured", "limit", ""):
        checks.add_column(col)
    for c in report.get("targets", []):
        checks.add_row(c["target"], f"{c['value']} {c['unit']}", f"≤ {c['limit']} {c['unit']}",
                       "pass" if c["pass"] else "FAIL")
    console.print(checks)
    console.print(f"{m['cpus']} CPUs, kernel {m['kernel']}, load {m['loadavg_start']:.2f} → "
                  f"{m.get('loadavg_end', 0):.2f}; {report.get('seconds', 0):.0f} s in all.", highlight=False)


def plot(report: dict, path: str) -> None:
    """Attach time against the number of attachments already there (CLI and in
    process), and the agent's attachments against time since it started."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def log_panel(ax, xlabel: str, ylabel: str, title: str) -> None:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

    fig, (first, left, right) = plt.subplots(1, 3, figsize=(16, 4.5))
    points = report.get("build", {}).get("checkpoints", [])
    if points:
        xs = [c["pods"] for c in points]
        for key, scale_to_ms, label, colour in (("cli_s", 1000, "tcbypass attach VMI (CLI wall time)", "tab:blue"),
                                               ("attach_vmi_ms", 1, "vmi.attach_vmi (with discovery)", "tab:green"),
                                               ("attach_ms", 1, "attachments.attach", "tab:orange")):
            p50 = [c[key]["p50"] * scale_to_ms for c in points]
            low = [p - c[key]["min"] * scale_to_ms for p, c in zip(p50, points)]
            high = [c[key]["max"] * scale_to_ms - p for p, c in zip(p50, points)]
            first.errorbar(xs, p50, yerr=[low, high], marker="o", ms=4, capsize=2, color=colour, label=label)
        log_panel(first, "N: VM pods on the node", "ms (median, min–max)", "one more VMI, against pods on the node")
    if report.get("cli"):
        ys = report["cli"]["attach_samples_s"]
        left.plot(range(1, len(ys) + 1), [y * 1000 for y in ys], ".", ms=3, color="tab:blue",
                  label="tcbypass attach VMI (CLI wall time)")
    if report.get("inproc"):
        ys = report["inproc"]["attach_samples_ms"]
        left.plot(range(1, len(ys) + 1), ys, ".", ms=3, color="tab:orange", label="attachments.attach (in process)")
        ys = report["inproc"]["attach_vmi_samples_ms"]
        left.plot(range(1, len(ys) + 1), ys, ".", ms=3, color="tab:green", alpha=0.6,
                  label="vmi.attach_vmi (in process, with discovery)")
    log_panel(left, "attachments on the node, this one included (all pods present)", "ms",
              "each attach of a phase, against attachments present")
    if report.get("agent"):
        ts = report["agent"]["timeline_s"]
        right.step(ts, range(1, len(ts) + 1), where="post", color="tab:purple")
        right.set_xlabel("seconds since the agent started")
        right.set_ylabel("attachments complete")
        right.set_title(f"agent starting with {report['plan']['vms']} pods plugged")
        right.grid(True, alpha=0.3)
    m = report["machine"]
    fig.suptitle(f"tcbypass-lab bench scale: {m['cpus']} CPUs, kernel {m['kernel']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
